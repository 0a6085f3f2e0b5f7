"""Cluster use: a sweep through Hydra's submitit launcher shares upstream artifacts, DDP training through
accelerate writes the adapter once, and concurrent runs of one stage are serialized by its lock."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf
from safetensors.torch import load_file

from pipeline.__main__ import sweep_point_name
from pipeline.artifacts import StageDir, read_manifest
from pipeline.runner import fingerprints

from .conftest import CONF_DIR, TINY, compose_config, drop

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def pipeline(*args: str, cwd: Path | None = None, launcher: tuple[str, ...] = (sys.executable,)):
    return subprocess.run([*launcher, "-m", "pipeline", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd, env=ENV)


def said(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def experiment_file(conf: Path, model: Path, *more: str) -> None:
    """A user's own experiment: the tiny settings live in a file, so that a sweep names its points by what it sweeps."""
    (conf / "experiment").mkdir(parents=True)
    settings = OmegaConf.from_dotlist([f"model.name_or_path={model}", *TINY, *more])
    (conf / "experiment" / "tiny.yaml").write_text("# @package _global_\n" + OmegaConf.to_yaml(settings))


def test_sweep_through_submitit_shares_the_upstream_stages(tiny_model_dir, tmp_path):
    experiment_file(tmp_path / "conf", tiny_model_dir, "eval.artifacts=[merged,gptq]", "bench.artifacts=[gptq]")
    out = tmp_path / "outputs"
    result = pipeline("-m", "hydra/launcher=submitit_local", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                      "experiment=tiny", "stage=all", "gptq.bits=4,8", f"output_dir={out}")
    assert result.returncode == 0, said(result)[-3000:]

    points = {bits: out / "tiny" / f"gptq.bits={bits}" for bits in (4, 8)}
    for stage in ("base", "train", "merge"):  # one artifact, linked from both points
        assert (points[4] / stage).resolve() == (points[8] / stage).resolve(), stage
        assert len(list((out / "store").glob(f"{stage}-*"))) == 1, stage
    for bits, point in points.items():
        assert (point / "gptq").is_symlink()
        assert read_manifest(point / "gptq")["config"]["gptq"]["bits"] == bits
    logs = "".join(p.read_text() for p in out.glob("tiny/*/logs/*.log"))
    for stage in ("base", "train", "merge"):
        assert logs.count(f"{stage}: running") == 1, stage
        assert logs.count(f"{stage}: up to date, skipped") == 1, stage
    for stage in ("gptq", "eval", "bench"):
        assert logs.count(f"{stage}: running") == 2, stage
    sweep = (out / "tiny" / "sweep.md").read_text()  # the points side by side, whichever finished last wrote it
    assert "[gptq.bits=4](gptq.bits=4/report.md)" in sweep and "[gptq.bits=8](gptq.bits=8/report.md)" in sweep


def test_slurm_launcher_asks_for_each_stage_resources():
    for stage, gpus in (("train", 4), ("gptq", 1)):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", ["hydra/launcher=slurm", f"stage={stage}", "hydra.launcher.partition=gpu"],
                          return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (gpus, gpus, "gpu")
        assert launcher.timeout_min == cfg.resources[stage].timeout_min
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"


def test_sweep_point_names_are_folder_names():
    assert sweep_point_name("gptq.bits=3,train.lr=0.001") == "gptq.bits=3,train.lr=0.001"
    assert sweep_point_name("") == ""  # nothing but excluded keys: the experiment folder itself
    assert sweep_point_name("data.source=/data/chats.jsonl") == "data.source=_data_chats.jsonl"
    long = sweep_point_name(",".join(f"train.lora_r={r}" for r in range(40)))
    assert len(long) < 120 and "/" not in long


