"""train: a LoRA adapter on the cached NF4 base (QLoRA), with periodic checkpoints and resume.

Outputs: `adapter/` (peft, safetensors), `loss.json` (the loss history), `data/train.jsonl` and
`data/heldout.jsonl` (the chats it trained on and the ones held out for evaluation).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from .. import distributed
from ..config import Config, ConfigError
from ..data import load_rows, split_rows, tokenize_chat, write_jsonl
from ..models import load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)


def build_dataset(cfg: Config, tokenizer, work: Path):
    """Tokenized training chats (rows over data.max_seq_len are dropped and counted); splits saved as JSONL."""
    chats = load_rows(cfg.data, cfg.seed, work / "data")
    train_chats, heldout_chats = split_rows(chats, cfg.data.heldout_examples, cfg.seed)
    write_jsonl(list(train_chats), work / "data" / "train.jsonl")
    write_jsonl(list(heldout_chats), work / "data" / "heldout.jsonl")
    tokenized = train_chats.map(lambda row: tokenize_chat(tokenizer, row["messages"]), remove_columns=["messages"])
    kept = tokenized.filter(lambda row: len(row["input_ids"]) <= cfg.data.max_seq_len)
    dropped = len(tokenized) - len(kept)
    if dropped:
        log.warning("dropped %d of %d training rows longer than data.max_seq_len=%d tokens", dropped,
                    len(tokenized), cfg.data.max_seq_len)
    if len(kept) == 0:
        raise ConfigError(f"data.max_seq_len={cfg.data.max_seq_len}: no training row fits in it")
    return kept, {"train_rows": len(kept), "dropped_rows": dropped, "heldout_rows": len(heldout_chats)}


def build_model(cfg: Config, base_dir: Path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    model = load_causal_lm(base_dir, cfg.model, cfg.base.compute_dtype)
    checkpointing = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if distributed.fsdp():
        # FSDP flattens each block into one tensor of one dtype: keep the norms in the storage dtype instead of
        # the float32 that prepare_model_for_kbit_training gives them (the LoRA layers get their own units).
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(**checkpointing)
        model.enable_input_require_grads()
    else:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
                                                **checkpointing)
    lora = LoraConfig(r=cfg.train.lora_r, lora_alpha=cfg.train.lora_alpha, lora_dropout=cfg.train.lora_dropout,
                      target_modules=cfg.train.target_modules if isinstance(cfg.train.target_modules, str)
                      else list(cfg.train.target_modules), task_type="CAUSAL_LM")
    set_seed(cfg.seed)  # the LoRA init draws from the global RNG: seed it right before wrapping
    return get_peft_model(model, lora)


def training_args(cfg: Config, checkpoints: Path):
    from transformers import TrainingArguments

    t = cfg.train
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=str(checkpoints), max_steps=t.max_steps, learning_rate=t.lr,
        # train.batch_size is the global batch: the same optimization on 1 GPU or N.
        per_device_train_batch_size=t.batch_size // distributed.world_size(), gradient_accumulation_steps=t.grad_accum,
        warmup_steps=t.warmup_steps, lr_scheduler_type=t.lr_scheduler, weight_decay=t.weight_decay,
        logging_steps=t.logging_steps, save_steps=t.save_steps, save_total_limit=2,
        seed=cfg.seed, data_seed=cfg.seed, bf16=bf16, fp16=torch.cuda.is_available() and not bf16,
        use_cpu=not torch.cuda.is_available(), optim="adamw_torch", report_to=[],
        remove_unused_columns=False, gradient_checkpointing=False,  # already enabled by the k-bit preparation
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; the search costs a pass
        dataloader_num_workers=0)


def build_trainer(cfg: Config, model, tokenizer, dataset, checkpoints: Path):
    """The Trainer this stage runs (also what scripts/bench_train.py measures)."""
    from transformers import DataCollatorForSeq2Seq, Trainer

    return Trainer(model=model, args=training_args(cfg, checkpoints), train_dataset=dataset,
                   data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True))


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint the Trainer finished writing (trainer_state.json is written last); a checkpoint a
    crash cut short is deleted so that the Trainer does not pick it up."""
    found = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for ckpt in found:
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
            return ckpt
        except (OSError, ValueError):
            log.warning("discarding incomplete checkpoint %s", ckpt.name)
            shutil.rmtree(ckpt)
    return None


def run(cfg: Config, work: Path, inputs: dict[str, Path]) -> dict:
    base_dir = inputs["base"] / "nf4"
    tokenizer = load_tokenizer(base_dir)
    dataset, data_stats = build_dataset(cfg, tokenizer, work)
    model = build_model(cfg, base_dir)
    model.print_trainable_parameters()

    checkpoints = work / "checkpoints"
    last = distributed.broadcast(last_complete_checkpoint(checkpoints) if distributed.is_main() else None)
    if last:
        log.info("resuming from %s", last.name)
    trainer = build_trainer(cfg, model, tokenizer, dataset, checkpoints)
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)

    if trainer.is_fsdp_enabled:  # the adapter is sharded: the Trainer gathers it, rank 0 writes it
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(work / "adapter"))
    elif distributed.is_main():
        model.save_pretrained(work / "adapter")
    if not distributed.is_main():
        return {}
    (work / "adapter" / "training_args.bin").unlink(missing_ok=True)  # a pickle, and the manifest has the config
    # The format the adapter was trained on, for whoever serves it on the base model (the default template when
    # the tokenizer has none: see data.DEFAULT_CHAT_TEMPLATE).
    (work / "adapter" / "chat_template.jinja").write_text(tokenizer.chat_template)
    history = [{k: e[k] for k in ("step", "loss", "learning_rate") if k in e}
               for e in trainer.state.log_history if "loss" in e]
    (work / "loss.json").write_text(json.dumps(history, indent=1))
    shutil.rmtree(checkpoints)  # resume state only: the adapter above is the artifact
    losses = [e["loss"] for e in history]
    return {**data_stats, "resumed_from": last.name if last else None, "steps": trainer.state.global_step,
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
