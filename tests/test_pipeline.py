"""The whole chain on a tiny model, then the make-like caching: skip, invalidate downstream only, force, corrupt; and
the whole chain with every key at its smallest value."""
from __future__ import annotations

import json
import shutil
from functools import partial

import pytest
from safetensors import safe_open

from pipeline import card, compute, runner
from pipeline.artifacts import exclusive, library_versions, read_manifest
from pipeline.compute import Machine
from pipeline.runner import run

from .conftest import TINY, compose_config, drop

STAGES = ("base", "train", "merge", "gptq", "eval", "bench")


def statuses(results):
    return {stage: r["status"] if r["status"] in ("cached", "not run") else "ran" for stage, r in results.items()}


def test_full_chain_writes_every_artifact(finished):
    out, _, results = finished
    exp = out / "default"
    # the tiny settings turn serving off (tests/test_serve.py serves)
    assert statuses(results) == {**{stage: "ran" for stage in STAGES}, "gguf": "not run", "serve": "not run"}
    manifests = {stage: read_manifest(exp / stage) for stage in STAGES}
    for stage, manifest in manifests.items():
        assert manifest["stage"] == stage and manifest["seconds"] > 0
        assert all((exp / stage / name).stat().st_size == size for name, size in manifest["files"].items())
    assert not list((out / "store").glob(".*.partial")), "no working directory is left behind"
    assert all((exp / stage).is_symlink() for stage in STAGES), "the experiment links to the store"

    base = manifests["base"]["metrics"]
    assert base["nf4_memory_bytes"] < base["sixteen_bit_memory_bytes"]
    train = manifests["train"]["metrics"]
    assert train["steps"] == 12 and train["final_loss"] < train["first_loss"] - 0.4
    assert (exp / "train" / "adapter" / "adapter_model.safetensors").is_file()
    assert len((exp / "train" / "data" / "heldout.jsonl").read_text().splitlines()) == 16
    assert manifests["merge"]["metrics"]["check"]["argmax_agreement"] == 1.0

    gptq = json.loads((exp / "gptq" / "config.json").read_text())["quantization_config"]
    # Asymmetric grids (the default), in the AWQ layout vLLM serves them in: zero points, no g_idx.
    assert gptq["quant_method"] == "awq" and gptq["bits"] == 4 and gptq["zero_point"] is True
    assert gptq["version"] == "gemm" and gptq["desc_act"] is False and "sym" not in gptq
    assert gptq["group_size"] == 128  # the largest auto size dividing the tiny model's 128 and 256 inputs
    tensors = safe_open(exp / "gptq" / "model.safetensors", "pt").keys()
    assert "model.layers.0.mlp.down_proj.qzeros" in tensors and not [name for name in tensors if "g_idx" in name]
    assert manifests["gptq"]["metrics"]["vllm_compatible"] is True
    assert manifests["gptq"]["upstream"]["merge"] == manifests["merge"]["fingerprint"]
    for stage in STAGES[:-1]:  # the memory plan's prediction beside the measured peak (serve did not run)
        assert_predicted_within(manifests[stage], 1.5)
    for stage, manifest in manifests.items():  # the predicted time beside the measured one (their ratio: a script's)
        predicted = manifest["predicted_seconds"]
        assert predicted["seconds"] > 0 and predicted["terms"]["fixed"] > 0, (stage, predicted)


def assert_predicted_within(manifest: dict, factor: float) -> None:
    """The memory plan's predicted peak of a stage is within `factor` of the peak measured while it ran."""
    predicted, measured = manifest["predicted_peak_memory"], manifest["peak_memory"]["host_rss_bytes"]
    assert predicted["where"] == "cpu" and predicted["bytes"] <= predicted["available_bytes"]
    assert 1 / factor < predicted["bytes"] / measured < factor, (manifest["stage"], predicted, measured)


def test_second_run_skips_every_stage(copy_of):
    exp, rerun = copy_of
    before = {stage: (exp / stage / "manifest.json").stat().st_mtime_ns for stage in STAGES}
    assert statuses(rerun()) == {**{stage: "cached" for stage in STAGES}, "gguf": "not run", "serve": "not run"}
    assert before == {stage: (exp / stage / "manifest.json").stat().st_mtime_ns for stage in STAGES}


