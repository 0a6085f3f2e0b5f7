"""The streaming merge writes what the in-memory merge wrote, bit for bit, in shards, within a memory cap smaller
than the model; its check reproduces NF4 base + adapter as bitsandbytes computes it on both of its CPU paths, and
catches a merge into the original 16-bit weights (the common mistake, peft#2105) and a layer left unmerged;
merge.into=original merges into the 16-bit weights on purpose. Eval measures the NF4 artifacts the same whichever
path bitsandbytes computes on.

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
from pipeline.stages.merge import (MergeMismatch, check, compare, merge_into, probe_batch, probe_logits,
                                   save_config)

from .conftest import compose_config

HAS_AVX512_BF16 = bool(bnbf.has_avx512bf16())


def nf4_in_float32(model, cpu_packing: bool = False):
    """An NF4 model computing in float32 throughout: the unquantized weights cast to float32 (exact for 16-bit
    values), every 4-bit layer dequantizing to float32 (its quant state says bf16, which would round W_nf4). With
    `cpu_packing`, bitsandbytes may use its packed bf16 CPU kernel where the CPU has AVX512-BF16."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    for layer in nf4_layers(model):
        layer.compute_dtype = layer.weight.quant_state.dtype = torch.float32
        layer.support_avx512bf16_for_cpu = cpu_packing and layer.support_avx512bf16_for_cpu
    return model


def merged_in_memory(cfg, nf4_dir, adapter_dir):
    """The merge as it was before it streamed: the whole model, dequant(W_nf4) + BA in float32 through transformers
    and peft, from a freshly loaded NF4 checkpoint. The streaming merge must write the same bits."""
    nf4 = nf4_in_float32(load_causal_lm(nf4_dir, cfg.model, "float32"))
    dequantized = nf4.dequantize(dtype=torch.float32)
    dequantized._weight_conversions = None
    return PeftModel.from_pretrained(dequantized, adapter_dir).merge_and_unload()


def qlora_logits(cfg, nf4_dir, adapter_dir, batch, cpu_packing: bool) -> torch.Tensor:
    """NF4 base + adapter as transformers, bitsandbytes and peft compute it, on the given CPU path."""
    model = PeftModel.from_pretrained(nf4_in_float32(load_causal_lm(nf4_dir, cfg.model, "float32"), cpu_packing),
                                      adapter_dir)
    logits = probe_logits(model, batch)
    assert {repacked_for_cpu(layer) for layer in nf4_layers(model)} == {cpu_packing}
    return logits


def test_merge_check_is_exact(finished):
    out, _, _ = finished
    metrics = read_manifest(out / "default" / "merge")["metrics"]
    assert metrics["into"] == "nf4" and metrics["check"]["mode"].startswith("exact"), metrics
    assert metrics["check"]["argmax_agreement"] == 1.0 and metrics["check"]["mean_abs_logit_diff"] < 1e-4, metrics
    assert metrics["probe_bfloat16"]["argmax_agreement"] > 0.9, metrics


@pytest.mark.parametrize("cpu_path", ["standard", "packed"])
def test_streaming_merge_writes_the_in_memory_merge_bit_for_bit(finished, tmp_path, cpu_path):
    """Sharded as asked, loadable by transformers, every tensor equal to the in-memory merge's; and its layer-by-layer
    reference computes what NF4 base + adapter computes in transformers on either bitsandbytes CPU path."""
    if cpu_path == "packed" and not HAS_AVX512_BF16:
        pytest.skip("bitsandbytes computes on its packed CPU layout only where the CPU has AVX512-BF16")
    out, overrides, _ = finished
    cfg, exp = compose_config(*overrides, "merge.max_shard_size=200KB"), out / "default"
    nf4, adapter = exp / "base" / "nf4", exp / "train" / "adapter"
    batch = probe_batch(load_tokenizer(nf4), exp / "train", 4)

    reference, merged = merge_into(cfg, tmp_path, nf4, nf4, adapter, batch)
    save_config(nf4, tmp_path, torch.bfloat16)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2, "the 0.85 MB model in shards of at most 200 KB"

    expected = merged_in_memory(cfg, nf4, adapter).to(torch.bfloat16).state_dict()
    written = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert written.keys() == expected.keys()
    for key, tensor in expected.items():
        assert written[key].dtype == torch.bfloat16 and torch.equal(written[key], tensor), key

    bnb = qlora_logits(cfg, nf4, adapter, batch, cpu_packing=cpu_path == "packed")
    result = compare(bnb, reference)
    if cpu_path == "standard":  # float32 on both sides
        assert result["argmax_agreement"] == 1.0 and result["max_abs_logit_diff"] < 1e-4, result
    else:  # bitsandbytes' packed kernel computes in bf16
        assert result["argmax_agreement"] > 0.95 and result["mean_abs_logit_diff"] < 0.05, result
    assert compare(reference, merged)["max_abs_logit_diff"] < 1e-4


def test_check_catches_a_merge_into_the_16bit_weights_and_an_unmerged_layer(finished, tiny_model_dir, tmp_path):
    out, overrides, _ = finished
    cfg, exp = compose_config(*overrides), out / "default"
    nf4, adapter = exp / "base" / "nf4", exp / "train" / "adapter"
    batch = probe_batch(load_tokenizer(nf4), exp / "train", 8)

    (tmp_path / "right").mkdir(), (tmp_path / "wrong").mkdir()
    reference, merged = merge_into(cfg, tmp_path / "right", nf4, nf4, adapter, batch)
    assert check(cfg, reference, merged, exact=True)["argmax_agreement"] == 1.0
    _, into_original = merge_into(cfg, tmp_path / "wrong", nf4, tiny_model_dir, adapter, batch)
    with pytest.raises(MergeMismatch):
        check(cfg, reference, into_original, exact=True)

    model = merged_in_memory(cfg, nf4, adapter)
    assert check(cfg, reference, probe_logits(model, batch), exact=True)["argmax_agreement"] == 1.0
    layer = load_causal_lm(nf4, cfg.model, "float32").model.layers[1].mlp.down_proj
    model.model.layers[1].mlp.down_proj.weight.data = nf4_weight(layer)  # this one layer left unmerged
    with pytest.raises(MergeMismatch):
        check(cfg, reference, probe_logits(model, batch), exact=True)


def test_merge_into_the_original_weights(copy_of, tiny_model_dir):
    """merge.into=original: peft's merge into the 16-bit source weights, bit for bit, with its distance to
    NF4 base + adapter recorded, not judged."""
    exp, rerun = copy_of
    results = rerun("stage=merge", "merge.into=original")
    assert results["merge"]["status"].startswith("ran")
    metrics = read_manifest(exp / "merge")["metrics"]
    assert metrics["into"] == "original" and metrics["check"]["mode"].startswith("distance"), metrics
    assert metrics["check"]["mean_abs_logit_diff"] > 1e-3, "the original weights are not the ones trained on"

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = PeftModel.from_pretrained(original, exp / "train" / "adapter").merge_and_unload()
    written = AutoModelForCausalLM.from_pretrained(exp / "merge").state_dict()
    for key, tensor in expected.to(torch.bfloat16).state_dict().items():
        assert torch.equal(written[key], tensor), key


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

