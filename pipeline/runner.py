"""Runs the stages like make: a stage runs when its artifacts are missing or stale, or when forced.

A stage's fingerprint hashes its slice of the config and its upstream stages' fingerprints, so changing
`gptq.bits` reruns gptq (and what follows) and nothing before it.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import time
from pathlib import Path

from omegaconf import OmegaConf

from . import __version__, preflight, report
from .artifacts import StageDir, fingerprint
from .config import STAGES, Config, validate
from .models import source_identity

log = logging.getLogger(__name__)

UPSTREAM = {"base": [], "train": ["base"], "merge": ["base", "train"], "gptq": ["train", "merge"],
            "eval": ["base", "train", "merge", "gptq"], "bench": ["base", "train", "merge", "gptq"]}
CONFIG_KEYS = {"base": ["model", "base"], "train": ["data", "train", "seed"], "merge": ["merge"],
               "gptq": ["gptq", "seed"], "eval": ["eval", "seed"], "bench": ["bench", "seed"]}


def config_slice(cfg: Config, stage: str) -> dict:
    plain = OmegaConf.to_container(cfg if OmegaConf.is_config(cfg) else OmegaConf.structured(cfg), resolve=True)
    return {key: plain[key] for key in CONFIG_KEYS[stage]}


def fingerprints(cfg: Config) -> dict[str, str]:
    prints: dict[str, str] = {}
    for stage in STAGES:  # in dependency order
        payload = {"stage": stage, "version": __version__, "config": config_slice(cfg, stage),
                   "upstream": {up: prints[up] for up in UPSTREAM[stage]}}
        if stage == "base":
            payload["source"] = source_identity(cfg.model)
        prints[stage] = fingerprint(payload)
    return prints


def plan(target: str) -> list[str]:
    """The target and everything upstream of it, in dependency order."""
    if target == "all":
        return list(STAGES)
    needed, todo = set(), [target]
    while todo:
        stage = todo.pop()
        needed.add(stage)
        todo += UPSTREAM[stage]
    return [s for s in STAGES if s in needed]


def experiment_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir).resolve() / cfg.experiment


@contextlib.contextmanager
def log_file(path: Path):
    """Also log to `path` (the console handler comes from Hydra's job logging config)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def run(cfg: Config) -> dict[str, dict]:
    """Bring `cfg.stage` up to date; returns {stage: {"status", "path"}} for the planned stages."""
    validate(cfg)
    preflight.check(cfg)
    exp = experiment_dir(cfg)
    with log_file(exp / "logs" / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}.log"):
        return run_stages(cfg, exp)


def run_stages(cfg: Config, exp: Path) -> dict[str, dict]:
    prints = fingerprints(cfg)
    forced = set(STAGES) if cfg.stage == "all" else {cfg.stage}
    results: dict[str, dict] = {}
    for stage in plan(cfg.stage):
        artifact = StageDir(exp, stage, prints[stage])
        if artifact.is_fresh() and not (cfg.force and stage in forced):
            log.info("%s: up to date, skipped (%s)", stage, artifact.path)
            results[stage] = {"status": "cached", "path": artifact.path}
            continue
        log.info("%s: running -> %s", stage, artifact.path)
        work = artifact.begin(resume=stage == "train")
        module = importlib.import_module(f"pipeline.stages.{stage}")
        start = time.perf_counter()
        metrics = module.run(cfg, work, {up: exp / up for up in UPSTREAM[stage]})
        seconds = time.perf_counter() - start
        artifact.commit({"config": config_slice(cfg, stage), "upstream": {up: prints[up] for up in UPSTREAM[stage]},
                         "seconds": round(seconds, 2), "metrics": metrics})
        log.info("%s: done in %.1f s (%s)", stage, seconds, artifact.path)
        results[stage] = {"status": f"ran in {seconds:.1f} s", "path": artifact.path}
    for stage, result in results.items():
        log.info("  %-6s %-16s %s", stage, result["status"], result["path"])
    if {"eval", "bench"} & set(results):
        table = report.write(exp)
        log.info("report: %s\n%s", exp / "report.md", table)
    return results
