"""The whole chain on a tiny model, then the make-like caching: skip, invalidate downstream only, force, corrupt."""
from __future__ import annotations

import json
from functools import partial

import pytest

from pipeline.artifacts import read_manifest

from .conftest import drop

STAGES = ("base", "train", "merge", "gptq", "eval", "bench")


def statuses(results):
    return {stage: r["status"] if r["status"] in ("cached", "not run") else "ran" for stage, r in results.items()}


def test_full_chain_writes_every_artifact(finished):
    out, _, results = finished
    exp = out / "default"
    # the tiny settings turn serving off (tests/test_serve.py serves)
    assert statuses(results) == {**{stage: "ran" for stage in STAGES}, "serve": "not run"}
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
    assert gptq["quant_method"] == "gptq" and gptq["bits"] == 4 and gptq["desc_act"] is False
    assert gptq["group_size"] == 128  # the largest auto size dividing the tiny model's 128 and 256 inputs
    assert manifests["gptq"]["metrics"]["vllm_compatible"] is True
    assert manifests["gptq"]["upstream"]["merge"] == manifests["merge"]["fingerprint"]


def test_second_run_skips_every_stage(copy_of):
    exp, rerun = copy_of
    before = {stage: (exp / stage / "manifest.json").stat().st_mtime_ns for stage in STAGES}
    assert statuses(rerun()) == {**{stage: "cached" for stage in STAGES}, "serve": "not run"}
    assert before == {stage: (exp / stage / "manifest.json").stat().st_mtime_ns for stage in STAGES}


def test_gptq_change_reruns_only_gptq(copy_of):
    exp, rerun = copy_of
    merge_fingerprint = read_manifest(exp / "merge")["fingerprint"]
    assert statuses(rerun("gptq.bits=8")) == {"base": "cached", "train": "cached", "merge": "cached", "gptq": "ran",
                                              "eval": "ran", "bench": "ran", "serve": "not run"}
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
