"""The GPTQ output is a standard checkpoint: plain transformers loads it, and it stays close to the merged model."""
from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from pipeline.data import read_jsonl
from pipeline.models import load_tokenizer
from pipeline.quality import generate_answers
from pipeline.stages.gptq import choose_group_size, vllm_problems
from pipeline.stages.merge import compare, probe_batch, probe_logits



def test_gptq_checkpoint_loads_with_plain_transformers(finished):
    out, _, _ = finished
    exp = out / "default"
    files = {p.name for p in (exp / "gptq").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "quantize_config.json"} <= files

    gptq = AutoModelForCausalLM.from_pretrained(exp / "gptq", device_map="cpu")
    assert any(hasattr(m, "qweight") for m in gptq.modules()), "loaded as a quantized model"
    merged = AutoModelForCausalLM.from_pretrained(exp / "merge", dtype=torch.bfloat16)
    tokenizer = load_tokenizer(exp / "gptq")
    batch = probe_batch(tokenizer, exp / "train", 8)
    closeness = compare(probe_logits(merged, batch), probe_logits(gptq, batch))
    assert closeness["argmax_agreement"] > 0.8, closeness

    chats = [row["messages"] for row in read_jsonl(exp / "train" / "data" / "heldout.jsonl")[:4]]
    answers = generate_answers(gptq, tokenizer, chats, max_new_tokens=8)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)


def test_group_size_choice_and_vllm_checks():
    smollm2 = {576, 1536}
    assert choose_group_size(None, smollm2) == 64  # 128 does not divide 576
    assert choose_group_size(None, {128, 256}) == 128
    assert choose_group_size(32, smollm2) == 32
    assert vllm_problems(False, 64, smollm2) == []
    problems = vllm_problems(True, 128, smollm2)
    assert len(problems) == 2 and "desc_act" in problems[0] and "576" in problems[1]


def test_non_default_settings_are_recorded(finished):
    out, _, _ = finished
    manifest = json.loads((out / "default" / "gptq" / "manifest.json").read_text())
    assert manifest["config"]["gptq"]["bits"] == 4
    assert manifest["metrics"]["kernel"]  # the kernel GPTQModel picked on this device
