"""The GPTQ output loads in plain transformers and stays close to the merged model, in either layout: GPTQModel's
GPTQ one, or the AWQ one repacked from it without changing a weight."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import awq, models, quantease
from pipeline.artifacts import read_manifest
from pipeline.config import ConfigError
from pipeline.data import read_jsonl
from pipeline.models import dequantized, first_that_loads, load_gptq, load_portable, load_tokenizer
from pipeline.quality import generate_answers
from pipeline.stages import gptq as gptq_stage
from pipeline.stages.gptq import check_rules_match, choose_group_size, mse_exponent, vllm_problems
from pipeline.stages.merge import compare, probe_batch, probe_logits

from .conftest import compose_config


def test_gptq_checkpoint_loads_with_plain_transformers(finished):
    out, _, _ = finished
    exp = out / "default"
    files = {p.name for p in (exp / "gptq").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "quantize_config.json"} <= files
    for name in ("config.json", "quantize_config.json"):  # a shipped checkpoint names no folder of its build
        assert str(out) not in (exp / "gptq" / name).read_text(), name

    gptq = AutoModelForCausalLM.from_pretrained(exp / "gptq", device_map="cpu")
    assert any(hasattr(m, "qweight") for m in gptq.modules()), "loaded as a quantized model"
    merged = AutoModelForCausalLM.from_pretrained(exp / "merge", dtype=torch.float32)
    tokenizer = load_tokenizer(exp / "gptq")
    batch = probe_batch(tokenizer, exp / "train", 8)
    closeness = compare(probe_logits(merged, batch), probe_logits(gptq, batch))
    assert closeness["argmax_agreement"] > 0.8, closeness

    chats = [row["messages"] for row in read_jsonl(exp / "train" / "data" / "heldout.jsonl")[:4]]
    answers = generate_answers(gptq, tokenizer, chats, max_new_tokens=8)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)


def smollm2_linears(layers: int = 2) -> dict[str, int]:
    """The names and input sizes of the layers GPTQ quantizes in SmolLM2 (a Llama), for its first layers."""
    sizes = {"self_attn.q_proj": 576, "self_attn.k_proj": 576, "self_attn.v_proj": 576, "self_attn.o_proj": 576,
             "mlp.gate_proj": 576, "mlp.up_proj": 576, "mlp.down_proj": 1536}
    return {f"model.layers.{i}.{name}": size for i in range(layers) for name, size in sizes.items()}


def test_group_size_choice_and_vllm_checks():
    smollm2 = {576, 1536}
    assert choose_group_size(None, smollm2) == 64  # 128 does not divide 576
    assert choose_group_size(None, {128, 256}) == 128
    assert choose_group_size(32, smollm2) == 32
    assert vllm_problems(compose_config().gptq, 64, smollm2_linears()) == []  # asymmetric, in the AWQ layout
    assert vllm_problems(compose_config("gptq.sym=true").gptq, 64, smollm2_linears()) == []  # symmetric GPTQ
    assert vllm_problems(compose_config("gptq.bits=8", "gptq.sym=true").gptq, 64, smollm2_linears()) == []
    asymmetric_gptq = vllm_problems(compose_config("gptq.format=gptq").gptq, 64, smollm2_linears())
    assert len(asymmetric_gptq) == 1 and "sym=false in the GPTQ layout" in asymmetric_gptq[0], asymmetric_gptq
    problems = vllm_problems(compose_config("gptq.desc_act=true", "gptq.bits=3", "gptq.sym=false").gptq, 128,
                             smollm2_linears())
    assert len(problems) == 4, problems
    assert [word in problem for word, problem in zip(("desc_act", "bits=3", "sym", "576"), problems)] == [True] * 4
    assert "model.layers.0.self_attn.q_proj and 11 more" in problems[3]  # one line, not one per module


@pytest.mark.parametrize("rules, problem", [
    ("{model.layers.1.mlp.down_proj:{bits:8}}", None),  # vLLM mixes 4 and 8 bits across its layers
    ("{-\\:.*down_proj:{}}", None),  # and 16-bit ones
    ("{.*down_proj:{group_size:128}}", None),  # 128 divides down_proj's 1536
    ("{.*o_proj:{group_size:128}}", "group_size=128 does not divide the input size 576 of "
                                    "model.layers.0.self_attn.o_proj and 1 more"),
    ("{.*down_proj:{bits:3}}", "gptq.dynamic['.*down_proj']: bits=3: vLLM's GPTQ kernels take 4 or 8 bits"),
    ("{.*q_proj:{bits:8}}", "gptq.dynamic treats the parts of qkv_proj (q_proj, k_proj, v_proj) differently in "
                            "model.layers.0.self_attn, model.layers.1.self_attn"),
    ("{-\\:model.layers.0.mlp.up_proj:{}}", "parts of gate_up_proj (gate_proj, up_proj) differently in "
                                              "model.layers.0.mlp:"),
])
def test_dynamic_rules_vllm_serves_and_refuses(rules, problem):
    g = compose_config(f"gptq.dynamic={rules}", "gptq.sym=true").gptq
    problems = vllm_problems(g, 64, smollm2_linears())
    assert problems == [] if problem is None else (len(problems) == 1 and problem in problems[0]), problems


def test_a_dynamic_rule_matching_no_layer_is_an_error():
    check_rules_match(compose_config("gptq.dynamic={.*down_proj:{bits:8}}").gptq, smollm2_linears())
    with pytest.raises(ConfigError, match="gptq.dynamic\\['.*dwn_proj'\\] matches no layer GPTQ quantizes"):
        check_rules_match(compose_config("gptq.dynamic={.*dwn_proj:{bits:8}}").gptq, smollm2_linears())


def test_non_default_settings_are_recorded(finished):
    out, _, _ = finished
    manifest = json.loads((out / "default" / "gptq" / "manifest.json").read_text())
    assert manifest["config"]["gptq"]["bits"] == 4
    evaluated = json.loads((out / "default" / "eval" / "eval.json").read_text())["artifacts"]["gptq"]
    assert evaluated["kernels"]  # the kernel it loads with here, named by eval as it loads it
    assert manifest["config"]["gptq"]["mse"] is None  # null in the config, resolved for this device in the metrics
    assert manifest["metrics"]["mse"] == (2.4 if torch.cuda.is_available() else 0.0)
    assert manifest["config"]["gptq"]["sym"] is False and manifest["metrics"]["format"] == "awq"
    losses = manifest["metrics"]["highest_losses"]  # by full layer name, for gptq.dynamic rules
    assert len(losses) == 5 and list(losses.values()) == sorted(losses.values(), reverse=True), losses
    assert all(name.startswith("model.layers.") and name.endswith("_proj") for name in losses), losses


def test_the_gptq_stage_does_not_load_the_checkpoint_it_wrote(copy_of, monkeypatch):
    """Loading it after quantizing (to name its kernel) put the whole checkpoint on one GPU outside the memory plan,
    where an out-of-memory threw the quantization away: eval names the kernel as it loads each artifact."""
    exp, rerun = copy_of
    loads = []

    def spy(*args, **kwargs):
        loads.append(args)
        return load_gptq(*args, **kwargs)
    monkeypatch.setattr(models, "load_gptq", spy)
    monkeypatch.setattr(gptq_stage, "load_gptq", spy, raising=False)  # as a stage imports it
    assert rerun("stage=gptq", "force=true")["gptq"]["status"].startswith("ran")
    assert loads == [] and read_manifest(exp / "gptq")["metrics"]["format"] == "awq"


def test_a_kernel_that_cannot_load_is_a_warning_and_out_of_memory_is_raised(caplog):
    def refuses():
        raise ValueError("no kernel for group size 48")

    def allocates_too_much():
        return torch.empty(2**62, dtype=torch.uint8)  # a real allocation this host refuses

    with caplog.at_level(logging.WARNING, logger="pipeline.models"):
        assert first_that_loads({"fast": refuses, "portable": lambda: "loaded"}, "GPTQ kernel", "ckpt") == "loaded"
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "GPTQ kernel fast cannot load ckpt (no kernel for group size 48); trying the next" in caplog.text
    # A slower kernel needs no less memory: the failed allocation is the error, not the next kernel's.
    with pytest.raises(RuntimeError, match="allocate"):
        first_that_loads({"fast": allocates_too_much, "portable": lambda: "loaded"}, "GPTQ kernel", "ckpt")


def test_mse_null_searches_ranges_on_a_gpu_only():
    assert mse_exponent(compose_config().gptq) == (2.4 if torch.cuda.is_available() else 0.0)
    assert mse_exponent(compose_config("gptq=mse").gptq) == 2.4
    assert mse_exponent(compose_config("gptq=minmax").gptq) == 0.0
    assert mse_exponent(compose_config("gptq=quantease").gptq) == 2.4


def grid_problem(seed: int, rows: int = 48, cols: int = 96, bits: int = 3, group: int = 32):
    """A layer's weights, calibration inputs with a few loud channels (as LLM activations have), and a symmetric
    per-group grid with the weights rounded to it (where GPTQModel's RTN would start)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cols, 512, generator=gen) * torch.rand(cols, 1, generator=gen)
    x[:4] *= 8
    w = torch.randn(rows, cols, generator=gen) * 0.05
    maxq = 2 ** bits - 1
    groups = torch.arange(cols) // group
    scale = (2 * w.abs().view(rows, -1, group).amax(-1) / maxq)[:, groups]
    zero = torch.full_like(scale, (maxq + 1) / 2)
    return w, x, scale, zero, maxq, quantease.on_grid(w, scale, zero, maxq)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantease_lowers_the_layer_error_on_the_same_grid(seed):
    w, x, scale, zero, maxq, start = grid_problem(seed)
    hessian = x @ x.T
    refined, before, after = quantease.refine(w, start, hessian, scale, zero, maxq, sweeps=30)
    # The error it reports is the layer's output error ||WX - QX||^2 / ||WX||^2, computed here from X itself.
    assert before == pytest.approx(((w - start) @ x).square().sum().item() / (w @ x).square().sum().item(), rel=1e-4)
    assert after == pytest.approx(((w - refined) @ x).square().sum().item() / (w @ x).square().sum().item(), rel=1e-4)
    assert after < 0.9 * before
    assert torch.equal(quantease.on_grid(refined, scale, zero, maxq), refined)  # same scales and zeros: on the grid
    # Each rounded sweep sets every column to its best grid value given the others: it never raises the error.
    q, errors = start, [before]
    for _ in range(4):  # a one-sweep refine is one rounded sweep
        q, _, error = quantease.refine(w, q, hessian, scale, zero, maxq, sweeps=1)
        errors.append(error)
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]
    # Further sweeps from QuantEase's own solution find nothing better (a fixed point of the coordinate updates).
    assert quantease.refine(w, refined, hessian, scale, zero, maxq, sweeps=1)[2] == pytest.approx(after, rel=1e-5)
    # Damped as GPTQ damps (H + 0.05 mean(diag H) I), it lowers that objective and stays nearer to W.
    damped_h = hessian + 0.05 * hessian.diagonal().mean() * torch.eye(len(hessian))
    damped, _, _ = quantease.refine(w, start, hessian, scale, zero, maxq, sweeps=30, damp=0.05)
    assert quantease.layer_error(w, damped, damped_h) < quantease.layer_error(w, start, damped_h)
    assert (damped - w).norm() < (refined - w).norm()
    assert torch.equal(quantease.on_grid(damped, scale, zero, maxq), damped)


