"""merge: dequantize the NF4 base and merge the adapter into it, then save a plain 16-bit HF checkpoint.

The adapter learned a correction to the NF4 weights (W_nf4 + BA), not to the original 16-bit ones, so by default
(`merge.into=nf4`) it is merged into dequant(W_nf4), in float32; `merge.into=original` merges it into the 16-bit
source weights instead, as LLaMA-Factory and unsloth do.

The merge streams, so that its memory does not grow with the model: weights are read from the saved checkpoints
tensor by tensor (see Checkpoint), one decoder layer at a time (see Streamed), merged by peft's own LoRA layers,
and written to disk as soon as they are merged, into shards of at most `merge.max_shard_size` (the HF sharded
layout, see ShardWriter). Reading the saved NF4 checkpoint also means that no forward pass has run on the weights
(bitsandbytes may repack them during one: see models.repacked_for_cpu).

The same layer-at-a-time forward checks the result on a probe batch: NF4 base + adapter (peft's LoRA layers,
unmerged, over dequant(W_nf4), all in float32) against the merged layers as they are written. With
`merge.into=nf4` the check is exact (limits `merge.min_argmax_agreement`, `merge.max_mean_abs_logit_diff`) and
the stage fails on a miss; with `original` no exact reference exists, so the distance is recorded, not judged.
The manifest records which check ran (`check.mode`) and its numbers, and how far the written `merge.dtype`
checkpoint, read back from its shards, is from the reference (`probe_<dtype>`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import compute, memory
from ..checkpoints import Checkpoint, ShardWriter, saved_names
from ..config import Config, shard_bytes
from ..data import read_jsonl, row_text
from ..models import artifact_paths, device, load_tokenizer, local_dir, torch_dtype

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"


class MergeMismatch(RuntimeError):
    pass


def adapter_key(param: str) -> str:
    """The adapter file's name of a LoRA parameter: `x.lora_A.default.weight` -> `base_model.model.x.lora_A.weight`."""
    return "base_model.model." + param.replace(".default.", ".")


