"""Runs the stages like make: a stage runs when its artifacts are missing or stale, or when forced.

A stage's fingerprint hashes its slice of the config and its upstream stages' fingerprints, so changing
`gptq.bits` reruns gptq (and what follows) and nothing before it, and a sweep over `gptq.bits` trains once:
artifacts live in a store keyed by fingerprint, shared by every experiment of the output directory.

With several processes (DDP/FSDP), rank 0 builds every artifact; the other ranks join in the train stage only.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import logging
import time
from pathlib import Path

from omegaconf import OmegaConf

from . import card, compute, distributed, harness, memory, plan, preflight, report
from .artifacts import StageDir, clean_partials, dir_bytes, fingerprint, library_versions, partials
from .config import STAGES, Config, validate
from .data import data_identity
from .models import source_identity
from .stages import StageUnavailable

log = logging.getLogger(__name__)
PACKAGE = Path(__file__).parent

UPSTREAM = {"base": [], "train": ["base"], "merge": ["base", "train"], "gptq": ["train", "merge"],
            "gguf": ["train", "merge"],
            "eval": ["base", "train", "merge", "gptq"], "bench": ["base", "train", "merge", "gptq"],
            "serve": ["train", "gptq"]}
# compute_dtype as resolved on this machine (compute.py): an adapter trained in float32 is not the one trained in
# bfloat16, so a store shared by machines of both kinds keeps one of each. The base stage quantizes the weights as
# stored, whatever the machine computes in. `memory` places eval's, bench's and serve's artifacts: an artifact skipped
# for lack of room is measured once the user raises memory.max_memory, as the skip's message says to.
CONFIG_KEYS = {"base": ["model", "base"], "train": ["data", "train", "seed", "compute_dtype"],
               "merge": ["merge", "compute_dtype"], "gptq": ["gptq", "seed", "compute_dtype"],
               "gguf": ["gguf", "eval", "seed", "compute_dtype"],  # eval's perplexity windows, its answer batches
               "eval": ["eval", "seed", "compute_dtype", "memory"],
               "bench": ["bench", "seed", "compute_dtype", "memory"],
               "serve": ["serve", "seed", "compute_dtype", "memory"]}


def config_slice(cfg: Config, stage: str) -> dict:
    plain = OmegaConf.to_container(cfg if OmegaConf.is_config(cfg) else OmegaConf.structured(cfg), resolve=True)
    plain["compute_dtype"] = compute.dtype_name(cfg)
    return {key: plain[key] for key in CONFIG_KEYS[stage]}


# The libraries whose numerics a stage's result depends on: an upgrade of one rebuilds the stages that compute with it
# (bitsandbytes once changed what the merge read on some CPUs), and no other (a new lm-eval retrains nothing).
LIBRARIES = {"base": ["torch", "transformers", "bitsandbytes", "gguf"],
             "train": ["torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers"],
             "merge": ["torch", "transformers", "peft", "bitsandbytes"],
             "gptq": ["torch", "transformers", "gptqmodel"],
             "gguf": ["transformers", "ik-llama-cpp-python", "xllamacpp"],  # the converter: gguf.json records it
             "eval": ["torch", "transformers", "bitsandbytes", "gptqmodel", "lm_eval"],
             "bench": ["torch", "transformers", "bitsandbytes", "gptqmodel"],
             "serve": ["transformers"]}  # vLLM runs from its own venv: serve.json records its version
# What a stage resolves from the machine beyond compute_dtype: on a GPU or not (train's mixed precision, gptq.mse=null,
# the merge's kernels), or the hardware itself (what eval and bench measure, and what their placement could hold).
MACHINE = {"base": None, "train": "device", "merge": "device", "gptq": "device", "gguf": "hardware", "eval": "hardware",
           "bench": "hardware", "serve": "hardware"}


def module_file(name: str) -> Path | None:
    """The source file of a pipeline module ("pipeline.stages.gptq"), or None when `name` is no module."""
    path = PACKAGE.joinpath(*name.split(".")[1:])
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(name: str) -> set[str]:
    """The pipeline modules that module `name` imports, at its top or inside a function."""
    path = module_file(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0]
            target = f"{base}.{node.module}" if node.module else base
            found |= {module for module in [target, *(f"{target}.{alias.name}" for alias in node.names)]
                      if module_file(module)}
    return found


@functools.cache
def code_identity(stage: str) -> str:
    """A hash of the code a stage runs: its module and every pipeline module it imports, directly or not, as parsed
    (an edited comment changes nothing; an edited line of code rebuilds the stage and what follows). The runner is
    left out: it decides what runs, not what a stage computes."""
    seen, todo = set(), [f"pipeline.stages.{stage}"]
    while todo:
        name = todo.pop()
        if name not in seen and name != __name__:
            seen.add(name)
            todo += imported_modules(name)
    return fingerprint({name: ast.dump(ast.parse(module_file(name).read_text())) for name in sorted(seen)})


def machine_identity(stage: str) -> str | None:
    """What `stage` resolves from this machine, in words (see MACHINE)."""
    machine = compute.machine()
    if MACHINE[stage] == "device":
        return "gpu" if machine.gpu else "cpu"
    return machine.hardware if MACHINE[stage] == "hardware" else None


def fingerprints(cfg: Config) -> dict[str, str]:
    versions = library_versions()
    prints: dict[str, str] = {}
    for stage in STAGES:  # in dependency order
        payload = {"stage": stage, "code": code_identity(stage), "config": config_slice(cfg, stage),
                   "libraries": {name: versions[name] for name in LIBRARIES[stage]},
                   "machine": machine_identity(stage), "upstream": {up: prints[up] for up in UPSTREAM[stage]}}
        if stage == "base":
            payload["source"] = source_identity(cfg.model)
        if stage == "train":
            payload["data_files"] = data_identity(cfg.data)  # an edited data file retrains
        if stage == "eval" and cfg.eval.lm_eval.include_path:
            payload["lm_eval_files"] = harness.include_identity(cfg.eval.lm_eval.include_path)
        prints[stage] = fingerprint(payload)
    return prints


def stages_for(target: str) -> list[str]:
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
    return Path(cfg.output_dir).resolve() / cfg.experiment / cfg.sweep_point


def store_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir).resolve() / "store"


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


def forced_stages(cfg: Config) -> set[str]:
    """The stages `force=true` rebuilds: every stage with stage=all, else the named one."""
    if not cfg.force:
        return set()
    return set(STAGES) if cfg.stage == "all" else {cfg.stage}


def check_before_building(cfg: Config, artifacts: dict[str, StageDir]) -> dict[str, dict]:
    """Rank 0's checks before anything is loaded or written, for the stages this run will build: every data row
    readable (train), the lm-eval tasks known (eval), the architecture one GPTQModel quantizes (gptq), then the
    memory plan. Returns the plan's predicted peak of each stage to build."""
    stages = stages_for(cfg.stage)
    cached = {stage for stage in stages if stage not in forced_stages(cfg) and artifacts[stage].is_fresh()}
    to_build = set(stages) - cached
    if "train" in to_build:
        preflight.check_data_rows(cfg.data)
    if "eval" in to_build:
        harness.check_tasks(cfg.eval.lm_eval)
    if "gptq" in to_build:
        preflight.check_gptq_support(cfg.model)  # before training a model that could not be quantized
    if "gguf" in to_build and (cfg.stage == "gguf" or cfg.gguf.enabled):
        preflight.check_gguf_support(cfg.model)  # nor one llama.cpp's converter refuses
    return memory_plan(cfg, stages, cached)