def test_gptq_change_reruns_only_gptq(copy_of):
    exp, rerun = copy_of
    merge_fingerprint = read_manifest(exp / "merge")["fingerprint"]
    assert statuses(rerun("gptq.bits=8")) == {"base": "cached", "train": "cached", "merge": "cached", "gptq": "ran",
                                              "gguf": "not run", "eval": "ran", "bench": "ran", "serve": "not run"}
    assert json.loads((exp / "gptq" / "config.json").read_text())["quantization_config"]["bits"] == 8
    assert read_manifest(exp / "merge")["fingerprint"] == merge_fingerprint


def test_train_change_reruns_train_and_what_follows(copy_of):
    exp, rerun = copy_of
    assert statuses(rerun("stage=gptq", "train.lora_r=4")) == {"base": "cached", "train": "ran", "merge": "ran",
                                                               "gptq": "ran"}
    assert read_manifest(exp / "train")["config"]["train"]["lora_r"] == 4


def test_force_reruns_the_named_stage_only(copy_of):
    exp, rerun = copy_of
    assert statuses(rerun("stage=merge", "force=true")) == {"base": "cached", "train": "cached", "merge": "ran"}


def test_stage_alone_uses_cached_upstream(copy_of):
    exp, rerun = copy_of
    drop(exp, "gptq")
    assert statuses(rerun("stage=gptq")) == {"base": "cached", "train": "cached", "merge": "cached", "gptq": "ran"}


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest"])
def test_damaged_artifact_is_rebuilt_not_loaded(copy_of, damage):
    exp, rerun = copy_of
    rerun = partial(rerun, "stage=gptq")
    weights = exp / "merge" / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "delete":
        weights.unlink()
    else:
        (exp / "merge" / "manifest.json").write_text("{not json")
    # merge is rebuilt; gptq's inputs have the same fingerprint, so it stays (like make with identical content)
    assert statuses(rerun())["merge"] == "ran"
    assert read_manifest(exp / "merge")["files"]["model.safetensors"] == weights.stat().st_size > 1000


# Every numeric key stage=all reads at its smallest legal value (pipeline/config.py validate refuses smaller ones),
# except train.logging_steps: kept above train.max_steps, a run shorter than the logging interval (issue #30).
# data.max_seq_len is left out, and serve.max_model_len is only validated: their smallest workable values depend on
# the data (too short: refused in one line by the train and serve stages).
SMALLEST = [
    "data.builtin_examples=2", "data.heldout_examples=1",  # one row to train on, one held out
    "train.max_steps=1", "train.logging_steps=2", "train.save_steps=1", "train.eval_steps=1", "train.batch_size=1",
    "train.grad_accum=1", "train.warmup_steps=0", "train.lora_r=1", "train.lora_alpha=1", "train.lora_dropout=0",
    "train.weight_decay=0",
    "merge.probe_examples=1", "merge.min_argmax_agreement=0",
    "gptq.bits=2", "gptq.group_size=16", "gptq.mse=0", "gptq.calib_samples=1", "gptq.calib_seq_len=11",
    "gptq.batch_size=1", "gptq.refine=quantease", "gptq.refine_sweeps=1",
    "eval.ppl_windows=1", "eval.ppl_seq_len=2", "eval.task_examples=1", "eval.max_new_tokens=1", "eval.batch_size=1",
    "eval.lm_eval.batch_size=1", "eval.lm_eval.limit=1", "eval.lm_eval.num_fewshot=0",
    "bench.prompt_len=1", "bench.warmup=0", "bench.repeats=1", "bench.cpu.new_tokens=[2]", "bench.cpu.batch_sizes=[1]",
    # validated only: serving stays off (TINY), vLLM takes minutes to start (tests/test_serve.py serves)
    "serve.task_examples=1", "serve.max_new_tokens=1", "serve.load_max_tokens=1", "serve.max_model_len=2",
    "serve.requests=1", "serve.concurrency=[1]", "serve.cpu_kv_cache_gb=1",
    "lock.timeout_s=0",
    "train.report_to=[tensorboard]",  # the loss reaches the trackers too
]


@pytest.fixture(scope="module")
def smallest(tiny_model_dir, tmp_path_factory):
    """stage=all with every key at its smallest value: (config, experiment folder, results)."""
    out = tmp_path_factory.mktemp("smallest") / "outputs"
    cfg = compose_config(f"output_dir={out}", f"model.name_or_path={tiny_model_dir}", *TINY, *SMALLEST)
    return cfg, out / cfg.experiment, run(cfg)