def test_quantease_refined_checkpoint_keeps_the_gptq_format(finished, copy_of):
    from safetensors.torch import load_file

    exp, rerun = copy_of
    plain = load_file(exp / "gptq" / "model.safetensors")
    rerun("stage=gptq", "gptq.refine=quantease", "gptq.refine_sweeps=8")
    manifest = json.loads((exp / "gptq" / "manifest.json").read_text())
    summary = manifest["metrics"]["quantease"]
    errors = json.loads((exp / "gptq" / "quantease_errors.json").read_text())
    assert summary["layers"] == len(errors) == 14  # 2 layers x 7 linear modules
    assert all(after <= before for before, after in errors.values())
    assert summary["layer_error_after"] < 0.95 * summary["layer_error_before"]

    refined = load_file(exp / "gptq" / "model.safetensors")
    assert refined.keys() == plain.keys()
    # The first layer's q/k/v see the same inputs in both runs (later modules see refined upstream outputs, so
    # GPTQ picks their grids from other data): QuantEase kept GPTQ's grid and changed the integer codes.
    first = [f"model.layers.0.self_attn.{m}_proj" for m in "qkv"]
    for module in first:
        for part in ("scales", "qzeros"):
            assert torch.equal(refined[f"{module}.{part}"], plain[f"{module}.{part}"]), (module, part)
    assert any(not torch.equal(refined[f"{m}.qweight"], plain[f"{m}.qweight"]) for m in first)
    model = AutoModelForCausalLM.from_pretrained(exp / "gptq", device_map="cpu")
    assert any(hasattr(m, "qweight") for m in model.modules())


