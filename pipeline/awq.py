"""GPTQModel's GPTQ checkpoint repacked into the AWQ layout (GEMM version, with zero points), which vLLM serves with
asymmetric grids where it refuses asymmetric GPTQ.

Both formats dequantize a weight as (q - z) * s per group of input columns, with the same integer codes, zero
points and scales: only the packing differs, so the repack changes no dequantized weight. Without dynamic
act-order (`g_idx` trivial: GPTQModel's act_group_aware keeps groups in natural order) the layers map one to one:
- GPTQ: qweight [in / 8, out], nibble j of row i is input 8i + j; qzeros [groups, out / 8], nibble j of column k is
  output 8k + j; GPTQModel's v1 format ("checkpoint_format": "gptq") stores each zero-point word minus 0x11111111,
  so a zero point of 0 borrows from its neighbour: the constant is added back per word, not per nibble.
- AWQ: qweight [in, out / 8] and qzeros [groups, out / 8], both packed along the output, nibble i of a word holding
  column AWQ_ORDER[i] of its eight; scales [groups, out] as in GPTQ; no g_idx.
No library converts GPTQ to AWQ (GPTQModel exports mlx and dequantized weights only).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

BITS = 4  # AWQ's GEMM layout, and vLLM's AWQ kernels, hold 4-bit codes only
PER_WORD = 32 // BITS
SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int64)
MASK = (1 << BITS) - 1
V1_ZERO_OFFSET = 0x11111111  # one per nibble: GPTQ v1 stores zero points minus one
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # the column (of its eight) each nibble of an AWQ word holds


def unpack(words: torch.Tensor) -> torch.Tensor:
    """Each int32 word's eight 4-bit codes, lowest nibble first, along a new last dimension."""
    return (words.to(torch.int64).unsqueeze(-1) >> SHIFTS) & MASK


