"""The base stage streams: its NF4 checkpoint (and the 16-bit copy of a GGUF source) is, tensor for tensor and byte for
byte, what transformers writes when it loads the whole model in 4 bits and saves it (the stage before it streamed),
on every tiny family, in several shards, and with the storage dtype FSDP needs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.checkpoints import INDEX, Checkpoint
from pipeline.models import bnb_config, device
from pipeline.stages import base

from .conftest import ARCHITECTURES, build_tiny_model, compose_config


def whole_model_nf4(source: Path | str, cfg, out: Path) -> Path:
    """What the base stage wrote before it streamed: the whole model loaded by transformers in 4 bits, then saved.
    Quantized where the stage quantizes, on the GPU when there is one: bitsandbytes' CUDA and CPU kernels round a
    few double-quantized absmax bytes differently (seen on an H200)."""
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=getattr(torch, cfg.model.dtype),
                                                 device_map={"": device()},
                                                 quantization_config=bnb_config(cfg.base, cfg.model.dtype))
    model.save_pretrained(out)
    return out


def whole_gguf_as_hf(gguf: Path, dtype: str, out: Path) -> Path:
    """What the base stage wrote of a GGUF source before it streamed: the whole file loaded by transformers (in
    float32), copied into a plain `dtype` model and saved."""
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.dtype = dtype
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    return out


def assert_same_checkpoint(expected: Path, written: Path) -> int:
    """The same tensors (names, dtypes, shapes, bytes) and the same config files; returns the number of tensors."""
    want, got = Checkpoint(expected), Checkpoint(written)
    assert set(want.entries) == set(got.entries), sorted(set(want.entries) ^ set(got.entries))[:5]
    for key in want.entries:
        a, b = want.raw(key, "cpu"), got.raw(key, "cpu")
        assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), key
    for name in ("config.json", "generation_config.json"):
        assert json.loads((expected / name).read_text()) == json.loads((written / name).read_text()), name
    return len(want.entries)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_streamed_nf4_is_what_transformers_writes(tmp_path, architecture):
    source = build_tiny_model(tmp_path / "source", architecture)
    cfg = compose_config(f"model.name_or_path={source}")
    base.quantize(source, cfg, tmp_path / "streamed")
    n = assert_same_checkpoint(whole_model_nf4(source, cfg, tmp_path / "whole"), tmp_path / "streamed")
    assert n > 6 * 2 * 4  # every linear layer's weight and its quantization state


def test_fsdp_storage_and_several_shards(tiny_model_dir, tmp_path):
    """base.quant_storage=bfloat16 (FSDP flattens the packed weights with the rest) into shards of 40 KB: the same
    tensors as transformers', in several files with an index, which transformers loads."""
    cfg = compose_config(f"model.name_or_path={tiny_model_dir}", "base.quant_storage=bfloat16",
                         "base.max_shard_size=40KB")
    base.quantize(tiny_model_dir, cfg, tmp_path / "streamed")
    index = json.loads((tmp_path / "streamed" / INDEX).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and all((tmp_path / "streamed" / f).is_file() for f in files)
    assert not list((tmp_path / "streamed").glob("*.data"))  # no shard's data file left behind
    assert_same_checkpoint(whole_model_nf4(tiny_model_dir, cfg, tmp_path / "whole"), tmp_path / "streamed")
    packed = Checkpoint(tmp_path / "streamed").raw("model.layers.0.mlp.up_proj.weight", "cpu")
    assert packed.dtype == torch.bfloat16
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", device_map="cpu")
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
