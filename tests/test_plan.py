"""The memory plan (pipeline/plan.py): `plan=true` prints every stage's predicted peak and writes nothing; a run
whose later stage cannot fit stops before training, in one line; the shapes it predicts from are the model's."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from pipeline import plan, timing
from pipeline.config import STAGES, ConfigError
from pipeline.plan import Launch, shape

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
    assert [row[0] for row in rows] == [s for s in STAGES if s not in ("gguf", "serve")]  # off in the tiny settings
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
    assert s.largest == s.embedding  # the largest tensor the base stage holds


# Llama-3's shapes (config.json of meta-llama/Meta-Llama-3-8B and -70B): the plan reads the config only.
LLAMA3 = {"8B": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32},
          "70B": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64}}


def llama3(size: str, folder) -> str:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_key_value_heads": 8,
              "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
              "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128009, **LLAMA3[size]}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def train_row(cfg, gpus: int, gib_free: float, launch: Launch) -> plan.Row:
    """The plan's train row on `gpus` GPUs with `gib_free` GiB free each, less memory.headroom (as memory.budgets)."""
    room = int((1 - cfg.memory.headroom) * gib_free * GIB)
    budgets = {**{gpu: room for gpu in range(gpus)}, "cpu": 200 * GIB}
    row, = plan.rows(cfg, ["train"], shape(cfg), budgets, timing.machine_rates(cfg), timing.chats(cfg), launch=launch)
    return row


def test_70b_trains_on_two_24gb_gpus_with_fsdp_only(tmp_path):
    """Llama-3-70B's NF4 weights (37 GiB) fill neither 24 GB GPU: under FSDP each holds half of them and the two
    layers it gathers, which fits at batch 1 per GPU with gradient checkpointing; without FSDP (one GPU, or DDP on
    two) it does not, and the refusal names the FSDP config and the key it needs."""
    cfg = compose_config(f"model.name_or_path={llama3('70B', tmp_path / 'llama3-70b')}", "train.batch_size=2",
                         "train.gradient_checkpointing=true", "train.lora_r=8")
    assert 70e9 < shape(cfg).params < 71e9
    fsdp = train_row(cfg, 2, 23.5, Launch(processes=2, fsdp=True))  # a 24 GB card's free memory
    assert fsdp.fits and fsdp.where == "FSDP x2, each cuda:0", (fsdp.predicted / GIB, fsdp.available / GIB)
    assert 18 * GIB < fsdp.terms["NF4 weights, this rank's share"] < 19 * GIB
    for launch in (Launch(processes=2, fsdp=False), Launch()):
        whole = train_row(cfg, 2, 23.5, launch)
        assert not whole.fits and whole.terms["NF4 weights"] > 36 * GIB
        with pytest.raises(ConfigError) as refused:
            plan.refuse_misfits([whole], set())
        assert "conf/accelerate/fsdp_qlora.yaml" in str(refused.value)
        assert "base.quant_storage=bfloat16" in str(refused.value)


def test_8b_trains_on_one_16gb_gpu_with_gradient_checkpointing(tmp_path):
    """Llama-3-8B on one 16 GB GPU: the NF4 weights (5.3 GiB) fit; the default batch's activations do not, and the
    refusal names train's own keys, not FSDP; with gradient checkpointing it fits."""
    model = llama3("8B", tmp_path / "llama3-8b")
    default = train_row(compose_config(f"model.name_or_path={model}"), 1, 15.5, Launch())
    assert not default.fits and 5 * GIB < default.terms["NF4 weights"] < 6 * GIB
    assert "train.gradient_checkpointing=true" in default.fix and "FSDP" not in default.fix
    row = train_row(compose_config(f"model.name_or_path={model}", "train.gradient_checkpointing=true"), 1, 15.5,
                    Launch())
    assert row.fits and row.where == "cuda:0", row.predicted / GIB


def test_the_plan_reads_how_train_was_launched(monkeypatch):
    """accelerate launch with the FSDP config sets these in every process it starts."""
    assert Launch.this() == Launch()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert Launch.this() == Launch(processes=2)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert Launch.this() == Launch(processes=2, fsdp=True)


def test_gguf_perplexity_is_what_makes_the_gguf_stage_grow_with_the_model(tmp_path):
    """transformers' GGUF reader dequantizes a whole file to float32 (some 280 GB for Llama-3-70B): the plan counts it,
    and gguf.perplexity=false leaves it out. In bfloat16 whatever this CPU computes in: in float32 the merged model
    alone (4 bytes a parameter) would pass 280 GB."""
    model = f"model.name_or_path={llama3('70B', tmp_path / 'llama3-70b')}", "compute_dtype=bfloat16"
    peaks = [sum(plan.stage_terms("gguf", compose_config(*model, *more), shape(compose_config(*model)), True,
                                  False).values()) for more in ([], ["gguf.perplexity=false"])]
    assert peaks[0] > 280e9 > peaks[1], [p / GIB for p in peaks]