def gptq_codes(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ's packed weight [in / 8, out] as codes [in, out]."""
    return unpack(qweight).transpose(1, 2).reshape(-1, qweight.shape[1])


def gptq_zeros(qzeros: torch.Tensor) -> torch.Tensor:
    """GPTQ v1's packed zero points [groups, out / 8] as zero points [groups, out]."""
    words = (qzeros.to(torch.int64) + V1_ZERO_OFFSET) & 0xFFFFFFFF
    return unpack(words).reshape(qzeros.shape[0], -1)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """Codes [rows, out] packed along the output in AWQ's nibble order: [rows, out / 8] int32."""
    rows, cols = codes.shape
    if cols % PER_WORD:
        raise ValueError(f"AWQ packs {PER_WORD} outputs a word: a layer with {cols} outputs does not fit")
    nibbles = codes.to(torch.int64).view(rows, -1, PER_WORD)[..., AWQ_ORDER]
    words = (nibbles << SHIFTS).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # the same bits as int32


def repack_tensor(name: str, tensor: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """One tensor of a GPTQ checkpoint as the AWQ checkpoint holds it (None: AWQ has no such tensor)."""
    kind = name.rpartition(".")[2]
    if kind == "qweight":
        return pack_awq(gptq_codes(tensor))
    if kind == "qzeros":
        return pack_awq(gptq_zeros(tensor))
    if kind == "g_idx":
        per_group = group_size if group_size > 0 else len(tensor)  # -1: one group per output channel
        if not torch.equal(tensor.long(), torch.arange(len(tensor)) // per_group):
            raise ValueError(f"{name}: the input columns are not in natural group order (dynamic act-order, "
                             "desc_act=true): AWQ cannot hold that checkpoint")
        return None
    return tensor


def awq_quantization_config(gptq: dict) -> dict:
    """GPTQModel's quantization config of the checkpoint as it describes an AWQ one (as GPTQModel's own AWQ
    quantizer writes it: `zero_point` and `version` instead of `sym` and a GPTQ format), its provenance kept."""
    config = {key: value for key, value in gptq.items() if key != "sym"}
    return config | {"quant_method": "awq", "method": "awq", "format": "gemm", "checkpoint_format": "gemm",
                     "version": "gemm", "zero_point": True}


def activation_scales(model_type: str, outputs: dict[str, int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The MLP activation scales AWQ readers expect in some families (AutoAWQ folds part of its scaling into the
    activation there; transformers' AWQ_SCALES_MAPPINGS lists them, GPT-NeoX among them): ones, since GPTQ scaled
    nothing. Without them transformers leaves the scales uninitialized and the model computes NaN. `outputs`: each
    quantized layer's output size, by its qweight's name."""
    from transformers.integrations.awq import AWQ_SCALES_MAPPINGS

    mapping = AWQ_SCALES_MAPPINGS.get(model_type)
    if mapping is None:
        return {}
    suffix = f".{mapping['layer_before_act']}.qweight"
    return {f"{name.removesuffix(suffix)}.{mapping['act']}.scales": torch.ones(size, dtype=dtype)
            for name, size in outputs.items() if name.endswith(suffix)}


def scales_dtype(shards: list[Path]) -> torch.dtype:
    """The dtype of the layers' scales, from the first shard that holds some (a layer's qweight and scales may be in
    two shards, so each shard's activation scales cannot take it from their own)."""
    from safetensors import safe_open

    for shard in shards:
        with safe_open(shard, "pt") as f:
            name = next((name for name in f.keys() if name.endswith(".scales")), None)
            if name:
                return f.get_slice(name)[:1].dtype  # one row read
    raise ValueError(f"no quantized layer's scales in {[shard.name for shard in shards]}")


def to_awq(checkpoint: Path) -> None:
    """Rewrite GPTQModel's GPTQ checkpoint in `checkpoint` in the AWQ layout, shard by shard (each tensor repacks on
    its own), with its index and both copies of the quantization config."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((checkpoint / "config.json").read_text())
    gptq = config["quantization_config"]
    if (gptq["bits"], gptq.get("checkpoint_format"), bool(gptq.get("dynamic"))) != (BITS, "gptq", False):
        raise ValueError(f"{checkpoint}: only GPTQ v1 checkpoints of {BITS} bits without per-module settings repack "
                         f"to AWQ (bits {gptq['bits']}, format {gptq.get('checkpoint_format')}, "
                         f"dynamic {gptq.get('dynamic')})")
    dropped: dict[str, int] = {}  # name -> bytes
    weight_map: dict[str, str] = {}  # added tensors -> their shard
    added_bytes = 0
    shards = sorted(checkpoint.glob("*.safetensors"))
    dtype = scales_dtype(shards)
    for shard in shards:
        with safe_open(shard, "pt") as f:
            tensors, metadata = {name: f.get_tensor(name) for name in f.keys()}, f.metadata()
        repacked = {name: repack_tensor(name, tensor, gptq["group_size"]) for name, tensor in tensors.items()}
        dropped |= {name: tensors[name].nbytes for name, tensor in repacked.items() if tensor is None}
        added = activation_scales(config["model_type"], {name: tensor.shape[1] for name, tensor in tensors.items()
                                                         if name.endswith(".qweight")}, dtype)
        repacked |= added
        weight_map |= {name: shard.name for name in added}
        added_bytes += sum(tensor.nbytes for tensor in added.values())
        partial = shard.with_suffix(".partial")
        save_file({name: tensor for name, tensor in repacked.items() if tensor is not None}, partial, metadata)
        os.replace(partial, shard)
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        contents = json.loads(index.read_text())
        contents["weight_map"] = {k: v for k, v in contents["weight_map"].items() if k not in dropped} | weight_map
        if "total_size" in contents.get("metadata", {}):
            contents["metadata"]["total_size"] += added_bytes - sum(dropped.values())
        index.write_text(json.dumps(contents, indent=2) + "\n")
    config["quantization_config"] = awq_quantization_config(gptq)
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (checkpoint / "quantize_config.json").write_text(json.dumps(config["quantization_config"], indent=2) + "\n")
