"""safetensors checkpoints read and written one tensor at a time, so that a stage's memory does not grow with the
model: Checkpoint reads them (one file, or shards and an index), ShardWriter writes a checkpoint whose tensors are
all known ahead (the merge), Shards one whose tensors are known only as they come (the base stage's NF4 weights:
bitsandbytes' quantization state has a size of its own). Both name their files as save_pretrained does:
`model.safetensors`, or `model-0000i-of-0000n.safetensors` and `model.safetensors.index.json`. gguf_tensors reads a
GGUF file's tensors one at a time, as transformers names and lays them out."""
from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from tqdm.auto import tqdm

from .models import safetensors_header

SINGLE_FILE, INDEX = "model.safetensors", "model.safetensors.index.json"

# safetensors' dtype names
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class GGUFFile(GGUFReader):
    """gguf's reader of a GGUF file, parsing its header through a plain array view of the file's memory map: numpy's
    memmap subclass costs microseconds on each of the ~250k slices the reader takes of a 49k-token vocabulary, 2.2 s
    a file on the default model (0.7 s so)."""

    def _get(self, *args, **kwargs):
        if type(self.data) is np.memmap:
            self.data = self.data.view(np.ndarray)  # the same mapped bytes
        return super()._get(*args, **kwargs)


class Checkpoint:
    """A safetensors checkpoint (one file, or shards and an index), read one tensor at a time with plain reads at
    the offsets its header gives. Not safe_open: it maps the whole file into memory, and a 70B model's NF4
    checkpoint is one 35 GB file (address space a capped process lacks, and page cache that counts as resident)."""

    def __init__(self, path: Path, single: str = SINGLE_FILE):
        if (path / INDEX).is_file():
            files = sorted({path / name for name in json.loads((path / INDEX).read_text())["weight_map"].values()})
        elif (path / single).is_file():
            files = [path / single]
        else:
            raise FileNotFoundError(f"{path}: no {single} or {INDEX} (safetensors weights)")
        self.entries: dict[str, tuple[Path, int, dict]] = {}  # key -> (file, where its data starts, header entry)
        for file in files:
            header, start = safetensors_header(file)
            self.entries.update({key: (file, start, entry) for key, entry in header.items()})
        # bitsandbytes saves a 4-bit weight `W` with its quantization state beside it: `W.absmax`, `W.quant_map`...
        self.quantized = {key.split(".quant_state.")[0] for key in self.entries if ".quant_state.bitsandbytes__" in key}
        self.weights = [key for key in self.entries if not any(key.startswith(q + ".") for q in self.quantized)]

    def raw(self, key: str, on: torch.device) -> torch.Tensor:
        file, start, entry = self.entries[key]
        begin, end = entry["data_offsets"]
        with file.open("rb") as f:
            f.seek(start + begin)
            data = bytearray(f.read(end - begin))
        dtype = DTYPES[entry["dtype"]]
        tensor = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return tensor.reshape(entry["shape"]).to(on)

    def float32(self, key: str, on: torch.device) -> torch.Tensor:
        """A weight in float32: dequant(W) for a 4-bit one, from its saved quantization state."""
        if key not in self.quantized:
            return self.raw(key, on).float()
        import bitsandbytes.functional as bnbf

        state = bnbf.QuantState.from_dict(
            {k[len(key) + 1:]: self.raw(k, on) for k in self.entries if k.startswith(key + ".")}, on)
        state.dtype = torch.float32  # the saved state says bf16, which would round dequant(W)
        return bnbf.dequantize_4bit(self.raw(key, on), state)


def saved_names(model, checkpoint: Checkpoint) -> dict[str, str]:
    """The checkpoint's name of each parameter of `model` (LoRA layers injected or not) that the checkpoint holds.
    transformers 5 renames some weights between a model and its files (GPT-NeoX's `lm_head` is `embed_out` on
    disk): its own renaming rules map them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    on_disk = {rename_source_key(key, renamings, [])[0]: key for key in checkpoint.weights}
    names = {name: name.replace(".base_layer.", ".") for name, _ in model.named_parameters() if ".lora_" not in name}
    return {name: on_disk[plain] for name, plain in names.items() if plain in on_disk}


def gguf_names(reader, model, processor_config: dict):
    """transformers' GGUF tensor processor for the GGUF file `reader` reads (a GGUFFile; its architecture's),
    and the map from the file's tensor names to `model`'s state-dict names. `processor_config` is the model's
    configuration as a dict (the processors read head counts from it)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, read_field)

    processor = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)(
        config=processor_config)
    # transformers builds the gguf package's name map anew for every module it walks (a pure function of the
    # architecture and layer count): 397 times, 7.4 s, on the default model. Built once here.
    uncached = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(uncached)
    try:
        return processor, get_gguf_hf_weights_map(model, processor)
    finally:
        gguf.get_tensor_name_map = uncached