class Streamed:
    """The model with its decoder layers on the meta device, each filled from the checkpoints just before its
    forward pass and emptied after it: a forward pass over any depth holds one layer at a time, besides the rest
    (embeddings, final norm, head). With `adapter_dir`, peft's LoRA layers are injected, unmerged."""

    def __init__(self, config_dir: Path, dtype: torch.dtype, adapter_dir: Path | None, trust_remote_code: bool):
        from accelerate import init_empty_weights
        from accelerate.utils import set_module_tensor_to_device
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(config_dir), trust_remote_code=trust_remote_code)
        config.__dict__.pop("quantization_config", None)
        with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) are computed, not loaded
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        for name, _ in list(self.model.named_buffers()):
            set_module_tensor_to_device(self.model, name, device())
        if adapter_dir is not None:
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig.from_pretrained(str(adapter_dir)), self.model, low_cpu_mem_usage=True)
        self.model.eval()  # no LoRA dropout
        blocks = set(self.model._no_split_modules or ())
        layers = [name for name, m in self.model.named_modules() if type(m).__name__ in blocks]
        if not layers:
            raise RuntimeError(f"{config.model_type}: no decoder layers found ({', '.join(blocks) or 'none named'})")

        def part(name: str) -> str:
            return next((layer for layer in layers if name.startswith(layer + ".")), "")
        # Each part's parameters and LoRA layers, by full name: part "" is everything outside the decoder layers.
        self.parts: dict[str, list[str]] = {"": [], **{layer: [] for layer in layers}}
        self.lora: dict[str, list] = {p: [] for p in self.parts}
        for name, _ in self.model.named_parameters():
            self.parts[part(name)].append(name)
        if adapter_dir is not None:
            from peft.tuners.lora import LoraLayer

            for name, module in self.model.named_modules():
                if isinstance(module, LoraLayer):
                    self.lora[part(name)].append(module)

    def set(self, tensors: dict[str, torch.Tensor]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, tensor in tensors.items():
            set_module_tensor_to_device(self.model, name, tensor.device, value=tensor)

    @torch.no_grad()
    def logits(self, batch: dict, fill: Callable[[list[str]], dict], after: Callable[[str], None] | None = None,
               what: str = "forward") -> torch.Tensor:
        """The probe logits, each part filled by `fill(its parameter names)`; `after(part)` runs once a part is
        filled, before it computes (the merge)."""
        def load(part: str) -> None:
            self.set(fill(self.parts[part]))
            if not part:
                self.model.tie_weights()
            missing = [name for name in self.parts[part] if self.model.get_parameter(name).is_meta]
            if missing:
                raise RuntimeError(f"the checkpoint lacks {', '.join(missing[:5])}")
            if after:
                after(part)

        load("")
        bar = tqdm(total=len(self.parts) - 1, desc=f"merge: {what}", unit="layer")
        names = {self.model.get_submodule(part): part for part in self.parts if part}

        def pre(layer, _):
            load(names[layer])

        def post(layer, _, __):
            self.set({name: self.model.get_parameter(name).to("meta") for name in self.parts[names[layer]]})
            bar.update()
        handles = [h for layer in names for h in (layer.register_forward_pre_hook(pre),
                                                  layer.register_forward_hook(post))]
        try:
            return probe_logits(self.model, batch)
        finally:
            for handle in handles:
                handle.remove()
            bar.close()


def filler(streamed: Streamed, weights: Checkpoint, adapter: Checkpoint | None, dtype: torch.dtype):
    """`fill` for Streamed.logits: base weights from `weights` (dequantized if 4-bit) in `dtype`, LoRA weights from
    `adapter`; parameters the checkpoint does not hold (a tied head) are left to tie_weights."""
    on, saved = device(), saved_names(streamed.model, weights)

    def fill(names: list[str]) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in names:
            if ".lora_" in name:
                tensors[name] = adapter.raw(adapter_key(name), on).float()
            elif name in saved:
                tensors[name] = weights.float32(saved[name], on).to(dtype)
        return tensors
    return fill


def probe_batch(tokenizer, train_dir: Path, n: int) -> dict:
    """Whole rows (prompt and answer) from the held-out split, or the training split if nothing was held out."""
    rows = read_jsonl(train_dir / "data" / "heldout.jsonl") or read_jsonl(train_dir / "data" / "train.jsonl")
    texts = [row_text(tokenizer, row) for row in rows[:n]]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device())


@torch.no_grad()
def probe_logits(model, batch: dict) -> torch.Tensor:
    model.eval()  # no LoRA dropout
    return model(**batch, use_cache=False).logits.float()[batch["attention_mask"].bool()]


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    diff = (reference - candidate).abs()
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "argmax_agreement": (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item(),
            "probe_tokens": reference.shape[0]}


def check(cfg: Config, reference_logits: torch.Tensor, merged_logits: torch.Tensor, exact: bool) -> dict:
    """Compare the merged model with NF4 base + adapter; with `exact`, raise MergeMismatch if it misses the limits."""
    result = compare(reference_logits, merged_logits)
    if not exact:
        log.info("merged into the original weights vs NF4 base + adapter (no exact reference): argmax agreement "
                 "%.4f, mean |dlogit| %.2e", result["argmax_agreement"], result["mean_abs_logit_diff"])
        return {**result, "mode": "distance (merged into the original 16-bit weights: the adapter was trained on "
                                  "NF4, so nothing reproduces it exactly)"}
    result.update(mode="exact (float32, layer by layer)", min_argmax_agreement=cfg.merge.min_argmax_agreement,
                  max_mean_abs_logit_diff=cfg.merge.max_mean_abs_logit_diff)
    log.info("merged vs NF4 + adapter, %s: argmax agreement %.4f (>= %.4f), mean |dlogit| %.2e (<= %.2e)",
             result["mode"], result["argmax_agreement"], result["min_argmax_agreement"],
             result["mean_abs_logit_diff"], result["max_mean_abs_logit_diff"])
    if (result["argmax_agreement"] < result["min_argmax_agreement"]
            or result["mean_abs_logit_diff"] > result["max_mean_abs_logit_diff"]):
        raise MergeMismatch(f"merged model disagrees with NF4 base + adapter: {result}")
    return result


