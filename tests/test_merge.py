"""Merge exactness: the merged checkpoint reproduces NF4 base + adapter, which merging into the original
16-bit weights (the common mistake, peft#2105) does not."""
from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pipeline.models import load_tokenizer
from pipeline.stages.merge import compare, probe_batch, probe_logits

from .test_pipeline import finished  # noqa: F401  (the module-scoped finished run)


def test_merged_equals_nf4_plus_adapter_not_original_plus_adapter(finished, tiny_model_dir):  # noqa: F811
    out, _, _ = finished
    exp = out / "default"
    tokenizer = load_tokenizer(exp / "merge")
    batch = probe_batch(tokenizer, exp / "train", 8)

    nf4 = AutoModelForCausalLM.from_pretrained(exp / "base" / "nf4", dtype=torch.bfloat16, device_map="cpu")
    reference = probe_logits(PeftModel.from_pretrained(nf4, exp / "train" / "adapter"), batch)
    merged = probe_logits(AutoModelForCausalLM.from_pretrained(exp / "merge", dtype=torch.bfloat16), batch)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    wrong = probe_logits(PeftModel.from_pretrained(original, exp / "train" / "adapter").merge_and_unload(), batch)

    good, bad = compare(reference, merged), compare(reference, wrong)
    assert good["argmax_agreement"] >= 0.98
    assert good["mean_abs_logit_diff"] < 0.25 * bad["mean_abs_logit_diff"], (good, bad)