def test_dynamic_rules_give_modules_their_own_settings(finished, copy_of):
    from safetensors.torch import load_file

    exp, rerun = copy_of
    # Symmetric grids: per-module settings need the GPTQ layout, in which vLLM serves symmetric grids only.
    rules = ["gptq.dynamic={model.layers.1.mlp.down_proj:{bits:8},-\\:model.layers.0.mlp.down_proj:{}}",
             "gptq.sym=true"]
    rerun("stage=gptq", *rules)
    tensors = load_file(exp / "gptq" / "model.safetensors")
    # qweight packs 32 / bits codes into each int32 along the input (256 wide for down_proj, 128 for up_proj).
    assert tensors["model.layers.1.mlp.down_proj.qweight"].shape[0] == 256 * 8 // 32
    assert tensors["model.layers.1.mlp.up_proj.qweight"].shape[0] == 128 * 4 // 32
    assert "model.layers.0.mlp.down_proj.weight" in tensors
    assert "model.layers.0.mlp.down_proj.qweight" not in tensors
    manifest = json.loads((exp / "gptq" / "manifest.json").read_text())
    assert manifest["metrics"]["vllm_compatible"], manifest["metrics"]["vllm_problems"]

    with pytest.raises(RuntimeError, match="mismatched_sizes"):  # why the README says: GPTQModel or vLLM loads it
        AutoModelForCausalLM.from_pretrained(exp / "gptq", device_map="cpu")
    assert 'GPTQModel.load("<this folder or repo>")' in (exp / "gptq" / "README.md").read_text()  # the card says so
    model = load_gptq(exp / "gptq", torch.float32)  # with GPTQModel, as eval and bench load it
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert model.model.layers[1].mlp.down_proj.bits == 8 and model.model.layers[1].mlp.up_proj.bits == 4
    merged = AutoModelForCausalLM.from_pretrained(exp / "merge", dtype=torch.float32)
    batch = probe_batch(load_tokenizer(exp / "gptq"), exp / "train", 8)
    assert compare(probe_logits(merged, batch), probe_logits(model, batch))["argmax_agreement"] > 0.8

    rerun("stage=eval", *rules, "eval.artifacts=[gptq,rtn]", "eval.lm_eval.tasks=[]")  # RTN takes the same rules
    rtn = load_file(exp / "eval" / "rtn" / "model.safetensors")
    assert rtn["model.layers.1.mlp.down_proj.qweight"].shape[0] == 256 * 8 // 32
    assert "model.layers.0.mlp.down_proj.weight" in rtn
    results = json.loads((exp / "eval" / "eval.json").read_text())["artifacts"]
    assert all(results[name]["ppl"] < 1e4 and results[name]["kernels"] for name in ("gptq", "rtn")), results