def memory_plan(cfg: Config, stages: list[str], cached: set[str]) -> dict[str, dict]:
    """The predicted peak of each stage this run will build, logged as a table beside the cached ones; stops the run
    when one cannot fit. Without a readable model config (a hub id out of reach) there is no plan: the base stage
    says why."""
    if cached == set(stages) and not cfg.plan:
        return {}
    try:
        planned, table = plan.make(cfg, stages, cached)
    except OSError as err:
        log.warning("memory plan: the model's config cannot be read (%s); not planned", str(err).splitlines()[0])
        return {}
    log.info("plan:\n%s", table)
    if not cfg.plan:
        plan.refuse_misfits(planned, cached)
    return {row.stage: {"peak_memory": plan.predicted_bytes(row), "seconds": plan.predicted_seconds(row)}
            for row in planned if row.stage not in cached}


def run(cfg: Config) -> dict[str, dict]:
    """Bring `cfg.stage` up to date; returns {stage: {"status", "path"}} for the stages this process saw to.
    With `plan=true`, logs the memory plan and returns {} having written nothing; with `clean=true`, removes the
    store's partial artifacts that no process holds and returns {}."""
    distributed.setup()
    validate(cfg)
    if cfg.clean:
        clean(store_dir(cfg))
        return {}
    if distributed.is_main():
        log.info("compute: %s", compute.why(cfg))
    preflight.check(cfg)
    prints = fingerprints(cfg)  # once: it hashes every local data file
    artifacts = {stage: StageDir(store_dir(cfg), stage, prints[stage]) for stage in STAGES}
    if distributed.is_main():
        say_partials(store_dir(cfg), {a.partial for a in artifacts.values()})
    predicted = check_before_building(cfg, artifacts) if distributed.is_main() else {}
    if cfg.plan:
        return {}
    exp = experiment_dir(cfg)
    rank = "" if distributed.is_main() else f"-rank{distributed.rank()}"
    with log_file(exp / "logs" / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}{rank}.log"):
        return run_stages(cfg, exp, artifacts, predicted)


