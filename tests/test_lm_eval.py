"""eval's lm-evaluation-harness scores, offline: the pipeline's own tasks on every artifact agree with a direct
computation, a user's task YAML runs from eval.lm_eval.include_path, and the partial-credit metric."""
from __future__ import annotations

import json
import math
import textwrap

import torch

from pipeline.artifacts import read_manifest
from pipeline.data import read_jsonl
from pipeline.models import load_artifact, load_tokenizer
from pipeline.quality import answer_scores

from .conftest import compose_config


def test_every_artifact_has_lm_eval_scores_in_eval_json_and_the_report(finished):
    out, _, _ = finished
    exp = out / "default"
    evaluation = json.loads((exp / "eval" / "eval.json").read_text())
    assert evaluation["lm_eval_tasks"] == ["pipeline_text", "pipeline_heldout"]
    for name, r in evaluation["artifacts"].items():
        text, heldout = r["lm_eval"]["pipeline_text"], r["lm_eval"]["pipeline_heldout"]
        assert 0 < text["bits_per_byte"] < 20, name
        assert math.isclose(text["byte_perplexity"], 2 ** text["bits_per_byte"], rel_tol=1e-9), name
        assert 0 <= heldout["acc"] <= 1 and heldout["perplexity"] > 1, name
    table = (exp / "report.md").read_text().split("lm-evaluation-harness")[1]
    header = next(line for line in table.splitlines() if line.startswith("| artifact |"))
    for column in ("pipeline_text bits_per_byte", "pipeline_text word_perplexity", "pipeline_heldout acc",
                   "pipeline_heldout perplexity"):
        assert f" {column} |" in header, column
    assert all(f"| {name} | " in table for name in evaluation["artifacts"])
    # The pipeline's tasks read their data where the stage wrote it: no file kept names that temporary place.
    kept = [p for p in (exp / "eval").resolve().rglob("*") if p.suffix in (".json", ".jsonl", ".yaml")]
    assert {p.name for p in kept} >= {"eval.json", "pipeline_text.jsonl", "pipeline_heldout.jsonl"}
    assert not [p.name for p in kept if ".partial" in p.read_text()]


def test_lm_eval_bits_per_byte_match_a_direct_computation(finished):
    """lm-eval's rolling log-likelihood: windows of the model's max length, each predicted from the token before it
    (the first from the prefix token). The same sums here with transformers, on the merged model as eval loaded it."""
    from lm_eval.models.huggingface import HFLM

    out, overrides, _ = finished
    exp = out / "default"
    cfg = compose_config(*overrides)
    inputs = {stage: exp / stage for stage in ("base", "train", "merge", "gptq")}
    model, tokenizer = load_artifact("merged", inputs, cfg).eval(), load_tokenizer(exp / "base" / "nf4")
    harness = HFLM(pretrained=model, tokenizer=tokenizer)
    docs = [row["text"] for row in read_jsonl(exp / "eval" / "lm_eval_data" / "pipeline_text.jsonl")]
    assert len(docs) == cfg.eval.ppl_windows

    nll, size = 0.0, 0
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        full = [harness.prefix_token_id, *ids]
        for start in range(0, len(ids), harness.max_length):
            target = torch.tensor(ids[start:start + harness.max_length])
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([full[start:start + harness.max_length]])).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits[:len(target)], target, reduction="sum").item()
        size += len(doc.encode())
    measured = json.loads((exp / "eval" / "eval.json").read_text())["artifacts"]["merged"]["lm_eval"]
    # Tight: lm-eval must sum log-probabilities in float32 (in bf16 a window's sum is off by up to a few nats).
    assert math.isclose(nll / size / math.log(2), measured["pipeline_text"]["bits_per_byte"], rel_tol=1e-4)


MY_TASK = """\
task: my_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_a_task_of_my_own_runs_from_the_include_path(copy_of, tmp_path):
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    rows = [{"question": f"What is the capital of {country}?", "choices": ["Paris", "Rome", "Madrid"], "answer": i}
            for i, country in enumerate(["France", "Italy", "Spain"] * 4)]
    (tasks / "capitals.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tasks / "my_capitals.yaml").write_text(textwrap.dedent(MY_TASK.format(data=tasks / "capitals.jsonl")))

    exp, run = copy_of
    mine = ("stage=eval", "eval.artifacts=[merged,gptq]", "eval.lm_eval.tasks=[my_capitals]",
            f"eval.lm_eval.include_path={tasks}", "eval.lm_eval.limit=6")
    assert run(*mine)["eval"]["status"] != "cached"
    evaluation = json.loads((exp / "eval" / "eval.json").read_text())
    for name in ("merged", "gptq"):
        scores = evaluation["artifacts"][name]["lm_eval"]
        assert list(scores) == ["my_capitals"]
        assert {"acc", "acc_norm"} <= set(scores["my_capitals"]) and 0 <= scores["my_capitals"]["acc"] <= 1
    assert read_manifest(exp / "eval")["config"]["eval"]["lm_eval"]["include_path"] == str(tasks)
    assert run(*mine)["eval"]["status"] == "cached"
    task_yaml = tasks / "my_capitals.yaml"
    task_yaml.write_text(task_yaml.read_text().replace("  - metric: acc_norm\n", ""))
    assert run(*mine)["eval"]["status"] != "cached", "an edited task re-evaluates"
    assert "acc_norm" not in json.loads((exp / "eval" / "eval.json").read_text())["artifacts"]["gptq"]["lm_eval"][
        "my_capitals"]


def test_task_similarity_gives_partial_credit():
    scores = answer_scores(["May 3, 1998", "June 1, 2001", "no idea"], ["May 3, 1998", "June 7, 2001", "May 9, 1950"])
    assert scores["accuracy"] == 1 / 3
    assert 1 / 3 < scores["similarity"] < 1
    one_digit_off = answer_scores(["June 1, 2001"], ["June 7, 2001"])["similarity"]
    unrelated = answer_scores(["no idea"], ["May 9, 1950"])["similarity"]
    assert one_digit_off > 0.9 > 0.3 > unrelated
    assert answer_scores([], []) == {"accuracy": None, "similarity": None}