def test_packing_of_both_layouts_on_codes_of_every_value():
    """GPTQ v1 packs inputs down a column and zero points minus one across a row, one packed word at a time (a zero
    point of 0 borrows from the next nibble); AWQ packs eight outputs a word in the nibble order vLLM unpacks with
    (its reverse order 0, 4, 1, 5, 2, 6, 3, 7 takes nibbles back to columns)."""
    codes, zeros = torch.arange(64 * 16).view(64, 16) % 16, torch.arange(2 * 16).view(2, 16) % 16  # 0 to 15 each
    shifts = torch.arange(0, 32, 4)

    def as_int32(words):
        return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    qweight = as_int32((codes.view(8, 8, 16) << shifts[None, :, None]).sum(1))
    qzeros = as_int32((zeros.view(2, 2, 8) << shifts).sum(-1) - awq.V1_ZERO_OFFSET)
    assert torch.equal(awq.gptq_codes(qweight), codes) and torch.equal(awq.gptq_zeros(qzeros), zeros)
    per_nibble = (awq.unpack(qzeros).reshape(2, 16) + 1) & 0xF
    assert not torch.equal(per_nibble, zeros)  # what the per-word offset is for
    for packed, plain in ((awq.pack_awq(codes), codes), (awq.pack_awq(zeros), zeros)):
        assert packed.dtype == torch.int32 and packed.shape == (len(plain), 2)
        assert torch.equal(awq.unpack(packed)[..., [0, 4, 1, 5, 2, 6, 3, 7]].reshape(plain.shape), plain)


