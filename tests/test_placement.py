"""Placement of artifacts larger than the one device: eval and bench offload what the format allows (here: to disk,
under a CPU budget smaller than the tiny model) and skip, with the reason, what cannot be placed; serve's tensor
parallel size."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from pipeline import compute
from pipeline.models import placed_on, weight_bytes
from pipeline.runner import run
from pipeline.stages.serve import tensor_parallel_size

from .conftest import compose_config

ARTIFACTS = ["base16", "nf4", "qlora", "merged"]


@pytest.fixture(scope="module")
def squeezed(finished, tmp_path_factory):
    """eval and bench of a copy of the finished run with a CPU budget that holds the NF4 model but neither the
    16-bit models (offloaded to disk) nor NF4 + adapter (bitsandbytes' 4-bit weights cannot be offloaded): (the
    experiment folder, the finished run's eval.json, {"budget": the CPU budget, "qlora": NF4 + adapter bytes})."""
    out, overrides, _ = finished
    mine = tmp_path_factory.mktemp("squeezed") / "outputs"
    shutil.copytree(out, mine, symlinks=True)
    exp = mine / "default"
    dtype = compute.dtype(compose_config(*overrides))  # what they take in memory: computing in it
    nf4 = weight_bytes(exp / "base" / "nf4", dtype)
    qlora = nf4 + weight_bytes(exp / "train" / "adapter", dtype)
    merged = weight_bytes(exp / "merge", dtype)
    # Computing in 16 bits, the budget holds NF4 but not NF4 + adapter, and the 16-bit models' embedding and largest
    # layer, which accelerate keeps on the computing device. In float32 the NF4 layers stay 4-bit while the 16-bit
    # models' layers double: no budget under NF4 + adapter holds their first layers, so it sits under the merged
    # model, and qlora fits.
    budget = qlora - 1000 if dtype.itemsize == 2 else merged - 1000
    assert nf4 < budget < merged, "the tiny model's sizes no longer fit this test's budget"
    artifacts = f"[{','.join(ARTIFACTS)}]"
    run(compose_config(f"output_dir={mine}", *overrides, f"+memory.max_memory.cpu={budget}",
                       f"eval.artifacts={artifacts}", f"bench.artifacts={artifacts}"))
    return (exp, json.loads((out / "default" / "eval" / "eval.json").read_text())["artifacts"],
            {"budget": budget, "qlora": qlora})


def test_eval_offloads_16_bit_models_to_disk_with_the_same_numbers(squeezed):
    exp, whole, _ = squeezed
    results = json.loads((exp / "eval" / "eval.json").read_text())["artifacts"]
    qlora = None if "skipped" in results["qlora"] else "cpu"  # see squeezed
    assert {name: r.get("placement") for name, r in results.items()} == {
        "base16": "cpu + disk offload", "nf4": "cpu", "qlora": qlora, "merged": "cpu + disk offload"}
    for name in ("base16", "nf4", "merged"):
        assert abs(results[name]["ppl"] - whole[name]["ppl"]) < 0.01 * whole[name]["ppl"], name
        assert results[name]["task_accuracy"] == whole[name]["task_accuracy"], name
        bits = results[name]["lm_eval"]["pipeline_text"]["bits_per_byte"]
        assert bits == pytest.approx(whole[name]["lm_eval"]["pipeline_text"]["bits_per_byte"], rel=0.01), name
    assert not (exp / "eval" / "offload").exists(), "the offloaded weights are not kept with the artifact"


def test_an_artifact_that_cannot_be_placed_is_skipped_with_the_reason(squeezed):
    exp, _, sizes = squeezed
    if sizes["budget"] > sizes["qlora"]:
        pytest.skip("computing in float32, no budget that holds the 16-bit models' first layers leaves qlora out "
                    "(see squeezed); this runs where the compute dtype is 16-bit")
    evaluation = json.loads((exp / "eval" / "eval.json").read_text())["artifacts"]
    reason = evaluation["qlora"]["skipped"]
    # what it needs, what there is, why offloading does not help, and the keys that change it
    assert reason.startswith(f"needs {sizes['qlora'] / 1e3:.0f} KB of weights; budgets cpu "
                             f"{sizes['budget'] / 1e3:.0f} KB"), reason
    assert "no CPU or disk offload" in reason and "memory.max_memory" in reason and "eval.artifacts" in reason
    report = (exp / "report.md").read_text()
    assert f"Not measured: qlora in eval: {reason}." in report
    table = report.split("\n\n")[1].splitlines()[2:]  # the side-by-side table, after its header
    rows = {cells[0]: cells for cells in ([cell.strip() for cell in line.strip("|").split("|")] for line in table)}
    assert rows["qlora"][-1] == "skipped" and set(rows["qlora"][1:-1]) == {"-"}
    assert rows["base16"][-1] == "cpu + disk offload"
    assert rows["base16"][3].startswith(f"{evaluation['base16']['ppl']:.2f}")


def test_bench_runs_a_model_offloaded_to_disk(squeezed):
    exp, _, sizes = squeezed
    results = json.loads((exp / "bench" / "bench.json").read_text())["artifacts"]
    merged = results["merged"]
    assert merged["placement"] == "cpu + disk offload" and results["nf4"]["placement"] == "cpu"
    # eager only: accelerate's offload hooks are not compiled (the tests' bench.compile=merged compiles it otherwise)
    assert [(r["batch"], r["compiled"]) for r in merged["runs"]] == [(1, False), (2, False)]
    for r in merged["runs"]:
        assert r["prefill_ms"]["median"] > 0 and r["decode_tok_s"]["median"] > 0 and r["peak_memory_bytes"] > 0
    if sizes["budget"] < sizes["qlora"]:  # see squeezed
        assert "memory.max_memory" in results["qlora"]["skipped"] and "bench.artifacts" in results["qlora"]["skipped"]
        assert f"Not measured: qlora in bench: {results['qlora']['skipped']}." in (exp / "report.md").read_text()
    assert not (exp / "bench" / "offload").exists()


def test_placement_in_words():
    def model(device_map):
        return SimpleNamespace(hf_device_map=device_map)
    assert placed_on(model({"model": 0, "lm_head": 1})) == "cuda:0-1"
    assert placed_on(model({"model.embed_tokens": 0, "model.layers": 3, "lm_head": "cpu"})) == "cuda:0-3 + cpu offload"
    assert placed_on(model({"model.embed_tokens": "cpu", "model.layers": "disk"})) == "cpu + disk offload"
    assert placed_on(model({"": 2})) == "cuda:2"


def test_tensor_parallel_size():
    gb = 10**9
    assert tensor_parallel_size(140 * gb, [], 64) == 1, "vLLM's CPU build: one process"
    assert tensor_parallel_size(35 * gb, [70 * gb] * 8, 64) == 1
    assert tensor_parallel_size(71 * gb, [70 * gb] * 8, 64) == 2
    assert tensor_parallel_size(141 * gb, [70 * gb] * 8, 64) == 4, "3 GPUs would do, vLLM takes a power of two"
    assert tensor_parallel_size(141 * gb, [70 * gb] * 3, 64) is None, "4 needed, 3 visible"
    assert tensor_parallel_size(141 * gb, [70 * gb] * 8, 6) is None, "4 does not divide 6 heads"
    assert tensor_parallel_size(90 * gb, [80 * gb, 60 * gb], 32) == 2, "each share within the smallest budget"
    assert tensor_parallel_size(130 * gb, [80 * gb, 60 * gb], 32) is None


def test_eval_offloads_a_gptq_checkpoint_to_disk(copy_of, finished):
    """GPTQModel's layers (here the AWQ layout, the default) run from disk too: a budget that holds the embeddings
    and a layer, not the whole checkpoint."""
    exp, rerun = copy_of
    budget = weight_bytes(exp / "gptq", compute.dtype(compose_config(*finished[1]))) - 20_000
    rerun("stage=eval", "eval.artifacts=[gptq]", "eval.lm_eval.tasks=[]", f"+memory.max_memory.cpu={budget}")
    result = json.loads((exp / "eval" / "eval.json").read_text())["artifacts"]["gptq"]
    whole = json.loads((finished[0] / "default" / "eval" / "eval.json").read_text())["artifacts"]["gptq"]
    assert result["placement"] == "cpu + disk offload", result
    assert abs(result["ppl"] - whole["ppl"]) < 0.01 * whole["ppl"] and result["task_accuracy"] == whole["task_accuracy"]
