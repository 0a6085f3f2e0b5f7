"""Training throughput of the train stage against TRL's SFTTrainer on the same model, data, LoRA settings and
steps, or of the train stage with data.packing off and on. Writes JSON with both figures and their ratio.

    python scripts/bench_train.py                       # the embedded default, 10 steps, against TRL
    python scripts/bench_train.py train.max_steps=20 model.name_or_path=...   # any pipeline override
    python scripts/bench_train.py packing data.source=chats.jsonl             # packing off / on

Packing pays where lengths are uneven (padding is what it saves), e.g. short chats mixed with documents:
    python scripts/bench_train.py packing 'data.sources=[{path: builtin}, {path: docs.jsonl}]'

Needs `pip install trl` (not a runtime dependency). Both trainers run on the cached NF4 base (the script runs
the base stage first if needed), with the same seed, batch size, learning rate and LoRA config, and the loss on
the answer only. Both see the same rows, so tokens/s is steps x batch x the mean row length in tokens over each
trainer's wall time in `train()`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from pipeline.data import read_jsonl
from pipeline.models import load_nf4, load_tokenizer
from pipeline.runner import experiment_dir, run
from pipeline.stages import train

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def last_loss(trainer) -> float | None:
    return next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None)


def ours(cfg, base_dir: Path, work: Path) -> tuple[dict, float]:
    tokenizer = load_tokenizer(base_dir)
    dataset, _, _ = train.build_dataset(cfg, tokenizer, work)
    model = train.build_model(cfg, base_dir)
    trainer = train.build_trainer(cfg, model, tokenizer, dataset, work / "checkpoints")
    trainer.args.save_strategy = "no"
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    mean_row_tokens = sum(len(ids) for ids in dataset["input_ids"]) / len(dataset)
    return {"seconds": seconds, "final_loss": last_loss(trainer)}, mean_row_tokens


def trl(cfg, base_dir: Path, work: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(base_dir)
    chats = [row["messages"] for row in read_jsonl(work / "data" / "train.jsonl")]
    dataset = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in chats])
    t = cfg.train
    args = SFTConfig(output_dir=str(work / "trl"), max_steps=t.max_steps, learning_rate=t.lr,
                     per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
                     warmup_steps=t.warmup_steps, lr_scheduler_type=t.lr_scheduler, logging_steps=t.logging_steps,
                     save_strategy="no", seed=cfg.seed, report_to=[], max_length=cfg.data.max_seq_len,
                     completion_only_loss=True, gradient_checkpointing=t.gradient_checkpointing,
                     use_cpu=not torch.cuda.is_available(), bf16=False)
    model = load_nf4(base_dir, cfg)
    set_seed(cfg.seed)
    lora = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                      target_modules=t.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "final_loss": last_loss(trainer)}


def packing(cfg, base_dir: Path, work: Path) -> tuple[dict, float]:
    """The train stage with data.packing off, then on: the same rows in the same order."""
    results = {}
    for packed in (False, True):
        cfg.data.packing = packed
        results[f"packing {'on' if packed else 'off'}"], mean_row_tokens = ours(cfg, base_dir, work / f"{packed}")
    return results, mean_row_tokens


def main(argv: list[str]) -> None:
    mode, overrides = (argv[0], argv[1:]) if argv[:1] == ["packing"] else ("trl", argv)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["stage=base", "train.max_steps=10", *overrides])
    run(cfg)  # the cached NF4 base both trainers start from
    exp = experiment_dir(cfg)
    work, base_dir = exp / "bench_train", exp / "base" / "nf4"
    if mode == "packing":
        results, mean_row_tokens = packing(cfg, base_dir, work)
    else:
        mine, mean_row_tokens = ours(cfg, base_dir, work)
        results = {"ours (pipeline train stage)": mine, "trl SFTTrainer": trl(cfg, base_dir, work)}
    # Tokens of the examples themselves (padding excluded): the same in both runs.
    tokens = cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum * mean_row_tokens
    for r in results.values():
        r["tokens_per_s"] = tokens / r["seconds"]
    first, second = (r["tokens_per_s"] for r in results.values())
    ratio = ({"ratio_packed_over_padded": second / first} if mode == "packing" else
             {"ratio_ours_over_trl": first / second})
    report = {"steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size, "model": cfg.model.name_or_path,
              "mean_example_tokens": mean_row_tokens, "results": results, **ratio}
    out = exp / ("bench_train_packing.json" if mode == "packing" else "bench_train.json")
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