@pytest.mark.parametrize("launch", ["accelerate", "submitit"])
def test_ddp_train_on_two_processes_writes_the_adapter_once(launch, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "outputs"
    if launch == "accelerate":
        # --multi_gpu is accelerate's torchrun launcher; without a GPU its processes train over gloo on the CPU.
        accelerate = (str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes",
                      "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
        result = pipeline("stage=train", f"model.name_or_path={tiny_model_dir}", *TINY, f"output_dir={out}",
                          launcher=accelerate)
        exp = out / "default"
    else:  # a SLURM job with two tasks, as submitit's local executor runs it
        experiment_file(tmp_path / "conf", tiny_model_dir)
        result = pipeline("-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                          f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=tiny", "stage=train",
                          f"output_dir={out}")
        exp = out / "tiny"
    assert result.returncode == 0, said(result)[-3000:]

    train = exp / "train"
    manifest = read_manifest(train)
    assert manifest["processes"] == 2 and manifest["metrics"]["steps"] == 12
    assert manifest["metrics"]["final_loss"] < manifest["metrics"]["first_loss"]
    assert not (train / "adapter" / "training_args.bin").exists()
    assert len(list((out / "store").glob("train-*"))) == 1 and not list((out / "store").glob(".*.partial"))
    rank1_log, main_log = sorted((exp / "logs").glob("*.log"), key=lambda p: "rank" not in p.name)
    assert main_log.read_text().count("train: done") == 1
    assert "train: running" in rank1_log.read_text() and "done" not in rank1_log.read_text()

    base = AutoModelForCausalLM.from_pretrained(exp / "base" / "nf4")
    model = PeftModel.from_pretrained(base, train / "adapter")
    lora_b = load_file(train / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in name and weight.abs().max() > 0 for name, weight in lora_b.items()), "it trained"
    assert model.active_adapter == "default"


def test_two_runs_of_one_stage_build_it_once(finished, tmp_path):
    out, overrides, _ = finished
    mine = tmp_path / "outputs"
    shutil.copytree(out, mine, symlinks=True)
    drop(mine / "default", "gptq")
    args = [*overrides, f"output_dir={mine}", "stage=gptq"]
    cmd = [sys.executable, "-m", "pipeline", *args]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]  # files, not pipes: a full pipe would block a run
    runs = [subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV) for log in logs]
    assert [run.wait(timeout=600) for run in runs] == [0, 0], [log.read_text()[-3000:] for log in logs]
    both = "".join(log.read_text() for log in logs)
    assert both.count("gptq: running") == 1 and both.count("gptq: up to date, skipped") == 1
    assert "is being built by pid" in both
    prints = fingerprints(compose_config(*args))
    assert StageDir(mine / "store", "gptq", prints["gptq"]).is_fresh()
    assert len(list((mine / "store").glob("gptq-*"))) == 1 and not list((mine / "store").glob(".*.partial"))


def test_busy_lock_stops_or_waits_and_a_dead_holder_is_recovered(finished, tmp_path):
    out, overrides, _ = finished
    mine = tmp_path / "outputs"
    shutil.copytree(out, mine, symlinks=True)
    args = [*overrides, f"output_dir={mine}", "stage=merge", "force=true"]
    merge = StageDir(mine / "store", "merge", fingerprints(compose_config(*args))["merge"])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from pipeline.artifacts import exclusive\n"
         f"with exclusive(Path({str(merge.store)!r}) / '.{merge.name}.lock', 'merge'):\n"
         "    print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = pipeline(*args, "lock.wait=false")
        assert busy.returncode == 2, said(busy)[-3000:]
        assert f"merge ({merge.name}) is being built by pid {holder.pid}" in said(busy)
        assert "Traceback" not in said(busy)
        timed_out = pipeline(*args, "lock.timeout_s=2")
        assert timed_out.returncode == 2 and "still being built" in said(timed_out), said(timed_out)[-3000:]
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert merge.is_fresh(), "the refused runs left the artifact alone"

    # The holder died without releasing: the kernel dropped its lock, the next run takes it and says so.
    recovered = pipeline(*args, cwd=tmp_path)
    assert recovered.returncode == 0, said(recovered)[-3000:]
    assert f"recovered the lock left by pid {holder.pid}" in said(recovered)
    assert "merge: done" in said(recovered) and merge.is_fresh()


def test_a_moved_output_dir_is_picked_up_from_another_directory(finished, tmp_path):
    out, overrides, _ = finished
    shutil.copytree(out, tmp_path / "elsewhere" / "outputs", symlinks=True)
    (tmp_path / "cwd").mkdir()
    result = pipeline(*overrides, "output_dir=../elsewhere/outputs", "stage=gptq", cwd=tmp_path / "cwd")
    assert result.returncode == 0, said(result)[-3000:]
    for stage in ("base", "train", "merge", "gptq"):
        assert f"{stage}: up to date, skipped" in said(result), stage
