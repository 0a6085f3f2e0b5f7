"""compute_dtype: bfloat16 where the machine computes it fast, else float16 on a GPU and float32 on a CPU; decided once,
said in one line, recorded in the manifests and the report, part of the fingerprints, and used by every stage.

The CPU without fast bfloat16 is this machine with PyTorch's and oneDNN's dispatch held to AVX2 (what an AVX2-only
CPU has; on such a CPU the variables change nothing): its bfloat16 matmul falls back to a scalar loop there too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors import safe_open

from pipeline.artifacts import read_manifest
from pipeline.compute import Machine, matmul_rate, resolve, this_machine
from pipeline.runner import fingerprints

from .conftest import compose_config

# Inductor's kernels compiled under the emulation are not those of this CPU: they get a cache of their own.
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(tempfile.gettempdir(), "torchinductor-avx2")}


def python(code: str, env: dict) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("machine, requested, expected, why", [
    (Machine(False, False, True, "AVX512-BF16"), "auto", "bfloat16", "this CPU computes bfloat16 fast (AVX512-BF16)"),
    (Machine(False, False, True, "AVX-512"), "auto", "bfloat16", "this CPU computes bfloat16 fast (AVX-512)"),
    (Machine(False, False, False, "AVX2"), "auto", "float32", "this CPU has no fast bfloat16 (AVX2): computing in "
                                                               "float32"),
    (Machine(True, True, True, "AVX512-BF16"), "auto", "bfloat16", "this GPU computes bfloat16"),
    (Machine(True, False, False, "AVX2"), "auto", "float16", "this GPU has no bfloat16: computing in float16"),
    (Machine(True, False, True, "AVX2"), "bfloat16", "float16", "this GPU has no bfloat16"),
    (Machine(False, False, True, "AVX512-BF16"), "float32", "float32", "compute_dtype=float32"),
    (Machine(False, False, False, "AVX2"), "bfloat16", "bfloat16", "compute_dtype=bfloat16"),
])
def test_the_choice_follows_what_the_machine_computes_fast(machine, requested, expected, why):
    dtype, reason = resolve(requested, machine)
    assert dtype == expected and why in reason, reason


def test_the_choice_rests_on_the_measured_matmul_speed():
    """The premise, measured on this machine as it is and held to AVX2: bfloat16 is chosen exactly where PyTorch's
    bfloat16 matmul is not far slower than float32 (on AVX2 it is about 250x slower). With oneDNN held to AVX-512
    without its bfloat16 instructions (ONEDNN_MAX_CPU_ISA=AVX512_CORE, the AVX-512 class) it ran at 0.55x float32
    here, and 2.3-2.8x with AVX512-BF16: the bound leaves room for that class and for timing noise."""
    here = this_machine()
    ratio = matmul_rate(torch.bfloat16) / matmul_rate(torch.float32)
    assert (ratio > 0.25) if here.cpu_bf16 else (ratio < 0.1), (here, ratio)
    code = ("import torch; from pipeline.compute import matmul_rate, this_machine; m = this_machine(); "
            "print(m.cpu_bf16, m.cpu_class, matmul_rate(torch.bfloat16) / matmul_rate(torch.float32))")
    fast, cpu_class, avx2_ratio = python(code, AVX2).split()
    assert fast == "False" and cpu_class == "AVX2" and float(avx2_ratio) < 0.1, (cpu_class, avx2_ratio)


def test_the_resolved_dtype_is_in_the_fingerprints_of_the_stages_it_changes(tiny_model_dir):
    """A store shared by machines of both kinds never hands one's adapter to the other; the NF4 base, quantized from
    the weights as stored, is shared."""
    overrides = [f"model.name_or_path={tiny_model_dir}"]
    bf16 = fingerprints(compose_config(*overrides, "compute_dtype=bfloat16"))
    fp32 = fingerprints(compose_config(*overrides, "compute_dtype=float32"))
    assert bf16["base"] == fp32["base"]
    assert all(bf16[stage] != fp32[stage] for stage in ("train", "merge", "gptq", "eval", "bench", "serve"))
    auto = fingerprints(compose_config(*overrides))
    assert auto == (bf16 if this_machine().cpu_bf16 else fp32)  # auto is what it resolves to


def test_a_cpu_without_fast_bfloat16_computes_every_stage_in_float32(finished, tmp_path):
    """The tiny chain held to AVX2: the run says why in one line, every stage computes in float32 (the NF4 layers,
    the 16-bit artifacts, GPTQModel, eval's and bench's models) and records it; the NF4 base is the one computed
    elsewhere in bfloat16."""
    out, overrides, _ = finished
    mine = tmp_path / "outputs"
    result = subprocess.run([sys.executable, "-m", "pipeline", *overrides, f"output_dir={mine}"],
                            capture_output=True, text=True, timeout=900, env={**os.environ, **AVX2})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    said = [line for line in result.stdout.splitlines() if "computing in" in line]
    assert "compute: this CPU has no fast bfloat16 (AVX2): computing in float32" in said[0], said
    exp = mine / "default"
    for stage in ("train", "merge", "gptq", "eval", "bench"):
        manifest = read_manifest(exp / stage)
        assert manifest["config"]["compute_dtype"] == "float32" and manifest["compute"]["requested"] == "auto"
        assert manifest["compute"]["why"] == "this CPU has no fast bfloat16 (AVX2): computing in float32"
    for stage in ("train", "merge", "gptq"):  # what the stage's model computed in, read from the model
        assert read_manifest(exp / stage)["metrics"]["computed_in"] == "float32", stage
    for stage in ("eval", "bench"):
        artifacts = json.loads((exp / stage / f"{stage}.json").read_text())["artifacts"]
        assert {name: a["computed_in"] for name, a in artifacts.items()} == {name: "float32" for name in artifacts}
    assert "Computed in float32: this CPU has no fast bfloat16 (AVX2)" in (exp / "report.md").read_text()
    # What is written stays 16-bit: GPTQModel computed in float32, its unquantized weights are stored as merged.
    with safe_open(exp / "gptq" / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys() if name.endswith(".weight")}
    assert dtypes == {"BF16"} and json.loads((exp / "gptq" / "config.json").read_text())["dtype"] == "bfloat16"
    theirs = out / "default"
    assert read_manifest(exp / "base")["fingerprint"] == read_manifest(theirs / "base")["fingerprint"]
    same_dtype = read_manifest(theirs / "train")["config"]["compute_dtype"] == "float32"  # an AVX2 machine's run
    assert (read_manifest(exp / "train")["fingerprint"] == read_manifest(theirs / "train")["fingerprint"]) == same_dtype


def test_this_machine_computes_the_nf4_layers_in_the_resolved_dtype(finished):
    """The other branch on any machine: compute_dtype=bfloat16 set by hand reaches the NF4 layers and the 16-bit
    parts of every artifact eval loads (as auto does where the CPU computes bfloat16 fast)."""
    from pipeline.models import computes_in, load_artifact

    out, overrides, _ = finished
    exp = out / "default"
    inputs = {stage: exp / stage for stage in ("base", "train", "merge", "gptq")}
    for dtype in ("bfloat16", "float32"):
        cfg = compose_config(*overrides, f"compute_dtype={dtype}")
        for name in ("base16", "nf4", "qlora", "merged", "gptq"):
            model = load_artifact(name, inputs, cfg)
            assert computes_in(model) == dtype and model.dtype == getattr(torch, dtype), (name, dtype)


def test_generation_feeds_the_lm_head_a_contiguous_input(finished):
    """transformers slices the prompt's last position out of its hidden states for the LM head, a strided view, and
    PyTorch's bfloat16 linear on CPU then copies the head's weight once per prompt (5.2 GB for 96 prompts on the
    default model, measured): every model the pipeline loads hands the head a contiguous copy instead."""
    from transformers import AutoModelForCausalLM

    from pipeline.models import load_artifact, load_tokenizer
    from pipeline.quality import generate_answers

    out, overrides, _ = finished
    exp = out / "default"
    inputs = {stage: exp / stage for stage in ("base", "train", "merge", "gptq")}
    tokenizer = load_tokenizer(exp / "merge")
    chats = [[{"role": "user", "content": f"Write {n} in words."}, {"role": "assistant", "content": ""}]
             for n in (7, 12345, 600001)]

    def head_inputs(model) -> set[bool]:
        seen = set()
        model.get_output_embeddings().register_forward_hook(lambda m, args, o: seen.add(args[0].is_contiguous()))
        generate_answers(model, tokenizer, chats, max_new_tokens=2)
        return seen
    plain = AutoModelForCausalLM.from_pretrained(exp / "merge", dtype=torch.bfloat16)
    assert False in head_inputs(plain), "transformers no longer slices a strided view: the hook can go"
    for name in ("merged", "qlora", "gptq"):
        assert head_inputs(load_artifact(name, inputs, compose_config(*overrides))) == {True}, name