def gguf_tensors(path: Path, reader, names: tuple, desc: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of the GGUF file at `path` (`reader`: its GGUFFile, which parses the whole header,
    vocabulary included: seconds, so made once per file) under a model's state-dict names (`names`: gguf_names), in
    float32, one at a time: each read with a plain read at its offset (the reader's memory map would keep the whole
    file resident), dequantized by the `gguf` package, renamed and un-permuted by transformers' own GGUF processors
    (what from_pretrained(gguf_file=...) does with the whole model at once)."""
    from gguf import dequantize

    processor, hf_names = names
    parsed = {"tensors": {}}  # MoE processors leave their tensors here
    with path.open("rb") as f:
        for tensor in tqdm(reader.tensors, desc=desc, unit="tensor"):
            f.seek(tensor.data_offset)
            data = np.frombuffer(f.read(tensor.n_bytes), dtype=tensor.data.dtype).reshape(tensor.data.shape)
            result = processor.process(weights=dequantize(data, tensor.tensor_type), name=tensor.name,
                                       tensor_key_mapping=hf_names, parsed_parameters=parsed)
            ready = parsed["tensors"]
            if result.name in hf_names:
                ready[hf_names[result.name]] = torch.from_numpy(np.copy(result.weights))
            for name in list(ready):
                yield name, ready.pop(name)


def header(entries: list[tuple[str, torch.dtype, list[int]]]) -> bytes:
    """A safetensors header for tensors (name, dtype, shape) stored back to back in this order."""
    table, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, dtype, shape in entries:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        table[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(table, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text


def shard_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_index(out: Path, weight_map: dict[str, str], total_size: int) -> None:
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().data


class ShardWriter:
    """Writes tensors straight into safetensors shards, in an order planned ahead: every tensor's name and shape is
    known before the merge (from the model built on the meta device), so each shard's header is written first and
    each tensor's bytes follow as soon as it is merged; nothing waits in memory for its shard to fill. A shard holds
    at most `max_bytes` (a larger tensor gets one of its own)."""

    def __init__(self, out: Path, plan: list[tuple[str, torch.Size]], dtype: torch.dtype, max_bytes: int):
        self.dtype = dtype
        shards: list[list[tuple[str, torch.Size]]] = [[]]
        filled = 0
        for key, shape in plan:
            nbytes = shape.numel() * dtype.itemsize
            if shards[-1] and filled + nbytes > max_bytes:
                shards.append([])
                filled = 0
            shards[-1].append((key, shape))
            filled += nbytes
        names = shard_names(len(shards))
        if len(shards) > 1:
            write_index(out, {key: name for name, shard in zip(names, shards) for key, _ in shard},
                        sum(s.numel() for _, s in plan) * dtype.itemsize)
        self.shards = [(out / name, header([(key, dtype, shape) for key, shape in shard]), [key for key, _ in shard])
                       for name, shard in zip(names, shards)]
        self.count = len(shards)
        self.file, self.pending = None, []  # the shard being written, and the keys it still expects

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if not self.pending:  # the next shard: its header first
            if not self.shards:
                raise RuntimeError(f"{key} was not planned")
            path, head, self.pending = self.shards.pop(0)
            self.file = path.open("wb")
            self.file.write(head)
        if key != self.pending[0]:
            raise RuntimeError(f"{key} came where {self.pending[0]} was planned")
        self.pending.pop(0)
        self.file.write(tensor_bytes(tensor.to(self.dtype)))
        if not self.pending:
            self.file.close()

    def close(self) -> int:
        """Check that every planned tensor was written; returns the number of shards."""
        if self.pending or self.shards:
            raise RuntimeError(f"{(self.pending or self.shards[0][2])[0]} was planned but never written")
        return self.count


class Shards:
    """Writes tensors into safetensors shards as they come, each in its own dtype, when their sizes are not known
    ahead. A shard's tensors go to a data file as they come; once the shard holds `max_bytes` (a larger tensor gets
    one of its own) its header, which lists every tensor's offsets and comes first, is written to the shard's file
    and the data copied after it. Memory holds one tensor; the disk holds a shard's data twice for a moment."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        out.mkdir(parents=True, exist_ok=True)
        self.done: list[tuple[Path, list[str]]] = []  # finished shards (numbered files) and their keys
        self.entries: list[tuple[str, torch.dtype, list[int]]] = []  # the open shard's tensors
        self.data, self.filled, self.total = None, 0, 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.entries and self.filled + nbytes > self.max_bytes:
            self.finish_shard()
        if self.data is None:
            self.data = (self.out / f"shard-{len(self.done) + 1}.data").open("w+b")
        self.data.write(tensor_bytes(tensor))
        self.entries.append((key, tensor.dtype, list(tensor.shape)))
        self.filled += nbytes
        self.total += nbytes

    def finish_shard(self) -> None:
        path = self.out / f"shard-{len(self.done) + 1}.safetensors"
        with path.open("wb") as shard:
            shard.write(header(self.entries))
            self.data.seek(0)
            shutil.copyfileobj(self.data, shard, 64 * 2**20)
        self.data.close()
        Path(self.data.name).unlink()
        self.done.append((path, [key for key, _, _ in self.entries]))
        self.entries, self.data, self.filled = [], None, 0

    def close(self) -> int:
        """Write the last shard, name the shards as save_pretrained does (and the index, for several); returns the
        number of shards."""
        if self.entries:
            self.finish_shard()
        names = shard_names(len(self.done))
        for (path, _), name in zip(self.done, names):
            path.rename(self.out / name)
        if len(self.done) > 1:
            write_index(self.out, {key: name for (_, keys), name in zip(self.done, names) for key in keys}, self.total)
        return len(self.done)
