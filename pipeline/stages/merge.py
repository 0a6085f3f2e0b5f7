"""merge: dequantize the NF4 base and merge the adapter into it, then save a plain 16-bit HF checkpoint.

The adapter learned a correction to the NF4 weights (W_nf4 + BA), not to the original 16-bit ones, so it is
merged into dequant(W_nf4), in float32, read from a freshly loaded NF4 checkpoint before any forward pass
(bitsandbytes may repack the weights during one: see models.repacked_for_cpu).

The merged model is then checked against NF4 base + adapter on a probe batch. The check is exact when that
reference computes in float32, as bitsandbytes does on GPU, and on every CPU once its packed bf16 CPU kernel is
switched off for the check: limits `merge.min_argmax_agreement` and `merge.max_mean_abs_logit_diff`. Should the
reference compute in a 16-bit dtype all the same, exactness is out of reach and the limits come from that dtype:
twice the distance between the merged model in float32 and the same model in that dtype, on the same batch. The
manifest records which check ran (`check.mode`), its limits and its numbers, and how far the stored
`merge.dtype` copy is from the reference (`probe_<dtype>`).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from ..config import Config
from ..data import read_jsonl, row_text
from ..models import (device, load_causal_lm, load_tokenizer, nf4_in_float32, nf4_layers, repacked_for_cpu,
                      torch_dtype)

log = logging.getLogger(__name__)


class MergeMismatch(RuntimeError):
    pass


def probe_batch(tokenizer, train_dir: Path, n: int) -> dict:
    """Whole rows (prompt and answer) from the held-out split, or the training split if nothing was held out."""
    rows = read_jsonl(train_dir / "data" / "heldout.jsonl") or read_jsonl(train_dir / "data" / "train.jsonl")
    texts = [row_text(tokenizer, row) for row in rows[:n]]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device())


@torch.no_grad()
def probe_logits(model, batch: dict) -> torch.Tensor:
    model.eval()  # no LoRA dropout
    return model(**batch).logits.float()[batch["attention_mask"].bool()]


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    diff = (reference - candidate).abs()
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "argmax_agreement": (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item(),
            "probe_tokens": reference.shape[0]}


def merged_in_float32(cfg: Config, base_dir: Path, adapter_dir: Path):
    """dequant(W_nf4) + BA in float32, from a freshly loaded NF4 checkpoint (no forward pass has run on it)."""
    from peft import PeftModel

    nf4 = nf4_in_float32(load_causal_lm(base_dir, cfg.model, "float32"))
    assert not any(repacked_for_cpu(layer) for layer in nf4_layers(nf4))
    dequantized = nf4.dequantize(dtype=torch.float32)
    # transformers keeps the load-time bnb weight conversions after dequantize(); saving would try to reverse them.
    dequantized._weight_conversions = None
    return PeftModel.from_pretrained(dequantized, adapter_dir).merge_and_unload()


def qlora_reference(cfg: Config, base_dir: Path, adapter_dir: Path, cpu_packing: bool = False):
    """NF4 base + adapter computing in float32: the function the merged weights must reproduce. `cpu_packing`
    lets bitsandbytes use its bf16 CPU kernel where the CPU has AVX512-BF16 (the check is then not exact)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(nf4_in_float32(load_causal_lm(base_dir, cfg.model, "float32"), cpu_packing),
                                     adapter_dir)


def compute_dtype(model) -> torch.dtype:
    """The dtype the 4-bit layers of `model` computed in, read after a forward pass."""
    if any(repacked_for_cpu(layer) for layer in nf4_layers(model)):
        return torch.bfloat16  # bitsandbytes' packed CPU kernel computes in bf16 only
    return next(iter({layer.compute_dtype for layer in nf4_layers(model)} - {torch.float32}), torch.float32)


def check_limits(cfg: Config, reference_dtype: torch.dtype, merged, merged_logits: torch.Tensor,
                 batch: dict) -> dict:
    """What the merged model must meet: exact agreement for a float32 reference, else the reference dtype's noise."""
    if reference_dtype == torch.float32:
        return {"mode": "exact (the reference computes in float32)",
                "min_argmax_agreement": cfg.merge.min_argmax_agreement,
                "max_mean_abs_logit_diff": cfg.merge.max_mean_abs_logit_diff}
    noise = compare(merged_logits, probe_logits(copy.deepcopy(merged).to(reference_dtype), batch))
    return {"mode": f"tolerance (the reference computes in {str(reference_dtype).removeprefix('torch.')}: limits "
                    "are twice that dtype's rounding noise on this model and batch)",
            "rounding_noise": noise,
            "min_argmax_agreement": 1 - 2 * (1 - noise["argmax_agreement"]),
            "max_mean_abs_logit_diff": 2 * noise["mean_abs_logit_diff"]}


def check(cfg: Config, reference_logits: torch.Tensor, reference_dtype: torch.dtype, merged, batch: dict) -> dict:
    """Compare the merged model with the reference (NF4 base + adapter, its logits on `batch`); raise
    MergeMismatch if it misses the limits."""
    merged_logits = probe_logits(merged, batch)
    result = {**compare(reference_logits, merged_logits),
              "reference_compute_dtype": str(reference_dtype).removeprefix("torch."),
              **check_limits(cfg, reference_dtype, merged, merged_logits, batch)}
    log.info("merged vs NF4 + adapter, %s: argmax agreement %.4f (>= %.4f), mean |dlogit| %.2e (<= %.2e)",
             result["mode"], result["argmax_agreement"], result["min_argmax_agreement"],
             result["mean_abs_logit_diff"], result["max_mean_abs_logit_diff"])
    if (result["argmax_agreement"] < result["min_argmax_agreement"]
            or result["mean_abs_logit_diff"] > result["max_mean_abs_logit_diff"]):
        raise MergeMismatch(f"merged model disagrees with NF4 base + adapter: {result}")
    return result


def run(cfg: Config, work: Path, inputs: dict[str, Path]) -> dict:
    base_dir, adapter_dir = inputs["base"] / "nf4", inputs["train"] / "adapter"
    tokenizer = load_tokenizer(base_dir)
    batch = probe_batch(tokenizer, inputs["train"], cfg.merge.probe_examples)

    merged = merged_in_float32(cfg, base_dir, adapter_dir)
    reference = qlora_reference(cfg, base_dir, adapter_dir)
    reference_logits = probe_logits(reference, batch)
    result = check(cfg, reference_logits, compute_dtype(reference), merged, batch)
    del reference

    merged = merged.to(torch_dtype(cfg.merge.dtype))
    stored = compare(reference_logits, probe_logits(merged, batch))
    log.info("stored in %s: argmax agreement %.4f, mean |dlogit| %.3f (rounding to 16 bits)", cfg.merge.dtype,
             stored["argmax_agreement"], stored["mean_abs_logit_diff"])
    merged.save_pretrained(work)
    tokenizer.save_pretrained(work)
    return {"check": result, f"probe_{cfg.merge.dtype}": stored, "dtype": cfg.merge.dtype}
