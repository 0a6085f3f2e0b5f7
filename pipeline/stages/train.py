"""train: a LoRA adapter on the cached NF4 base (QLoRA), with periodic checkpoints and resume.

Outputs: `adapter/` (peft, safetensors), `loss.json` (the training loss history, and the held-out loss with
train.eval_steps), `data/train.jsonl` and `data/heldout.jsonl` (the rows it trained on and the ones held out for
evaluation, normalized to chats or texts). Tracker logs (train.report_to) go to `<experiment>/tracking/`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf

from .. import compute, distributed
from ..config import Config, ConfigError, trackers
from ..data import compact, load_sources, mix, tokenize_rows, write_jsonl
from ..models import computes_in, load_nf4, load_tokenizer, nf4_layers

log = logging.getLogger(__name__)


def tokenize(cfg: Config, tokenizer, rows, what: str):
    """Training examples from normalized rows; chat rows over data.max_seq_len tokens are dropped and counted."""
    d = cfg.data
    examples = rows.map(lambda batch: tokenize_rows(tokenizer, batch, d.train_on == "last_turn", d.max_seq_len),
                        batched=True, remove_columns=rows.column_names, desc=f"tokenizing {what}")
    kept = examples.filter(lambda e: len(e["input_ids"]) <= d.max_seq_len)
    dropped = len(examples) - len(kept)
    if dropped:
        log.warning("%s: dropped %d of %d examples longer than data.max_seq_len=%d tokens", what, dropped,
                    len(examples), d.max_seq_len)
    if len(examples) and not len(kept):
        raise ConfigError(f"data.max_seq_len={d.max_seq_len}: no example of {what} fits in it")
    return kept, dropped


def build_dataset(cfg: Config, tokenizer, work: Path):
    """The training examples (every source's, mixed by weight), the held-out ones, and counts for the manifest.
    The normalized rows are saved as data/train.jsonl and data/heldout.jsonl for the later stages."""
    import datasets

    sources = load_sources(cfg.data, cfg.seed, work / "data")
    write_jsonl([compact(row) for _, rows, _ in sources for row in rows], work / "data" / "train.jsonl")
    heldout_rows = datasets.concatenate_datasets([heldout for _, _, heldout in sources])
    write_jsonl([compact(row) for row in heldout_rows], work / "data" / "heldout.jsonl")
    parts, counts = [], []
    for source, rows, heldout in sources:
        examples, dropped = tokenize(cfg, tokenizer, rows, source.path)
        parts.append(examples)
        counts.append({"source": source.path, "weight": source.weight, "rows": len(rows),
                       "examples": len(examples), "dropped_rows": dropped, "heldout_rows": len(heldout)})
    train = mix(parts, [source.weight for source, _, _ in sources], cfg.seed)
    if len(sources) > 1:
        log.info("data: %d training examples mixed from %s", len(train),
                 ", ".join(f"{c['source']} ({c['examples']} examples, weight {c['weight']:g})" for c in counts))
    heldout, _ = tokenize(cfg, tokenizer, heldout_rows, "the held-out rows")
    stats = {"train_rows": len(train), "dropped_rows": sum(c["dropped_rows"] for c in counts),
             "heldout_rows": len(heldout_rows), "sources": counts}
    return train, heldout, stats


def build_model(cfg: Config, base_dir: Path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    model = load_nf4(base_dir, cfg)
    for layer in nf4_layers(model):
        # On CPUs with AVX512-BF16, an eval-mode forward (train.eval_steps) would repack the 4-bit weights into
        # bitsandbytes' CPU inference layout, whose kernel has no backward: every later step would get no gradient
        # through the base layers. Kept in the standard layout, both CPU classes train alike.
        layer.support_avx512bf16_for_cpu = False
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


def training_args(cfg: Config, checkpoints: Path, run_name: str | None = None):
    from transformers import TrainingArguments

    t = cfg.train
    # Mixed precision on a GPU, in the compute dtype; on CPU the model itself computes in it (load_nf4).
    on_gpu, dtype = torch.cuda.is_available(), compute.dtype_name(cfg)
    per_device = t.batch_size // distributed.world_size()
    return TrainingArguments(
        output_dir=str(checkpoints), max_steps=t.max_steps, learning_rate=t.lr,
        # train.batch_size is the global batch: the same optimization on 1 GPU or N.
        per_device_train_batch_size=per_device, gradient_accumulation_steps=t.grad_accum,
        warmup_steps=t.warmup_steps, lr_scheduler_type=t.lr_scheduler, weight_decay=t.weight_decay,
        # The first and the last step's loss are always logged: a run shorter than logging_steps still has both.
        logging_steps=t.logging_steps, logging_first_step=True, save_steps=t.save_steps, save_total_limit=2,
        eval_strategy="steps" if t.eval_steps else "no", eval_steps=t.eval_steps, per_device_eval_batch_size=per_device,
        prediction_loss_only=True,  # the held-out loss only: no logits kept
        seed=cfg.seed, data_seed=cfg.seed, bf16=on_gpu and dtype == "bfloat16", fp16=on_gpu and dtype == "float16",
        use_cpu=not on_gpu, optim="adamw_torch", report_to=trackers(t), run_name=run_name,
        remove_unused_columns=False, gradient_checkpointing=False,  # already enabled by the k-bit preparation
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; the search costs a pass
        dataloader_num_workers=0)


def collator(cfg: Config, tokenizer):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if cfg.data.packing:
        # Padding-free packing: a batch's examples become one sequence whose position ids restart at each example.
        # transformers' attention reads the boundaries from them (flash-attention's variable-length kernels, a
        # block-diagonal causal mask for sdpa and eager), and the first label of each example is masked.
        return DataCollatorWithFlattening()
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


def log_last_step():
    """A callback that logs the last step's loss for the manifest, the card and the trackers: transformers logs a step
    only when it is a multiple of logging_steps (it evaluates and saves the last one regardless)."""
    from transformers import TrainerCallback

    class LogLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True

    return LogLastStep()


def build_trainer(cfg: Config, model, tokenizer, dataset, checkpoints: Path, heldout=None, run_name=None):
    """The Trainer this stage runs (also what scripts/bench_train.py measures)."""
    from transformers import Trainer

    return Trainer(model=model, args=training_args(cfg, checkpoints, run_name), train_dataset=dataset,
                   eval_dataset=heldout if cfg.train.eval_steps else None, data_collator=collator(cfg, tokenizer),
                   callbacks=[log_last_step()])


@contextlib.contextmanager
def tracker_environment(cfg: Config, folder: Path):
    """Offline, local defaults for the trackers, unless the environment already names others; restored after."""
    settings = {}
    if "wandb" in trackers(cfg.train):
        settings.update(WANDB_MODE="offline", WANDB_DIR=str(folder), WANDB_PROJECT="pipeline")
    if "mlflow" in trackers(cfg.train):
        # MLflow's file store needs no server and no database (MLflow 3 keeps it in maintenance mode, behind a flag).
        settings.update(MLFLOW_TRACKING_URI=(folder / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true",
                        MLFLOW_EXPERIMENT_NAME=cfg.experiment)
    added = [key for key in settings if key not in os.environ]
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.update({key: settings[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def track_pipeline(cfg: Config, trainer, folder: Path, prints: dict[str, str]) -> None:
    """Point TensorBoard at the experiment's tracking folder and log the pipeline config and the stage fingerprints to
    every tracker (the Trainer logs its own arguments and the model config)."""
    from transformers import TrainerCallback
    from transformers.integrations import TensorBoardCallback

    tensorboard = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None)
    if tensorboard:
        tensorboard.logging_dir = str(folder / "tensorboard" / f"train-{prints['train']}")
    payload = {"pipeline": OmegaConf.to_container(cfg, resolve=True), "fingerprints": prints}

    class PipelineConfig(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            if tensorboard:
                tensorboard.tb_writer.add_text("pipeline", f"<pre>{yaml.safe_dump(payload, sort_keys=False)}</pre>")
            if "wandb" in args.report_to:
                import wandb
                wandb.config.update(payload, allow_val_change=True)
            if "mlflow" in args.report_to:
                import mlflow
                mlflow.log_dict(payload, "pipeline.json")
                mlflow.set_tags({f"fingerprint.{stage}": value for stage, value in prints.items()})

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero and "wandb" in args.report_to:
                import wandb
                wandb.finish()  # the Trainer leaves the run open until the process exits

    trainer.add_callback(PipelineConfig())


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
    from ..runner import experiment_dir, fingerprints

    base_dir = inputs["base"] / "nf4"
    tokenizer = load_tokenizer(base_dir)
    dataset, heldout, data_stats = build_dataset(cfg, tokenizer, work)
    model = build_model(cfg, base_dir)
    model.print_trainable_parameters()

    checkpoints = work / "checkpoints"
    last = distributed.broadcast(last_complete_checkpoint(checkpoints) if distributed.is_main() else None)
    if last:
        log.info("resuming from %s", last.name)
    prints, tracking = fingerprints(cfg), experiment_dir(cfg) / "tracking"
    run_name = f"{cfg.experiment}{'/' + cfg.sweep_point if cfg.sweep_point else ''} train-{prints['train'][:8]}"
    trainer = build_trainer(cfg, model, tokenizer, dataset, checkpoints, heldout, run_name)
    track_pipeline(cfg, trainer, tracking, prints)
    with tracker_environment(cfg, tracking):
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
    history = [{k: e[k] for k in ("step", "loss", "learning_rate", "eval_loss") if k in e}
               for e in trainer.state.log_history if "loss" in e or "eval_loss" in e]
    (work / "loss.json").write_text(json.dumps(history, indent=1))
    shutil.rmtree(checkpoints)  # resume state only: the adapter above is the artifact
    losses = [e["loss"] for e in history if "loss" in e]
    heldout_losses = [e["eval_loss"] for e in history if "eval_loss" in e]
    return {**data_stats, "resumed_from": last.name if last else None, "steps": trainer.state.global_step,
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "final_heldout_loss": heldout_losses[-1] if heldout_losses else None, "trackers": trackers(cfg.train),
            "train_runtime_s": result.metrics.get("train_runtime"), "computed_in": computes_in(model),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
