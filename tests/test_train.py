"""train: a run killed with SIGKILL mid-training resumes from its last checkpoint and ends with the same adapter
as an uninterrupted run; the LoRA init is seeded."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bitsandbytes.functional import has_avx512bf16
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


def lora_gradients(model, ids) -> dict:
    """One training step's gradients of the first layer's LoRA weights."""
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n}


def eval_forward_then_gradients(model, ids) -> dict:
    """lora_gradients after an eval-mode forward without gradients, as train.eval_steps runs between steps."""
    import torch

    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    return lora_gradients(model, ids)


def trained_model(finished):
    """The train stage's model on the finished run's NF4 base, and a batch of token ids."""
    import torch

    from pipeline.stages.train import build_model

    out, overrides, _ = finished
    model = build_model(compose_config(*overrides, "train.lora_dropout=0"), out / "default" / "base" / "nf4")
    return model, torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))


def test_held_out_evaluation_during_training_keeps_the_gradients(finished):
    """train.eval_steps runs eval-mode forwards between training steps. On CPUs with AVX512-BF16 bitsandbytes would
    repack the weights for inference there, and its inference kernel has no backward; the model that trains keeps
    them as they are, on every CPU."""
    import torch

    from pipeline.models import nf4_layers, repacked_for_cpu

    model, ids = trained_model(finished)
    before = lora_gradients(model, ids)
    assert before and all(g.abs().max() > 0 for g in before.values())
    after = eval_forward_then_gradients(model, ids)
    assert not any(repacked_for_cpu(layer) for layer in nf4_layers(model))
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes registers its packed CPU kernel only on CPUs with "
                    "AVX512-BF16: elsewhere the repacking it forces would be read by the standard kernel, a path no "
                    "user runs")
def test_the_control_repacked_weights_lose_the_gradients(finished):
    """The control of the test above: with the repacking bitsandbytes does by itself on AVX512-BF16 CPUs, the LoRA
    weights behind the base layers get no gradient."""
    from pipeline.models import nf4_layers, repacked_for_cpu

    model, ids = trained_model(finished)
    for layer in nf4_layers(model):
        layer.support_avx512bf16_for_cpu = True  # what bitsandbytes does by itself on AVX512-BF16 CPUs
    repacked = eval_forward_then_gradients(model, ids)
    assert all(repacked_for_cpu(layer) for layer in nf4_layers(model))
    # No gradient through the base layers: the LoRA weights behind them (q/k/v behind o_proj, gate/up behind
    # down_proj) get none; those on the residual stream still do.
    lost = {n.split(".")[-4] for n, g in repacked.items() if g.abs().max() == 0}
    assert {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} <= lost, lost
