"""merge: dequantize the NF4 base and merge the adapter into it, then save a plain 16-bit HF checkpoint.

The adapter learned a correction to the NF4 weights (W_nf4 + BA), not to the original 16-bit ones, so it is
merged into dequant(W_nf4). The merge is done and checked in float32 against NF4 base + adapter on a probe batch
(the stage fails if they disagree beyond the tolerance in `merge.*`), then stored in `merge.dtype`; the manifest
records both comparisons.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import Config
from ..data import read_jsonl
from ..models import device, load_causal_lm, load_tokenizer, torch_dtype

log = logging.getLogger(__name__)


class MergeMismatch(RuntimeError):
    pass


def probe_batch(tokenizer, train_dir: Path, n: int) -> dict:
    """Whole chats (prompt and answer) from the held-out split, or the training split if nothing was held out."""
    chats = read_jsonl(train_dir / "data" / "heldout.jsonl") or read_jsonl(train_dir / "data" / "train.jsonl")
    texts = [tokenizer.apply_chat_template(c["messages"], tokenize=False) for c in chats[:n]]
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


def qlora_in_float32(cfg: Config, base_dir: Path, adapter_dir: Path):
    """NF4 base + adapter computing in float32: the exact function the merged weights must reproduce. (In bf16
    compute, rounding alone moves SmolLM2's logits by ~0.2 on average, which would hide a wrong merge.)"""
    import bitsandbytes as bnb
    from peft import PeftModel, prepare_model_for_kbit_training

    model = load_causal_lm(base_dir, cfg.model, "float32")
    # As in training: the unquantized weights (norms, embeddings) in float32, which is exact for bf16 values.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # Dequantize to float32 (the quant state says bf16, which would round W_nf4 before adding BA) and
            # compute in float32, so that the reference and the merge see the same W_nf4.
            module.compute_dtype = module.weight.quant_state.dtype = torch.float32
    return PeftModel.from_pretrained(model, adapter_dir)


def run(cfg: Config, work: Path, inputs: dict[str, Path]) -> dict:
    from peft import PeftModel

    base_dir, adapter_dir = inputs["base"] / "nf4", inputs["train"] / "adapter"
    tokenizer = load_tokenizer(base_dir)
    batch = probe_batch(tokenizer, inputs["train"], cfg.merge.probe_examples)

    qlora = qlora_in_float32(cfg, base_dir, adapter_dir)
    reference = probe_logits(qlora, batch)
    # Drop the LoRA layers again (unmerged), turn the NF4 weights into dequant(W_nf4), merge into those.
    dequantized = qlora.unload().dequantize(dtype=torch.float32)
    # transformers keeps the load-time bnb weight conversions after dequantize(); saving would try to reverse them.
    dequantized._weight_conversions = None
    merged = PeftModel.from_pretrained(dequantized, adapter_dir).merge_and_unload()
    check = compare(reference, probe_logits(merged, batch))
    log.info("merged vs NF4 + adapter (float32): argmax agreement %.4f, mean |dlogit| %.2e, max |dlogit| %.2e",
             check["argmax_agreement"], check["mean_abs_logit_diff"], check["max_abs_logit_diff"])
    if (check["argmax_agreement"] < cfg.merge.min_argmax_agreement
            or check["mean_abs_logit_diff"] > cfg.merge.max_mean_abs_logit_diff):
        raise MergeMismatch(f"merged model disagrees with NF4 base + adapter: {check} (limits: argmax agreement >= "
                            f"{cfg.merge.min_argmax_agreement}, mean |dlogit| <= {cfg.merge.max_mean_abs_logit_diff})")

    merged = merged.to(torch_dtype(cfg.merge.dtype))
    stored = compare(reference, probe_logits(merged, batch))
    log.info("stored in %s: argmax agreement %.4f, mean |dlogit| %.3f (rounding to 16 bits)", cfg.merge.dtype,
             stored["argmax_agreement"], stored["mean_abs_logit_diff"])
    merged.save_pretrained(work)
    tokenizer.save_pretrained(work)
    return {"probe_float32": check, f"probe_{cfg.merge.dtype}": stored, "dtype": cfg.merge.dtype}
