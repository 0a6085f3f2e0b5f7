"""The memory plan (pipeline/plan.py): `plan=true` prints every stage's predicted peak and writes nothing; a run
whose later stage cannot fit stops before training, in one line; the shapes it predicts from are the model's."""
from __future__ import annotations

import os
import subprocess
import sys

from transformers import AutoModelForCausalLM

from pipeline.config import STAGES
from pipeline.plan import shape

from .conftest import TINY, compose_config

GIB = 2**30


def pipeline(*overrides: str, limit: int | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeline", *overrides]
    if limit is not None:  # a capped address space, as under a memory-limited job
        command = ["prlimit", f"--as={limit}", *command]
    return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # the log: Hydra's console handler


def test_plan_prints_every_stage_and_writes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "outputs"
    result = pipeline("plan=true", f"model.name_or_path={tiny_model_dir}", f"output_dir={out}", *TINY)
    assert result.returncode == 0, result.stdout[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] and line.split()[0] in STAGES]
    assert [row[0] for row in rows] == list(STAGES[:-1])  # serve.enabled=false in the tiny settings
    for row in rows:
        assert row[1] == "cpu" and 0.3 < float(row[2]) < 3 and float(row[4]) > 1, row  # GiB
        assert 0 < float(row[6]) < 100 and row[7] == "s", row  # the tiny run's stages take seconds each
    footer = next(line for line in result.stdout.splitlines() if "matmul rate" in line)
    assert "computing in" in footer and "to run)" in footer, footer
    assert not out.exists(), "plan=true writes nothing"


def test_run_that_cannot_fit_eval_stops_before_training(tiny_model_dir, tmp_path):
    """Under an address-space cap the tiny run fits, except an eval scoring batch made huge (a large lm-eval batch
    of long windows): the run stops before the base stage, names eval, and writes nothing."""
    out = tmp_path / "outputs"
    overrides = [f"model.name_or_path={tiny_model_dir}", f"output_dir={out}", *TINY]
    heavy_eval = ["eval.lm_eval.batch_size=64", "eval.ppl_seq_len=4096"]
    cap = 4 * GIB
    assert pipeline("plan=true", *overrides, *heavy_eval, limit=cap).returncode == 0  # the plan itself runs capped
    result = pipeline(*overrides, *heavy_eval, limit=cap)
    assert result.returncode == 2, result.stdout[-3000:]
    errors = [line for line in result.stdout.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "memory plan: stage eval needs about" in errors[0], errors
    assert "RLIMIT_AS" in result.stdout and "eval.lm_eval.batch_size" in errors[0]
    assert not out.exists(), "nothing was written"
    # Without the heavy eval the same cap takes the whole plan.
    fits = pipeline("plan=true", *overrides, limit=cap)
    assert "DOES NOT FIT" not in fits.stdout and "RLIMIT_AS" in fits.stdout


def test_shapes_are_the_models(tiny_model_dir):
    cfg = compose_config(f"model.name_or_path={tiny_model_dir}")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    s = shape(cfg)
    assert s.params == model.num_parameters()
    layers = model.model.layers
    assert s.layers == len(layers) and s.layer == sum(p.numel() for p in layers[0].parameters())
    linears = [m for m in layers.modules() if m.__class__.__name__ == "Linear"]
    assert s.linear == sum(m.weight.numel() for m in linears)
    r = cfg.train.lora_r
    assert s.lora == sum(r * (m.in_features + m.out_features) for m in linears)  # all-linear
    assert s.embedding == model.get_input_embeddings().weight.numel()  # tied head counted once
