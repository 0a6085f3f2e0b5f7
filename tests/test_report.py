"""eval, bench and the report on the tiny chain: sane numbers, the JSON schema, the rendered report."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.card import upload_args

from .conftest import compose_config


ARTIFACTS = ["base16", "nf4", "qlora", "merged", "gptq", "rtn"]


def test_eval_measures_every_artifact(finished):
    out, _, _ = finished
    evaluation = json.loads((out / "default" / "eval" / "eval.json").read_text())
    results = evaluation["artifacts"]
    assert list(results) == ARTIFACTS
    assert evaluation["ppl_windows"] == 4 and evaluation["task_examples"] == 8
    for name, r in results.items():
        assert 1 < r["ppl"] < 5000 and math.isfinite(r["ppl"]), name
        assert 0 <= r["task_accuracy"] <= 1 and r["param_bytes"] > 0, name
        # partial credit: an exact answer scores 1, so the similarity is never below the accuracy
        assert r["task_accuracy"] <= r["task_similarity"] <= 1, name
    assert results["gptq"]["kernels"] and not results["merged"]["kernels"]
    assert results["nf4"]["param_bytes"] < results["base16"]["param_bytes"]
    assert results["gptq"]["disk_bytes"] < results["merged"]["disk_bytes"]
    # the adapter is already in the merged weights: both score alike
    assert abs(results["merged"]["ppl"] - results["qlora"]["ppl"]) < 0.05 * results["qlora"]["ppl"]
    histogram = evaluation["weight_histogram"]
    assert set(histogram["counts"]) == {"base16", "nf4", "gptq"}
    assert len({round(sum(c)) for c in histogram["counts"].values()}) == 1  # same layer, same number of weights


def test_bench_reports_prefill_decode_memory_and_roofline(finished):
    out, _, _ = finished
    bench = json.loads((out / "default" / "bench" / "bench.json").read_text())
    assert bench["bandwidth_bytes_s"] > 1e8 and bench["device"]["threads"] >= 1 and bench["device"]["cpu"]
    assert bench["matrix"] == {"new_tokens": [8], "batch_sizes": [1, 2], "use_cache": [True]}
    assert list(bench["artifacts"]) == ["base16", "nf4", "qlora", "merged", "gptq"]
    for name, b in bench["artifacts"].items():
        # bench.compile=merged (the tests' setting) adds the compiled path (static cache + torch.compile) for it
        compiled = [(1, 8, True)] if name == "merged" else []
        assert [(r["batch"], r["new_tokens"], r["compiled"]) for r in b["runs"]] == [(1, 8, False), (2, 8, False),
                                                                                     *compiled], name
        for r in b["runs"]:
            assert r["prefill_ms"]["min"] <= r["prefill_ms"]["median"] <= r["prefill_ms"]["max"]
            assert r["prefill_ms"]["median"] > 0 and r["decode_tok_s"]["median"] > 0 and r["peak_memory_bytes"] > 0
        assert 0 < b["roofline_fraction"] < 2, name
    fast = bench["artifacts"]["merged"]["runs"][-1]
    assert fast["compile_s"] > 0 and fast["decode_tok_s"]["median"] > 0
    assert bench["artifacts"]["gptq"]["kernels"]


def test_report_has_the_table_and_plots(finished):
    out, _, _ = finished
    exp = out / "default"
    report = (exp / "report.md").read_text()
    assert ("| artifact | size MB | params MB | ppl | ppl / base16 | task acc | task sim | prefill ms | "
            "decode tok/s | compiled tok/s | roofline |") in report
    evaluation = json.loads((exp / "eval" / "eval.json").read_text())["artifacts"]
    gptq_row = next(line for line in report.splitlines() if line.startswith("| gptq |"))
    assert f"| {evaluation['gptq']['ppl'] / evaluation['base16']['ppl']:.2f}x |" in gptq_row, gptq_row
    assert "x eager, " in report  # the merged model's compiled decode
    for name in ARTIFACTS:
        assert f"| {name} |" in report
    for png in ("train_loss.png", "decode_speed.png", "perplexity.png", "weight_histogram.png"):
        assert (exp / png).stat().st_size > 5000 and f"]({png})" in report


def test_report_shows_a_compiled_speed_without_an_eager_one():
    """With bench.cpu.use_cache=[false] the compiled run (batch 1, KV cache on) has no eager run to compare with."""
    from pipeline.report import markdown, rows

    def measured(compiled: bool, tok_s: float) -> dict:
        return {"batch": 1, "new_tokens": 8, "use_cache": compiled, "compiled": compiled,
                "compile_s": 3.0 if compiled else None, "prefill_ms": {"median": 1.0},
                "decode_tok_s": {"median": tok_s}, "peak_memory_bytes": 1}
    runs = [measured(False, 10.0), measured(True, 20.0)]
    bench = {"artifacts": {"merged": {"runs": runs, "roofline_fraction": None}}}
    assert "| 20.0 (3 s compile) |" in markdown(rows({}, bench))


def test_model_card_describes_the_gptq_checkpoint(finished):
    out, _, _ = finished
    card = (out / "default" / "gptq" / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    metadata = yaml.safe_load(front)
    assert metadata["library_name"] == "transformers" and {"gptq", "4-bit", "qlora"} <= set(metadata["tags"])
    assert "base_model" not in metadata  # a local directory is no hub id
    for section in ("## Use it", "AutoModelForCausalLM.from_pretrained", "## Quantization", "## Training",
                    "## Evaluation", "vLLM and SGLang serve it", "vllm serve"):
        assert section in body, section
    for name in ARTIFACTS:
        assert f"| {name} |" in body, name
    # bits, group size, method, group ranges (mse=null: min/max on CPU), desc_act, sym, layout of the tiny checkpoint
    assert "| 4 | 128 | gptq | min/max | False | False | awq |" in body
    assert "GPTQ's weights in the AWQ layout (`quant_method: awq`" in body and "awq" in metadata["tags"]
    assert "Merge check against NF4 base + adapter, exact" in body


def test_push_uploads_the_checkpoint_or_says_why_not(finished, copy_of):
    exp, _ = copy_of
    args = upload_args(compose_config("push.repo_id=me/tiny-gptq"), exp)
    assert args["repo_id"] == "me/tiny-gptq" and args["repo_type"] == "model"
    assert Path(args["folder_path"]) == (exp / "gptq").resolve() and "manifest.json" in args["ignore_patterns"]
    # No hub here: the upload fails, in one line, after every stage is done.
    result = subprocess.run([sys.executable, "-m", "pipeline", f"output_dir={exp.parent}", "stage=gptq",
                             "push.repo_id=me/tiny-gptq", *finished[1]],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    said = result.stdout + result.stderr
    assert result.returncode == 2 and "push.repo_id='me/tiny-gptq': the upload failed" in said, said[-2000:]
    assert "Traceback" not in said


def test_sweep_table_has_a_row_per_point_with_lm_eval_and_gptq_time(finished, tmp_path):
    from pipeline.report import write_sweep

    out, _, _ = finished
    for point in ("gptq.bits=3", "gptq.bits=4"):  # two points: copies of the finished experiment
        shutil.copytree(out / "default", tmp_path / "sweep" / point, symlinks=False)
    table = write_sweep(tmp_path / "sweep").splitlines()
    assert (tmp_path / "sweep" / "sweep.md").read_text().endswith(table[-1] + "\n")
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert "pipeline_text bits_per_byte" in header and "pipeline_heldout acc" in header and "gptq s" in header
    assert "gptq ppl / base16" in header
    assert len(table) == 4 and all(len(row.strip("|").split("|")) == len(header) for row in table[2:])
    seconds = json.loads((out / "default" / "gptq" / "manifest.json").read_text())["seconds"]
    row = dict(zip(header, (cell.strip() for cell in table[2].strip("|").split("|"))))
    assert row["sweep point"].startswith("[gptq.bits=3]") and row["gptq s"] == f"{seconds:.0f}"
