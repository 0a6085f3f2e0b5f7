"""base: the base model in bitsandbytes NF4 (double quant), saved with its tokenizer.

Outputs: `nf4/` (4-bit checkpoint + tokenizer) and, when the model comes as a GGUF file, `source/` (the same
model as a plain 16-bit HF checkpoint, which later stages and users can load like any other).

The stage streams, so that its memory does not grow with the model: the source is read tensor by tensor
(safetensors through checkpoints.Checkpoint, a GGUF file through the `gguf` reader), each linear weight is quantized
by bitsandbytes as transformers quantizes it when it loads a model in 4 bits (same modules, same bytes), on the GPU
when there is one, and every tensor is written into shards as soon as it is ready (checkpoints.Shards). A pickle
(.bin) source, which cannot be read a tensor at a time, is loaded whole by transformers instead.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import memory
from ..artifacts import dir_bytes
from ..checkpoints import Checkpoint, GGUFFile, Shards, gguf_names, gguf_tensors, saved_names
from ..config import Config, shard_bytes
from ..models import (bnb_config, device, gguf_config, gguf_file, load_causal_lm, load_tokenizer, local_dir,
                      meta_model, meta_model_of, torch_dtype, weight_bytes)

log = logging.getLogger(__name__)


def gguf_to_hf(gguf: Path, dtype: torch.dtype, out: Path, max_bytes: int) -> None:
    """A GGUF file as a plain HF safetensors checkpoint, written tensor by tensor in `dtype`."""
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    log.info("writing %s as an HF checkpoint, tensor by tensor", gguf.name)
    config = copy.deepcopy(gguf_config(gguf))  # cached for the process: not to be changed
    config.dtype = str(dtype).removeprefix("torch.")
    model = meta_model_of(config, False)
    config.architectures = [type(model).__name__]  # as save_pretrained records it
    shards, reader = Shards(out, max_bytes), GGUFFile(gguf)
    names = gguf_names(reader, model, load_gguf_checkpoint(str(gguf), return_tensors=False)["config"])
    for name, tensor in gguf_tensors(gguf, reader, names, desc="base: GGUF to HF"):
        shards.add(name, tensor.to(dtype))
    shards.close()
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)


def nf4_model(source: Path, cfg: Config):
    """The model on the meta device with transformers' 4-bit layers where from_pretrained puts them (its bitsandbytes
    quantizer decides which modules stay 16-bit), and the config it saves."""
    from transformers import AutoConfig
    from transformers.quantizers import AutoHfQuantizer

    dtype = torch_dtype(cfg.model.dtype)
    config = AutoConfig.from_pretrained(str(source), trust_remote_code=cfg.model.trust_remote_code)
    config.dtype = dtype
    quantizer = AutoHfQuantizer.from_config(bnb_config(cfg.base, cfg.model.dtype), pre_quantized=False)
    model = meta_model_of(config, cfg.model.trust_remote_code, dtype)
    quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": device()})
    model.config.quantization_config = quantizer.quantization_config
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    return model


def quantize(source: Path, cfg: Config, out: Path) -> None:
    """The NF4 checkpoint of the safetensors checkpoint in `source`, written tensor by tensor."""
    import bitsandbytes as bnb
    from transformers import GenerationConfig

    model, checkpoint, on = nf4_model(source, cfg), Checkpoint(source), device()
    on_disk = saved_names(model, checkpoint)
    dtype = torch_dtype(cfg.model.dtype)
    float32 = tuple(model._get_dtype_plan(dtype))  # the modules transformers keeps in float32 (_keep_in_fp32_modules)
    shards, seen = Shards(out, shard_bytes(cfg.base.max_shard_size)), set()
    for name, param in tqdm(list(model.state_dict(keep_vars=True).items()), desc="base: NF4", unit="tensor"):
        if id(param) in seen:  # tied to a tensor already written (the LM head to the input embedding)
            continue
        seen.add(id(param))
        if name not in on_disk:
            raise RuntimeError(f"{source}: the checkpoint lacks {name}")
        value = checkpoint.raw(on_disk[name], on)
        if value.is_floating_point():  # as from_pretrained casts it
            value = value.to(torch.float32 if any(module in name for module in float32) else dtype)
        if not isinstance(param, bnb.nn.Params4bit):
            shards.add(on_disk[name], value)
            continue
        # What transformers' Bnb4bitQuantize does to each weight as it loads it (Params4bit quantizes when moved)
        weight = bnb.nn.Params4bit(value, requires_grad=False, **param.__dict__).to(on)
        shards.add(on_disk[name], weight.data)  # and the quantization state, as Linear4bit saves it
        for key, state in weight.quant_state.as_dict(packed=True).items():
            shards.add(f"{on_disk[name]}.{key}", state)
    log.info("base: %d shard(s) of at most %s written", shards.close(), cfg.base.max_shard_size)
    model.config.save_pretrained(out)
    generation = (GenerationConfig.from_pretrained(str(source)) if (source / "generation_config.json").is_file()
                  else GenerationConfig.from_model_config(model.config))
    generation.save_pretrained(out)


def run(cfg: Config, work: Path, inputs: dict[str, Path]) -> dict:
    memory.return_freed_memory()  # each tensor's buffers go back once written, not kept for reuse
    gguf = gguf_file(cfg.model.name_or_path)
    if gguf is not None:
        gguf_to_hf(gguf, torch_dtype(cfg.model.dtype), work / "source", shard_bytes(cfg.base.max_shard_size))
        source: str | Path = work / "source"
    else:
        source = cfg.model.name_or_path
    folder = local_dir(source, cfg.model)
    if any(folder.glob("*.safetensors")):
        quantize(folder, cfg, work / "nf4")
    else:
        log.warning("base: %s has no safetensors weights: loading it whole to quantize it", source)
        load_causal_lm(source, cfg.model, cfg.model.dtype, quantization_config=bnb_config(
            cfg.base, cfg.model.dtype)).save_pretrained(work / "nf4", max_shard_size=cfg.base.max_shard_size)
    load_tokenizer(source, cfg.model).save_pretrained(work / "nf4")
    metrics = {
        "source": "source" if gguf is not None else str(source),
        "nf4_memory_bytes": weight_bytes(work / "nf4"),
        "nf4_disk_bytes": dir_bytes(work / "nf4"),
        "sixteen_bit_memory_bytes": 2 * sum(p.numel() for p in
                                            meta_model(folder, cfg.model.trust_remote_code).parameters()),
    }
    if Path(source).is_dir():
        metrics["sixteen_bit_disk_bytes"] = sum(p.stat().st_size for p in Path(source).glob("*.safetensors"))
    log.info("NF4: %.1f MB in memory (16-bit: %.1f MB)", metrics["nf4_memory_bytes"] / 1e6,
             metrics["sixteen_bit_memory_bytes"] / 1e6)
    return metrics
