"""train: a run killed with SIGKILL mid-training resumes from its last checkpoint and ends with the same adapter
as an uninterrupted run; the LoRA init is seeded."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from pipeline.artifacts import read_manifest
from pipeline.runner import run

from .conftest import TINY, compose_config

STEPS = ["stage=train", "train.max_steps=60", "train.save_steps=5"]
ADAPTER = Path("default/train/adapter/adapter_model.safetensors")


def kill_after_first_checkpoint(overrides: list[str], out: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *overrides, f"output_dir={out}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list(out.glob("store/.train-*.partial/checkpoints/checkpoint-*/trainer_state.json")):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"


def test_killed_train_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    overrides = [f"model.name_or_path={tiny_model_dir}", *TINY, *STEPS]
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(overrides, killed)
    assert read_manifest(killed / "default" / "train") is None, "a killed stage is never trusted"

    resumed = run(compose_config(f"output_dir={killed}", *overrides))
    assert resumed["train"]["status"] != "cached"
    metrics = read_manifest(killed / "default" / "train")["metrics"]
    assert metrics["resumed_from"].startswith("checkpoint-") and metrics["steps"] == 60

    straight = tmp_path / "straight"
    run(compose_config(f"output_dir={straight}", *overrides))
    a, b = load_file(killed / ADAPTER), load_file(straight / ADAPTER)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-4, name


def test_lora_init_is_seeded(tiny_model_dir):
    from pipeline.stages.train import build_model

    cfg = compose_config(f"model.name_or_path={tiny_model_dir}", "seed=3")
    first, second = build_model(cfg, tiny_model_dir), build_model(cfg, tiny_model_dir)
    lora_a = [n for n, _ in first.named_parameters() if "lora_A" in n]
    assert lora_a
    params_a, params_b = dict(first.named_parameters()), dict(second.named_parameters())
    assert all((params_a[n] == params_b[n]).all() for n in lora_a)