def test_every_key_at_its_smallest_value_runs_to_the_end(smallest):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, exp, results = smallest
    assert statuses(results) == {**{stage: "ran" for stage in STAGES}, "gguf": "not run", "serve": "not run"}
    manifest = read_manifest(exp / "train")
    train = manifest["metrics"]
    # One step, fewer than train.logging_steps: its loss is recorded all the same.
    assert train["steps"] == 1 and train["first_loss"] == train["final_loss"] > 0 and train["final_heldout_loss"] > 0
    losses = json.loads((exp / "train" / "loss.json").read_text())
    assert [(e["step"], e["loss"]) for e in losses if "loss" in e] == [(1, train["final_loss"])]
    events = EventAccumulator(str(exp / "tracking" / "tensorboard" / f"train-{manifest['fingerprint']}")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1]
    evaluation = json.loads((exp / "eval" / "eval.json").read_text())
    assert evaluation["ppl_windows"] == 1 and evaluation["task_examples"] == 1
    bench = json.loads((exp / "bench" / "bench.json").read_text())
    assert [(r["new_tokens"], r["batch"]) for r in bench["artifacts"]["gptq"]["runs"]] == [(2, 1)]
    assert "| gptq |" in (exp / "report.md").read_text()
    body = (exp / "gptq" / "README.md").read_text()
    assert f"| {train['first_loss']:.4f} -> {train['final_loss']:.4f} |" in body and "| 2 | 16 | gptq |" in body


def test_nothing_held_out_runs_to_the_end(tiny_model_dir, tmp_path):
    """data.heldout_examples=0, its smallest value (then train.eval_steps must be null): the merge probes training
    rows, and eval, the report and the card have no task accuracy to show."""
    cfg = compose_config(f"output_dir={tmp_path}", f"model.name_or_path={tiny_model_dir}", *TINY, *SMALLEST,
                         "data.heldout_examples=0", "data.builtin_examples=1", "train.eval_steps=null")
    assert statuses(run(cfg)) == {**{stage: "ran" for stage in STAGES}, "gguf": "not run", "serve": "not run"}
    exp = tmp_path / cfg.experiment
    train = read_manifest(exp / "train")["metrics"]
    assert train["heldout_rows"] == 0 and train["final_loss"] > 0 and train["final_heldout_loss"] is None
    evaluation = json.loads((exp / "eval" / "eval.json").read_text())
    assert evaluation["task_examples"] == 0 and evaluation["artifacts"]["gptq"]["task_accuracy"] is None
    assert "| gptq |" in (exp / "report.md").read_text() and (exp / "gptq" / "README.md").is_file()


def test_card_of_a_cached_train_manifest_without_a_loss(smallest, tmp_path):
    """Before every run logged its last step, a run shorter than train.logging_steps recorded no loss; such train
    artifacts stay cached (that fix left their fingerprint as it was), and their card says so instead of failing."""
    cfg, exp, _ = smallest
    copy = shutil.copytree(exp, tmp_path / exp.name)  # symlinks followed: the store's artifacts stay as they are
    manifest = json.loads((copy / "train" / "manifest.json").read_text())
    manifest["metrics"].update(first_loss=None, final_loss=None)
    (copy / "train" / "manifest.json").write_text(json.dumps(manifest))
    assert "| - -> - |" in card.write(cfg, copy).read_text()


