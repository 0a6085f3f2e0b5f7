"""Merge exactness: the merged checkpoint reproduces NF4 base + adapter, which merging into the original
16-bit weights (the common mistake, peft#2105) does not."""
from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pipeline.artifacts import read_manifest
from pipeline.models import load_tokenizer
from pipeline.stages.merge import compare, probe_batch, probe_logits, qlora_in_float32

from .conftest import compose_config


def test_merge_is_exact_in_float32(finished):
    out, _, _ = finished
    probe = read_manifest(out / "default" / "merge")["metrics"]["probe_float32"]
    assert probe["argmax_agreement"] == 1.0 and probe["mean_abs_logit_diff"] < 1e-4, probe


def test_merged_checkpoint_is_nf4_plus_adapter_not_original_plus_adapter(finished, tiny_model_dir):
    out, overrides, _ = finished
    exp = out / "default"
    adapter = exp / "train" / "adapter"
    batch = probe_batch(load_tokenizer(exp / "merge"), exp / "train", 8)
    reference = probe_logits(qlora_in_float32(compose_config(*overrides), exp / "base" / "nf4", adapter), batch)

    merged = AutoModelForCausalLM.from_pretrained(exp / "merge", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    wrong = PeftModel.from_pretrained(original, adapter).merge_and_unload()
    good, bad = compare(reference, probe_logits(merged, batch)), compare(reference, probe_logits(wrong, batch))
    assert good["argmax_agreement"] >= 0.99
    assert good["mean_abs_logit_diff"] < 0.25 * bad["mean_abs_logit_diff"], (good, bad)
