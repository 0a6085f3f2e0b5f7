"""lm-evaluation-harness: its tasks scored in-process on a model the pipeline loaded (so the quantized kernels are
the pipeline's), offline. Two tasks of the pipeline's own, written at eval time from the data eval measures:
- pipeline_text: rolling log-likelihood of the text eval's perplexity reads, its windows as documents (word and
  byte perplexity, bits per byte);
- pipeline_heldout: log-likelihood of each held-out answer after its chat prompt: `acc` (the answer is the
  model's greedy continuation) and `perplexity` of the answer.
They go to lm-eval as inline task configs (no YAML): their data files are named by absolute path, which holds only
while the stage runs (the eval artifact keeps the data).
Any other task is lm-eval's own (hellaswag, arc_easy, mmlu: these read the hub) or one of the user's YAML files
in eval.lm_eval.include_path."""
from __future__ import annotations

import json
from pathlib import Path

from .artifacts import content_hashes
from .config import ConfigError, LmEvalConfig
from .data import chat_prompt

# The pipeline's tasks: (doc_to_text, doc_to_target, output_type, metrics).
OWN_TASKS = {"pipeline_text": ("", "{{text}}", "loglikelihood_rolling",
                               ("word_perplexity", "byte_perplexity", "bits_per_byte")),
             "pipeline_heldout": ("{{prompt}}", "{{answer}}", "loglikelihood", ("acc", "perplexity"))}


def task_manager(include_path: str | None, defaults: bool = True):
    """lm-eval's task index; `defaults` adds lm-eval's own thousands of tasks (indexing them takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def include_identity(include_path: str | None) -> dict[str, str]:
    """A hash of every file under include_path, for the eval stage's fingerprint: edited task YAML re-evaluates."""
    return content_hashes(sorted(Path(include_path).rglob("*"))) if include_path else {}


def check_tasks(lm_eval: LmEvalConfig) -> None:
    """Every task named is one lm-eval knows (its own, the user's YAML, or the pipeline's): before any model loads."""
    if lm_eval.include_path and not Path(lm_eval.include_path).is_dir():
        raise ConfigError(f"eval.lm_eval.include_path={lm_eval.include_path!r}: no such directory")
    wanted = [task for task in lm_eval.tasks if task not in OWN_TASKS]
    if not wanted:
        return
    known = set(task_manager(lm_eval.include_path).all_tasks)
    unknown = [task for task in wanted if task not in known]
    if unknown:
        raise ConfigError(f"eval.lm_eval.tasks: lm-eval knows no task {', '.join(map(repr, unknown))} (its own "
                          f"tasks, {', '.join(OWN_TASKS)}, or YAML in eval.lm_eval.include_path)")


def own_tasks(folder: Path, texts: list[str], chats: list[list[dict]], tokenizer) -> dict[str, dict]:
    """The pipeline's tasks that have data, as lm-eval task configs by name; their data is written to `folder`."""
    rows = {"pipeline_text": [{"text": text} for text in texts],
            "pipeline_heldout": [{"prompt": chat_prompt(tokenizer, chat), "answer": chat[-1]["content"].strip()}
                                 for chat in chats]}
    folder.mkdir(parents=True, exist_ok=True)
    configs = {}
    for task, task_rows in rows.items():
        if not task_rows:
            continue
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in task_rows))
        text, target, output_type, metrics = OWN_TASKS[task]
        configs[task] = {"task": task, "dataset_path": "json",
                         "dataset_kwargs": {"data_files": {"test": str(data.resolve())}}, "test_split": "test",
                         "output_type": output_type, "doc_to_text": text, "doc_to_target": target,
                         "target_delimiter": "",  # the prompt ends where the answer starts: no space between them
                         "metric_list": [{"metric": metric} for metric in metrics]}
    return configs


def evaluate(model, tokenizer, tasks: list[str | dict], manager, lm_eval: LmEvalConfig) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for the model as loaded; `tasks` are names or inline task configs."""
    import lm_eval as harness
    from lm_eval.models.huggingface import HFLM

    # log-softmax in float32: in bf16 lm-eval sums a window's log-probabilities in bf16 too, whose step near a
    # 256-token window's total (~800 nats) is 4 nats, enough to give two different models the same bits per byte.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=lm_eval.batch_size, softmax_dtype="float32")
    out = harness.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=lm_eval.limit,
                                  num_fewshot=lm_eval.num_fewshot, bootstrap_iters=0, log_samples=False)
    return {task: {key.split(",")[0]: value for key, value in metrics.items()
                   if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
            for task, metrics in out["results"].items()}