def merge_into(cfg: Config, work: Path, nf4_dir: Path, into_dir: Path, adapter_dir: Path,
               batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the adapter into the weights of `into_dir`, layer by layer, writing `merge.dtype` shards to `work` as
    it goes. Returns the probe logits of NF4 base + adapter and of the merged model, both in float32."""
    nf4, into, adapter = Checkpoint(nf4_dir), Checkpoint(into_dir), Checkpoint(adapter_dir, ADAPTER_FILE)
    if set(into.weights) != set(nf4.weights):
        raise RuntimeError(f"{into_dir} and {nf4_dir} hold different weights: "
                           f"{sorted(set(into.weights) ^ set(nf4.weights))[:5]}")
    streamed = Streamed(nf4_dir, torch.float32, adapter_dir, cfg.model.trust_remote_code)
    reference = streamed.logits(batch, filler(streamed, nf4, adapter, torch.float32), what="NF4 + adapter")

    saved = saved_names(streamed.model, into)  # written under the names the checkpoint has them, as save_pretrained
    written = {part: [name for name in names if name in saved] for part, names in streamed.parts.items()}
    writer = ShardWriter(work, [(saved[name], streamed.model.get_parameter(name).shape)
                                for names in written.values() for name in names],
                         torch_dtype(cfg.merge.dtype), shard_bytes(cfg.merge.max_shard_size))

    def merge(part: str) -> None:  # peft's own merge (W += scale * BA, in float32), then the result is written
        for layer in streamed.lora[part]:
            layer.merge()
        for name in written[part]:
            writer.add(saved[name], streamed.model.get_parameter(name))
    merged = streamed.logits(batch, filler(streamed, into, adapter, torch.float32), after=merge, what="merge")
    log.info("merge: %d shard(s) of at most %s written", writer.close(), cfg.merge.max_shard_size)
    return reference, merged


def save_config(source: Path, work: Path, dtype: torch.dtype) -> None:
    """The merged checkpoint's config (the source's, without the 4-bit quantization) and generation config."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(source))
    config.__dict__.pop("quantization_config", None)
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(work)
    if (source / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(str(source)).save_pretrained(work)


def run(cfg: Config, work: Path, inputs: dict[str, Path]) -> dict:
    memory.return_freed_memory()
    paths = artifact_paths(inputs)
    nf4_dir, adapter_dir = paths["nf4"], paths["qlora"]
    into_dir = nf4_dir if cfg.merge.into == "nf4" else local_dir(paths["base16"], cfg.model)
    tokenizer = load_tokenizer(nf4_dir)
    batch = probe_batch(tokenizer, inputs["train"], cfg.merge.probe_examples)

    reference, merged = merge_into(cfg, work, nf4_dir, into_dir, adapter_dir, batch)
    result = check(cfg, reference, merged, exact=cfg.merge.into == "nf4")
    save_config(nf4_dir, work, torch_dtype(cfg.merge.dtype))
    tokenizer.save_pretrained(work)
    # The stored weights as later stages compute with them: read back, in the run's compute dtype.
    read_back = Streamed(work, compute.dtype(cfg), None, cfg.model.trust_remote_code)
    written = read_back.logits(batch, filler(read_back, Checkpoint(work), None, compute.dtype(cfg)),
                               what=f"read back, in {compute.dtype_name(cfg)}")
    stored = compare(reference, written)
    log.info("stored in %s, computed in %s: argmax agreement %.4f, mean |dlogit| %.3f vs NF4 + adapter",
             cfg.merge.dtype, compute.dtype_name(cfg), stored["argmax_agreement"], stored["mean_abs_logit_diff"])
    return {"into": cfg.merge.into, "check": result, f"probe_{cfg.merge.dtype}": stored, "dtype": cfg.merge.dtype,
            "computed_in": compute.dtype_name(cfg)}