def clean(store: Path) -> None:
    removed = clean_partials(store)
    for partial, size in removed:
        log.info("clean: removed %s (%.2f GB)", partial, size / 1e9)
    log.info("clean: %d partial artifacts removed (%.2f GB); %d held by running processes kept", len(removed),
             sum(size for _, size in removed) / 1e9, len(partials(store)))


def say_partials(store: Path, mine: set[Path]) -> None:
    """Partial artifacts of other inputs are never deleted by a run (a requeued job resumes from its own): say they
    are there, and how to remove them."""
    others = [p for p in partials(store) if p not in mine]
    if others:
        log.info("the store holds %d partial artifacts of other inputs (%.2f GB: interrupted builds, or queued jobs' "
                 "work in progress); `clean=true` removes those no running process holds", len(others),
                 sum(dir_bytes(p) for p in others) / 1e9)


def build(cfg: Config, artifact: StageDir, upstream: dict[str, StageDir], together: bool, forced: bool,
          predicted: dict | None) -> float | None:
    """Build one stage's artifact unless it is up to date; returns the seconds it took, None if it was cached.

    Rank 0 holds the artifact's lock, decides and writes; with `together`, the other ranks follow its
    decision and compute alongside it (the train stage under DDP/FSDP)."""
    main = distributed.is_main()
    inputs = {up: a.path for up, a in upstream.items()}
    with artifact.locked(cfg.lock.wait, cfg.lock.timeout_s) if main else contextlib.nullcontext():
        work = None
        module = importlib.import_module(f"pipeline.stages.{artifact.stage}")
        if main:
            artifact.adopt(experiment_dir(cfg))
            if forced or not artifact.is_fresh():
                why_not = module.missing(cfg, inputs) if hasattr(module, "missing") else None
                if why_not:
                    raise StageUnavailable(why_not)
                work = artifact.begin(resume=artifact.stage == "train")
        if together:
            work = distributed.broadcast(work)
        if work is None:
            return None
        log.info("%s: running -> %s", artifact.stage, artifact.path)
        start = time.perf_counter()
        with memory.peak() as peak:
            metrics = module.run(cfg, work, inputs)
        memory.release_freed_heap()  # the next stage starts without this one's freed heap
        seconds = time.perf_counter() - start
        log.info("%s: peak memory %s", artifact.stage, memory.described(peak))
        if main:
            artifact.commit({"config": config_slice(cfg, artifact.stage), "compute": compute.record(cfg),
                             "seconds": round(seconds, 2), "predicted_seconds": (predicted or {}).get("seconds"),
                             "peak_memory": peak, "predicted_peak_memory": (predicted or {}).get("peak_memory"),
                             "upstream": {up: a.fingerprint for up, a in upstream.items()}, "metrics": metrics,
                             "processes": distributed.world_size()})
        return seconds


def run_stages(cfg: Config, exp: Path, artifacts: dict[str, StageDir],
               predicted: dict[str, dict]) -> dict[str, dict]:
    main = distributed.is_main()
    results: dict[str, dict] = {}
    for stage in stages_for(cfg.stage):
        together = stage == "train"
        if not (main or together):
            if stage in UPSTREAM["train"]:
                continue  # rank 0 builds it; this rank waits in the train stage for rank 0's word
            break  # after training, rank 0 alone carries on
        upstream = {up: artifacts[up] for up in UPSTREAM[stage]}
        try:
            seconds = build(cfg, artifacts[stage], upstream, together, stage in forced_stages(cfg),
                            predicted.get(stage))
        except StageUnavailable as why_not:
            log.warning("%s: not run: %s", stage, why_not)
            if (exp / stage).is_symlink():  # to an earlier configuration's artifact
                (exp / stage).unlink()
            results[stage] = {"status": "not run", "path": why_not}
            continue
        if not main:
            continue
        view = artifacts[stage].link(exp)
        if seconds is None:
            log.info("%s: up to date, skipped (%s)", stage, view)
            results[stage] = {"status": "cached", "path": view}
        else:
            log.info("%s: done in %.1f s (%s)", stage, seconds, view)
            results[stage] = {"status": f"ran in {seconds:.1f} s", "path": view}
    for stage, result in results.items():
        log.info("  %-6s %-16s %s", stage, result["status"], result["path"])
    if {"gguf", "eval", "bench", "serve"} & set(results):
        table = report.write(exp, {stage: str(r["path"]) for stage, r in results.items() if r["status"] == "not run"})
        log.info("report: %s\n%s", exp / "report.md", table)
        if cfg.sweep_point:
            log.info("sweep so far: %s\n%s", exp.parent / "sweep.md", report.write_sweep(exp.parent))
    if "gptq" in results and card.write(cfg, exp):
        log.info("model card: %s", exp / "gptq" / "README.md")
        if cfg.push.repo_id:
            card.push(cfg, exp)
    return results