def edited_package(tmp_path, monkeypatch, module: str, line: str):
    """Fingerprints computed over a copy of the package with `line` appended to `module` ("stages/merge.py")."""
    package = tmp_path / "pipeline"
    shutil.copytree(runner.PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(package / module, "a") as f:
        f.write(f"\n{line}\n")
    monkeypatch.setattr(runner, "PACKAGE", package)
    runner.code_identity.cache_clear()


def changed(before: dict, after: dict) -> set[str]:
    return {stage for stage in before if before[stage] != after[stage]}


DOWNSTREAM_OF_MERGE = {"merge", "gptq", "gguf", "eval", "bench", "serve"}


@pytest.mark.parametrize("module, line, stale", [
    ("stages/merge.py", "# a comment changes no result", set()),
    ("stages/merge.py", "CHANGED = 1", DOWNSTREAM_OF_MERGE),  # the merge's code: the merge and what follows
    ("models.py", "CHANGED = 1", {"base", "train"} | DOWNSTREAM_OF_MERGE),  # every stage loads models with it
    ("quality.py", "CHANGED = 1", {"gguf", "eval", "serve"}),  # perplexity and task scores
    ("report.py", "CHANGED = 1", set()),  # no stage computes with the report
])
def test_a_code_change_makes_exactly_the_stages_that_run_it_stale(tiny_model_dir, tmp_path, monkeypatch, module,
                                                                   line, stale):
    cfg = compose_config(f"model.name_or_path={tiny_model_dir}")
    before = runner.fingerprints(cfg)
    edited_package(tmp_path, monkeypatch, module, line)
    try:
        assert changed(before, runner.fingerprints(cfg)) == stale
    finally:
        runner.code_identity.cache_clear()


def test_a_library_upgrade_makes_the_stages_that_compute_with_it_stale(tiny_model_dir, monkeypatch):
    cfg = compose_config(f"model.name_or_path={tiny_model_dir}")
    before = runner.fingerprints(cfg)
    for library, stale in (("bitsandbytes", {"base", "train", "merge", "gptq", "gguf", "eval", "bench", "serve"}),
                           ("lm_eval", {"eval"}), ("gptqmodel", {"gptq", "eval", "bench", "serve"})):
        versions = {**library_versions(), library: "99.0"}
        monkeypatch.setattr(runner, "library_versions", lambda: versions)
        assert changed(before, runner.fingerprints(cfg)) == stale, library


def test_what_a_stage_resolves_from_the_machine_is_in_its_fingerprint(tiny_model_dir, monkeypatch):
    """A store shared by a CPU node and a GPU node (the README's cluster example) hands neither the other's adapter,
    GPTQ checkpoint (gptq.mse=null resolves by device) or measurements; the NF4 base is the same bytes."""
    cfg = compose_config(f"model.name_or_path={tiny_model_dir}", "compute_dtype=bfloat16")  # the same on both
    on_cpu = runner.fingerprints(cfg)
    monkeypatch.setattr(compute, "machine", lambda: Machine(True, True, False, "AVX2", "1x NVIDIA H100 (80 GiB)"))
    on_gpu = runner.fingerprints(cfg)
    assert changed(on_cpu, on_gpu) == {"train", "merge", "gptq", "gguf", "eval", "bench", "serve"}
    monkeypatch.setattr(compute, "machine", lambda: Machine(True, True, False, "AVX2", "2x NVIDIA H100 (80 GiB)"))
    assert changed(on_gpu, runner.fingerprints(cfg)) == {"gguf", "eval", "bench", "serve"}  # what they measure


def test_a_run_keeps_other_inputs_partial_work_and_clean_removes_what_no_process_holds(copy_of):
    """A requeued SLURM job waits in the queue with its lock released: its checkpoints must outlive the runs of
    other sweep points meanwhile. `clean=true` is the one way partial work goes."""
    exp, rerun = copy_of
    store = exp.parent / "store"
    queued, building = store / ".merge-0123456789abcdef.partial", store / ".merge-fedcba9876543210.partial"
    for work in (queued, building):
        (work / "checkpoints").mkdir(parents=True)
        (work / "checkpoints" / "state.bin").write_bytes(b"x" * 1000)
    assert statuses(rerun("stage=merge", "force=true"))["merge"] == "ran"
    assert (queued / "checkpoints" / "state.bin").is_file() and (building / "checkpoints" / "state.bin").is_file()

    with exclusive(building.with_suffix(".lock"), "a build in progress"):
        assert rerun("clean=true") == {}
    assert not queued.exists() and (building / "checkpoints" / "state.bin").is_file()
    assert all((exp / stage / "manifest.json").is_file() for stage in STAGES), "clean removes no artifact"


def test_raising_the_memory_budget_measures_what_was_skipped_for_lack_of_room(tiny_model_dir):
    """The skip's message says to raise memory.max_memory: the next run must measure the artifact, not return the
    cached skip. Placement changes nothing upstream of eval, bench and serve."""
    model = f"model.name_or_path={tiny_model_dir}"
    before = runner.fingerprints(compose_config(model))
    after = runner.fingerprints(compose_config(model, "+memory.max_memory.cpu=64GiB"))
    assert changed(before, after) == {"eval", "bench", "serve"}
