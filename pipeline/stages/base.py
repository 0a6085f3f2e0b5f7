"""base: the base model in bitsandbytes NF4 (double quant), saved with its tokenizer.

Outputs: `nf4/` (4-bit checkpoint + tokenizer) and, when the model comes as a GGUF file, `source/` (the same
model as a plain 16-bit HF checkpoint, which later stages and users can load like any other).
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..artifacts import dir_bytes
from ..config import Config
from ..models import bnb_config, gguf_file, load_causal_lm, load_tokenizer, materialize_gguf, meta_model

log = logging.getLogger(__name__)


def run(cfg: Config, work: Path, inputs: dict[str, Path]) -> dict:
    gguf = gguf_file(cfg.model.name_or_path)
    if gguf is not None:
        materialize_gguf(gguf, cfg.model.dtype, work / "source")
        source = str(work / "source")
    else:
        source = cfg.model.name_or_path
    # Quantized from the 16-bit weights as stored, whatever this machine computes in: one NF4 checkpoint for all.
    model = load_causal_lm(source, cfg.model, cfg.model.dtype,
                           quantization_config=bnb_config(cfg.base, cfg.model.dtype))
    model.save_pretrained(work / "nf4")
    load_tokenizer(source, cfg.model).save_pretrained(work / "nf4")
    shapes = meta_model(source, cfg.model.trust_remote_code)
    metrics = {
        "source": "source" if gguf is not None else source,
        "nf4_memory_bytes": model.get_memory_footprint(),
        "nf4_disk_bytes": dir_bytes(work / "nf4"),
        "sixteen_bit_memory_bytes": 2 * sum(p.numel() for p in shapes.parameters()),
    }
    if Path(source).is_dir():
        metrics["sixteen_bit_disk_bytes"] = sum(p.stat().st_size for p in Path(source).glob("*.safetensors"))
    log.info("NF4: %.1f MB in memory (16-bit: %.1f MB)", metrics["nf4_memory_bytes"] / 1e6,
             metrics["sixteen_bit_memory_bytes"] / 1e6)
    return metrics