def test_repack_of_a_sharded_checkpoint_keeps_its_index_true(tmp_path):
    """A large model's checkpoint comes in shards, and one layer's tensors may be split between two: each tensor is
    repacked in its own shard, GPT-NeoX's activation scales (AWQ readers expect them) land next to their layer's
    qweight with the scales' dtype, and the index names every tensor where it is, with the new total size."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    prefix = "gpt_neox.layers.0.mlp."
    layers = {"dense_h_to_4h": (64, 32), "dense_4h_to_h": (32, 64)}  # inputs, outputs; groups of 32 inputs
    tensors = {}

    def words(*shape):
        return torch.randint(-2 ** 31, 2 ** 31, shape, dtype=torch.int32)

    for layer, (inputs, outputs) in layers.items():
        tensors |= {f"{prefix}{layer}.qweight": words(inputs // 8, outputs),
                    f"{prefix}{layer}.qzeros": words(inputs // 32, outputs // 8),
                    f"{prefix}{layer}.scales": torch.rand(inputs // 32, outputs, dtype=torch.float16),
                    f"{prefix}{layer}.g_idx": torch.arange(inputs, dtype=torch.int32) // 32}
    first = {f"{prefix}dense_h_to_4h.qweight", f"{prefix}dense_4h_to_h.scales"}  # each split from its layer
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if k in first},
              "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if k not in first}}
    for shard, contents in shards.items():
        save_file(contents, tmp_path / shard, {"format": "pt"})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": {name: shard for shard, contents in shards.items() for name in contents}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    quantization = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": False,
                    "checkpoint_format": "gptq"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "quantization_config": quantization}))

    awq.to_awq(tmp_path)
    written = {shard: load_file(tmp_path / shard) for shard in shards}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {name: shard for shard, contents in written.items() for name in contents}
    assert index["metadata"]["total_size"] == sum(t.nbytes for c in written.values() for t in c.values())
    activation = written["model-00001-of-00002.safetensors"][f"{prefix}act.scales"]  # beside dense_h_to_4h.qweight
    assert activation.dtype == torch.float16 and torch.equal(activation, torch.ones(32, dtype=torch.float16))
    assert not any(name.endswith("g_idx") for name in index["weight_map"])
    for layer, (inputs, outputs) in layers.items():
        name = f"{prefix}{layer}."
        shard = index["weight_map"][name + "qweight"]
        codes = awq.unpack(written[shard][name + "qweight"])[..., [0, 4, 1, 5, 2, 6, 3, 7]].reshape(inputs, outputs)
        assert torch.equal(codes, awq.gptq_codes(tensors[name + "qweight"]))
        assert torch.equal(written[index["weight_map"][name + "scales"]][name + "scales"], tensors[name + "scales"])
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "awq" and config["zero_point"] and config["version"] == "gemm"


def repack_is_lossless(gptq_dir: Path, awq_dir: Path) -> int:
    """Repack a copy of GPTQModel's GPTQ checkpoint into `awq_dir` as the gptq stage does, and check that GPTQModel
    dequantizes every layer of it to the very weights it dequantizes the GPTQ checkpoint to; returns the layers."""
    shutil.copytree(gptq_dir, awq_dir)
    awq.to_awq(awq_dir)
    assert json.loads((awq_dir / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    expected, repacked = ({name: layer for name, layer in load_portable(path).named_modules()
                           if hasattr(layer, "qweight")} for path in (gptq_dir, awq_dir))
    assert expected.keys() == repacked.keys() and expected
    for name, layer in expected.items():
        assert torch.equal(dequantized(repacked[name]), dequantized(layer)), name
    return len(expected)


def test_asymmetric_gptq_layout_loads_in_transformers_and_repacks_to_awq_losslessly(finished, copy_of, tmp_path):
    """gptq.format=gptq keeps GPTQModel's own layout (transformers loads it, vLLM refuses asymmetric grids in it);
    repacked into AWQ, every weight dequantizes exactly as before, zero points of 0 and 15 included."""
    from safetensors.torch import load_file

    exp, rerun = copy_of
    # GPTQ's grid always spans 0: a group of inputs with only positive weights gets the zero point 0 (which GPTQ v1
    # stores as -1, borrowing from its neighbour in the packed word), one with only negative weights 15.
    weights, name = exp / "merge" / "model.safetensors", "model.layers.0.mlp.down_proj.weight"
    weight = load_file(weights)[name]  # [128 outputs, 256 inputs]: two groups of 128
    weight[:, :128], weight[:, 128:] = weight[:, :128].abs() + 0.02, -weight[:, 128:].abs() - 0.02
    with open(weights, "r+b") as f:  # over the tensor's own bytes: the file keeps its size, the merge stays cached
        header = int.from_bytes(f.read(8), "little")
        start, _ = json.loads(f.read(header))[name]["data_offsets"]
        f.seek(8 + header + start)
        f.write(weight.contiguous().view(torch.uint8).numpy().tobytes())
    assert torch.equal(load_file(weights)[name], weight)
    assert rerun("stage=gptq", "gptq.format=gptq")["merge"]["status"] == "cached"
    config = json.loads((exp / "gptq" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["sym"] is False
    zeros = awq.gptq_zeros(load_file(exp / "gptq" / "model.safetensors")["model.layers.0.mlp.down_proj.qzeros"])
    assert zeros[0].unique().tolist() == [0] and zeros[1].unique().tolist() == [15]
    manifest = json.loads((exp / "gptq" / "manifest.json").read_text())
    assert manifest["metrics"]["format"] == "gptq" and not manifest["metrics"]["vllm_compatible"]
    assert "sym=false in the GPTQ layout" in manifest["metrics"]["vllm_problems"][0]
    card = (exp / "gptq" / "README.md").read_text()
    assert "vLLM refuses it (sym=false" in card and "vllm serve" not in card  # no command that fails

    gptq = AutoModelForCausalLM.from_pretrained(exp / "gptq", device_map="cpu")
    merged = AutoModelForCausalLM.from_pretrained(exp / "merge", dtype=torch.float32)
    batch = probe_batch(load_tokenizer(exp / "gptq"), exp / "train", 8)
    assert compare(probe_logits(merged, batch), probe_logits(gptq, batch))["argmax_agreement"] > 0.8

    assert repack_is_lossless(exp / "gptq", tmp_path / "awq") == 14  # 2 layers x 7 linear modules
