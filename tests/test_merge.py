"""Both of bitsandbytes' CPU paths, on any CPU: the merged checkpoint reproduces NF4 base + adapter, which merging
into the original 16-bit weights (the common mistake, peft#2105) does not, and eval measures the NF4 artifacts the
same whichever path bitsandbytes computes on.

bitsandbytes repacks 4-bit weights in place on an eval forward where the CPU has AVX512-BF16 and then computes in
bf16; elsewhere it dequantizes and multiplies. The tests run both paths where they can: the standard path
everywhere (the packed kernel switched off, as on CPUs without the instruction), and the packed kernel where the
CPU has the instruction (elsewhere bitsandbytes has no kernel for that layout). The repacking itself is
bitsandbytes' own function, run on any CPU.
"""
from __future__ import annotations

import json

import bitsandbytes.functional as bnbf
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pipeline import harness
from pipeline.artifacts import read_manifest
from pipeline.data import read_jsonl, token_windows
from pipeline.models import load_artifact, load_causal_lm, load_tokenizer, nf4_layers, nf4_weight, repacked_for_cpu
from pipeline.quality import generate_answers, perplexity
from pipeline.stages.eval import ppl_texts
from pipeline.stages.merge import (MergeMismatch, check, compute_dtype, merged_in_float32, probe_batch,
                                   probe_logits, qlora_reference)

from .conftest import compose_config

HAS_AVX512_BF16 = bool(bnbf.has_avx512bf16())


def test_merge_check_is_exact(finished):
    out, _, _ = finished
    result = read_manifest(out / "default" / "merge")["metrics"]["check"]
    assert result["mode"].startswith("exact") and result["reference_compute_dtype"] == "float32", result
    assert result["argmax_agreement"] == 1.0 and result["mean_abs_logit_diff"] < 1e-4, result


@pytest.mark.parametrize("reference_path", ["float32", "bfloat16", "packed_cpu_kernel"])
def test_check_passes_the_merge_and_catches_merging_into_the_16bit_weights(finished, tiny_model_dir,
                                                                           reference_path):
    if reference_path == "packed_cpu_kernel" and not HAS_AVX512_BF16:
        pytest.skip("bitsandbytes computes on its packed CPU layout only where the CPU has AVX512-BF16")
    out, overrides, _ = finished
    cfg, exp = compose_config(*overrides), out / "default"
    nf4, adapter = exp / "base" / "nf4", exp / "train" / "adapter"
    batch = probe_batch(load_tokenizer(nf4), exp / "train", 8)

    merged = merged_in_float32(cfg, nf4, adapter)
    reference = qlora_reference(cfg, nf4, adapter, cpu_packing=reference_path == "packed_cpu_kernel")
    if reference_path == "bfloat16":
        for layer in nf4_layers(reference):
            layer.compute_dtype = torch.bfloat16
    reference_logits = probe_logits(reference, batch)
    dtype = compute_dtype(reference)
    assert dtype == (torch.float32 if reference_path == "float32" else torch.bfloat16)
    assert all(repacked_for_cpu(layer) for layer in nf4_layers(reference)) == (reference_path == "packed_cpu_kernel")

    result = check(cfg, reference_logits, dtype, merged, batch)
    assert result["mode"].startswith("exact" if reference_path == "float32" else "tolerance"), result

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    wrong = PeftModel.from_pretrained(original, adapter).merge_and_unload()
    with pytest.raises(MergeMismatch):
        check(cfg, reference_logits, dtype, wrong, batch)


def test_repacked_nf4_weights_are_refused_not_misread(finished):
    out, overrides, _ = finished
    cfg = compose_config(*overrides)
    model = load_causal_lm(out / "default" / "base" / "nf4", cfg.model, "float32")
    layer = nf4_layers(model)[0]
    exact = nf4_weight(layer)

    # What an eval forward does to the weights on CPUs with AVX512-BF16, through bitsandbytes' own function.
    layer.weight.data, layer.weight.quant_state = bnbf._convert_weight_packed_for_cpu(layer.weight.data,
                                                                                      layer.weight.quant_state)
    misread = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert (misread - exact).abs().mean() > 0.5 * exact.abs().mean(), "read as NF4, the packed bytes are garbage"
    with pytest.raises(RuntimeError, match="repacked"):
        nf4_weight(layer)


def test_an_eval_forward_repacks_exactly_where_the_cpu_has_avx512_bf16(finished):
    """The premise of the tests above, checked on the machine they run on."""
    out, overrides, _ = finished
    cfg = compose_config(*overrides)
    model = load_causal_lm(out / "default" / "base" / "nf4", cfg.model, "bfloat16").eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert {repacked_for_cpu(layer) for layer in nf4_layers(model)} == {HAS_AVX512_BF16}


@pytest.mark.parametrize("name", ["nf4", "qlora"])
def test_eval_measures_nf4_artifacts_alike_on_both_cpu_paths(finished, name, tmp_path):
    """The standard path (forced here even on a CPU with AVX512-BF16) reproduces what the eval stage measured on
    this machine's own path, lm-eval's bits per byte included; where the CPU has the instruction, the packed path
    gives the same answers too."""
    out, overrides, _ = finished
    cfg, exp = compose_config(*overrides), out / "default"
    inputs = {stage: exp / stage for stage in ("base", "train", "merge", "gptq")}
    tokenizer = load_tokenizer(exp / "base" / "nf4")
    windows = token_windows(tokenizer, ppl_texts(cfg, tokenizer, exp / "train"), cfg.eval.ppl_seq_len)
    chats = [row["messages"] for row in read_jsonl(exp / "train" / "data" / "heldout.jsonl")][:cfg.eval.task_examples]
    measured = json.loads((exp / "eval" / "eval.json").read_text())["artifacts"][name]
    texts = [tokenizer.decode(window, skip_special_tokens=True) for window in windows[:cfg.eval.ppl_windows]]
    task = harness.own_tasks(tmp_path, texts, [], tokenizer)["pipeline_text"]  # on the text eval scored
    manager = harness.task_manager(None, defaults=False)

    def evaluate(packed: bool) -> tuple[float, list[str], float]:
        model = load_artifact(name, inputs, cfg).eval()
        for layer in nf4_layers(model):
            layer.support_avx512bf16_for_cpu = packed
        result = (perplexity(model, windows[:cfg.eval.ppl_windows]),
                  generate_answers(model, tokenizer, chats, max_new_tokens=cfg.eval.max_new_tokens),
                  harness.evaluate(model, tokenizer, [task], manager,
                                   cfg.eval.lm_eval)["pipeline_text"]["bits_per_byte"])
        assert {repacked_for_cpu(layer) for layer in nf4_layers(model)} == {packed}
        return result

    ppl, answers, bits_per_byte = evaluate(packed=False)
    assert abs(ppl - measured["ppl"]) < 0.01 * measured["ppl"], (ppl, measured["ppl"])
    accuracy = sum(a == chat[-1]["content"].strip() for a, chat in zip(answers, chats)) / len(chats)
    assert accuracy == measured["task_accuracy"]
    measured_bpb = measured["lm_eval"]["pipeline_text"]["bits_per_byte"]
    assert abs(bits_per_byte - measured_bpb) < 0.01 * measured_bpb, (bits_per_byte, measured_bpb)
    if HAS_AVX512_BF16:
        packed_ppl, packed_answers, packed_bpb = evaluate(packed=True)
        assert abs(packed_ppl - ppl) < 0.01 * ppl
        assert sum(a == b for a, b in zip(answers, packed_answers)) >= 0.75 * len(chats)
        assert abs(packed_bpb - bits_per_byte) < 0.01 * bits_per_byte
