"""eval: quality of every artifact side by side, written to `eval.json`.

For each artifact (base16, nf4, qlora, merged, gptq, and rtn: round-to-nearest quantization of the merged model
at the GPTQ bits and group size, made here as a reference point): perplexity on held-out text, exact-match task
accuracy and character similarity (partial credit) of greedy answers on the held-out split, lm-evaluation-harness
tasks (pipeline/harness.py), size on disk and parameter memory. Also a histogram of one
layer's weights in the original, NF4 and GPTQ models.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from .. import compute, harness, memory
from ..config import Config, ConfigError
from ..data import pydoc_texts, read_jsonl, row_text, task_chats, token_windows
from ..models import (artifact_disk_bytes, artifact_paths, computes_in, dequantized, load_placed, load_portable,
                      load_tokenizer, nf4_weight, placed_on, quantized_kernels)
from ..quality import perplexity, task_scores
from . import gptq

log = logging.getLogger(__name__)

HISTOGRAM_ARTIFACTS = ("base16", "nf4", "gptq")
HISTOGRAM_BINS = 80


def ppl_texts(cfg: Config, tokenizer, train_dir: Path) -> list[str]:
    source = cfg.eval.ppl_source
    if source == "pydoc":
        return pydoc_texts(heldout=True)
    if source == "heldout":
        return [row_text(tokenizer, row) for row in read_jsonl(train_dir / "data" / "heldout.jsonl")]
    import datasets

    suffix = Path(source).suffix
    if suffix in (".txt", ".jsonl", ".json", ".parquet"):
        kind = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}[suffix]
        ds = datasets.load_dataset(kind, data_files=source, split="train")
    else:
        ds = datasets.load_dataset(source, split="test")
    if "text" not in ds.column_names:
        raise ConfigError(f"eval.ppl_source={source!r}: expected a 'text' column, found {ds.column_names}")
    return list(ds["text"])


def dense_weight(name: str, model, gptq_dir: Path, layer: str) -> torch.Tensor | None:
    """The layer's weight as a dense float matrix, whatever its storage (16-bit, bitsandbytes NF4, GPTQ or AWQ)."""
    if name == "gptq":
        model = load_portable(gptq_dir)  # the layers as saved, which the kernels eval runs may have repacked
    module = dict(model.named_modules()).get(layer)
    if hasattr(module, "qweight"):  # a GPTQ or AWQ layer (gptq.dynamic may leave it 16-bit)
        return dequantized(module)
    weight = getattr(module, "weight", None)
    if weight is not None and hasattr(weight, "quant_state"):
        return nf4_weight(module)
    return weight.float() if weight is not None else None


def quantize_rtn(cfg: Config, merged: Path, out: Path) -> None:
    from gptqmodel.quantization.config import RTNConfig

    group_size, _ = gptq.group_size_for(cfg, merged)
    gptq.quantize(cfg, merged, out, RTNConfig(bits=cfg.gptq.bits, group_size=group_size, sym=cfg.gptq.sym,
                                              dynamic=gptq.dynamic_rules(cfg.gptq),
                                              offload_to_disk_path=str(out.resolve() / "offload")), None)


