"""Other model families through stage=all: tiny random models of the shapes users bring (the Llama one is the
`finished` fixture), with and without a chat template of their own."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from pipeline.artifacts import read_manifest
from pipeline.data import DEFAULT_CHAT_TEMPLATE
from pipeline.models import load_gptq
from pipeline.runner import run

from .conftest import TINY, build_tiny_model, compose_config

CHAT = [{"role": "user", "content": "Write the date 2024-02-29 in long form."},
        {"role": "assistant", "content": "February 29, 2024"}]


@pytest.mark.parametrize("architecture, chat_template", [
    ("qwen2", True), ("mistral", True), ("gemma", True), ("phi", False), ("gpt_neox", False)])
def test_stage_all_on_another_architecture(tmp_path, architecture, chat_template):
    model = build_tiny_model(tmp_path / architecture, architecture, chat_template)
    results = run(compose_config(f"output_dir={tmp_path / 'outputs'}", f"model.name_or_path={model}", *TINY,
                                 "eval.artifacts=[qlora,merged,gptq]", "bench.artifacts=[gptq]"))
    assert {stage: r["status"].split()[0] for stage, r in results.items()} == {
        "base": "ran", "train": "ran", "merge": "ran", "gptq": "ran", "gguf": "not", "eval": "ran", "bench": "ran",
        "serve": "not"}
    exp = tmp_path / "outputs" / "default"

    train = read_manifest(exp / "train")["metrics"]
    assert train["final_loss"] < train["first_loss"] - 0.4, train
    check = read_manifest(exp / "merge")["metrics"]["check"]
    assert check["mode"].startswith("exact") and check["argmax_agreement"] == 1.0, check
    # The default asymmetric grids, repacked into the AWQ layout: transformers loads them for eval, bench and below.
    assert json.loads((exp / "gptq" / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    # GPT-NeoX's AWQ readers also take activation scales (pipeline/awq.py): without them its perplexity was NaN.
    evaluation = json.loads((exp / "eval" / "eval.json").read_text())["artifacts"]
    assert evaluation["gptq"]["ppl"] < 1.5 * evaluation["merged"]["ppl"], evaluation

    # Every checkpoint formats prompts as training did (the default template where the model had none), and
    # turns end with the token generation stops on.
    template = (exp / "train" / "adapter" / "chat_template.jinja").read_text()
    assert (template == DEFAULT_CHAT_TEMPLATE) != chat_template
    expected = AutoTokenizer.from_pretrained(exp / "base" / "nf4").apply_chat_template(CHAT, tokenize=False)
    for checkpoint in (exp / "merge", exp / "gptq"):
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        assert tokenizer.apply_chat_template(CHAT, tokenize=False) == expected
        generation = json.loads((checkpoint / "generation_config.json").read_text())
        eos = generation["eos_token_id"]
        assert tokenizer.eos_token_id in (eos if isinstance(eos, list) else [eos])
        assert not generation.get("do_sample"), "a server decodes greedily unless asked otherwise"
    assert expected.count(AutoTokenizer.from_pretrained(exp / "gptq").eos_token) == 2

    gptq = load_gptq(exp / "gptq", torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(exp / "gptq")
    prompt = tokenizer.apply_chat_template(CHAT[:1], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = gptq.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