def evaluate(cfg: Config, name: str, inputs: dict[str, Path], work: Path, windows: list, chats: list, tokenizer,
             lm_specs: list, manager) -> tuple[dict, torch.Tensor | None]:
    """One artifact's measurements, and its histogram layer's weights where it has them. The model lives in this
    function only, so that it is freed before the next artifact loads."""
    e = cfg.eval
    loaded = load_placed("eval", name, inputs, cfg, work / "offload")
    if isinstance(loaded, str):
        return {"skipped": loaded}, None
    model, placed = loaded
    log.info("eval: %s on %s", name, placed_on(model))
    model.eval()
    # Weights and memory first: on CPUs with AVX512-BF16 the first forward repacks NF4 weights in place.
    result = {"disk_bytes": artifact_disk_bytes(name, inputs), "param_bytes": model.get_memory_footprint(),
              "kernels": quantized_kernels(model), "placement": placed_on(model), "computed_in": computes_in(model)}
    # The histogram reads one layer of a model loaded whole (an offloaded layer's weights are read only inside
    # its forward; the GPTQ histogram loads the checkpoint again, on one device).
    dense = None
    if name in HISTOGRAM_ARTIFACTS and placed.whole:
        dense = dense_weight(name, model, inputs["gptq"], e.histogram_layer)
        dense = dense.flatten().cpu() if dense is not None else None
    result["ppl"] = perplexity(model, windows)
    scores = task_scores(model, tokenizer, chats, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
    result["task_accuracy"], result["task_similarity"] = scores["accuracy"], scores["similarity"]
    log.info("eval: %s ppl %.2f, task accuracy %s, similarity %s", name, result["ppl"], scores["accuracy"],
             scores["similarity"])
    if lm_specs:
        result["lm_eval"] = harness.evaluate(model, tokenizer, lm_specs, manager, e.lm_eval)
        log.info("eval: %s lm-eval %s", name, result["lm_eval"])
    shutil.rmtree(work / "offload", ignore_errors=True)  # its weights offloaded to disk, if any
    return result, dense


def run(cfg: Config, work: Path, inputs: dict[str, Path]) -> dict:
    e = cfg.eval
    tokenizer = load_tokenizer(inputs["base"] / "nf4")
    windows = token_windows(tokenizer, ppl_texts(cfg, tokenizer, inputs["train"]), e.ppl_seq_len)[:e.ppl_windows]
    if len(windows) < e.ppl_windows:
        log.warning("eval: only %d perplexity windows of %d tokens available (%d asked)", len(windows),
                    e.ppl_seq_len, e.ppl_windows)
    chats = task_chats(read_jsonl(inputs["train"] / "data" / "heldout.jsonl"))[:e.task_examples]
    if not chats:
        log.warning("eval: no held-out chats ending with an answer (text rows, or data.heldout_examples=0): task "
                    "accuracy is not measured")
    # lm-eval: the pipeline's own tasks score the same text as perplexity (its windows) and the same chats.
    window_texts = [tokenizer.decode(window, skip_special_tokens=True) for window in windows]
    own = harness.own_tasks(work / "lm_eval_data", window_texts, chats, tokenizer)
    lm_tasks = [task for task in e.lm_eval.tasks if task in own or task not in harness.OWN_TASKS]
    lm_specs = [own.get(task, task) for task in lm_tasks]  # the pipeline's tasks as their configs, others by name
    for task in set(e.lm_eval.tasks) - set(lm_tasks):
        log.warning("eval: lm-eval task %s has no data here (no held-out chats ending with an answer): skipped", task)
    manager = None
    if lm_tasks:  # lm-eval's own thousands of tasks are indexed only when a task needs them
        manager = harness.task_manager(e.lm_eval.include_path,
                                       defaults=any(task not in harness.OWN_TASKS for task in lm_tasks))
    if "rtn" in e.artifacts:
        quantize_rtn(cfg, inputs["merge"], work / "rtn")
    inputs = {**inputs, "rtn": work / "rtn"}

    results, weights = {}, {}
    available = artifact_paths(inputs)
    for name in e.artifacts:
        path = available[name]
        if isinstance(path, Path) and not path.exists():
            log.warning("eval: %s was not produced by this run (%s); skipped", name, path)
            results[name] = {"skipped": f"{path} does not exist"}
            continue
        results[name], dense = evaluate(cfg, name, inputs, work, windows, chats, tokenizer, lm_specs, manager)
        memory.release_freed_heap()  # the artifact is gone (it lived in evaluate): the next loads in its place
        if dense is not None:
            weights[name] = dense

    report = {"compute": compute.record(cfg), "ppl_source": e.ppl_source, "ppl_windows": len(windows),
              "ppl_seq_len": e.ppl_seq_len,
              "task_examples": len(chats), "lm_eval_tasks": lm_tasks, "artifacts": results}
    if weights:
        reference = next(iter(weights.values()))
        lo, hi = reference.quantile(0.001).item(), reference.quantile(0.999).item()
        counts = {name: torch.histc(w.clamp(lo, hi), HISTOGRAM_BINS, lo, hi).tolist() for name, w in weights.items()}
        report["weight_histogram"] = {"layer": e.histogram_layer, "range": [lo, hi], "counts": counts}
    (work / "eval.json").write_text(json.dumps(report, indent=1))
    summary = ("ppl", "task_accuracy", "task_similarity")
    return {name: {k: v for k, v in r.items() if k in summary} for name, r in results.items()}
