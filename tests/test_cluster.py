"""Cluster use. On a real one-node SLURM cluster (scripts/slurm_local.sh): a sweep's points share the upstream
artifacts and a later job finds them; a 2-task job trains DDP and writes one adapter; a job signalled at its time
limit is requeued and resumes to the same adapter, and one signalled while it starts is requeued too; a cancelled
job resumes when run again. Also: DDP through accelerate, sweep folder names, and concurrent runs of one stage
serialized by its lock."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from pipeline.cluster import sweep_point_name
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


# ---- On a real scheduler: a one-node SLURM cluster on this machine (scripts/slurm_local.sh) ----
SLURM_UP = Path(__file__).resolve().parents[1] / "scripts" / "slurm_local.sh"
# Small jobs for the one node (its CPUs and memory, and two placeholder GPUs): one CPU and 3 GB a task.
SMALL_JOBS = [f"resources.{stage}.{key}={value}" for stage in ("all", "base", "train", "merge", "gptq")
              for key, value in (("cpus_per_gpu", 1), ("mem_gb", 3))]
# A train of 2 tasks that works for some 20 s here, checkpointing as it goes: long enough to be signalled mid-way.
LONG_TRAIN = ["stage=train", "resources.train.gpus=2", "train.max_steps=300", "train.save_steps=30",
              "train.logging_steps=30"]


@pytest.fixture(scope="module")
def slurm() -> None:
    """A one-node SLURM cluster here: scripts/slurm_local.sh brings it up (as root; it installs the packages the
    first time). Where that cannot be, these tests skip and say why; .ci/run sets PIPELINE_TEST_SLURM=required,
    so that CI fails instead."""
    up = subprocess.run([str(SLURM_UP)], capture_output=True, text=True, timeout=600)
    if up.returncode:
        why = f"no SLURM cluster here: {(up.stderr.strip().splitlines() or ['scripts/slurm_local.sh failed'])[-1]}"
        if os.environ.get("PIPELINE_TEST_SLURM") == "required":
            pytest.fail(why)
        pytest.skip(why)


def on_slurm(conf: Path, out: Path, *args: str) -> list[str]:
    """A -m run through hydra/launcher=slurm, with the settings of the tiny experiment in `conf`."""
    return ["-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug", f"hydra.searchpath=[file://{conf}]",
            "experiment=tiny", f"output_dir={out}", *args]


def jobs(out: Path) -> list[Path]:
    """The folder of each SLURM job (or job array task) submitit ran, with its logs: oldest first."""
    return sorted((p for p in (out / "slurm").iterdir() if any(p.glob("*_log.out"))),
                  key=lambda p: [int(n) for n in p.name.split("_")])


def submission_script(job: Path) -> str:
    """The sbatch script of a job; a job array's tasks share theirs."""
    main = job.name.split("_")[0]
    return (job.parent / main / f"{main}_submission.sh").read_text()


def job_log(job: Path) -> str:
    return "".join(p.read_text() for p in sorted(job.glob("*_log.*")))


def runs(job: Path) -> int:
    """How many times SLURM started the job (a requeued job starts again): submitit's first line in its first task."""
    return (job / f"{job.name}_0_log.out").read_text().count("Starting with JobEnvironment")


def test_sweep_on_slurm_shares_the_upstream_stages_and_a_later_job_finds_them(slurm, tiny_model_dir, tmp_path):
    conf, out = tmp_path / "conf", tmp_path / "outputs"
    experiment_file(conf, tiny_model_dir, *SMALL_JOBS)
    sweep = pipeline(*on_slurm(conf, out, "stage=gptq", "gptq.bits=4,8", "train.max_steps=12"))
    assert sweep.returncode == 0, said(sweep)[-3000:]
    assert "sacct" not in said(sweep), "no accounting here: states come from squeue, with no warning on each poll"

    points = {bits: out / "tiny" / f"gptq.bits={bits}" for bits in (4, 8)}  # named by what varies, nothing else
    assert sorted(p.name for p in (out / "tiny").iterdir()) == ["gptq.bits=4", "gptq.bits=8"]
    for stage in ("base", "train", "merge"):  # one artifact, linked from both points
        assert (points[4] / stage).resolve() == (points[8] / stage).resolve(), stage
        assert len(list((out / "store").glob(f"{stage}-*"))) == 1, stage
    for bits, point in points.items():
        assert read_manifest(point / "gptq")["config"]["gptq"]["bits"] == bits
    logs = "".join(p.read_text() for p in out.glob("tiny/*/logs/*.log"))
    for stage in ("base", "train", "merge"):
        assert logs.count(f"{stage}: running") == 1 and logs.count(f"{stage}: up to date, skipped") == 1, stage
    assert logs.count("gptq: running") == 2
    points_jobs = jobs(out)
    assert len(points_jobs) == 2, "one SLURM job a point"
    for job in points_jobs:
        script = submission_script(job)
        assert "--gpus-per-node=1" in script and "--ntasks-per-node=1" in script and "--time=240" in script

    # Later, in an allocation of its own (as on another node): a CPU-only job of one point, in the experiment folder.
    later = pipeline(*on_slurm(conf, out, "stage=gptq", "gptq.bits=3", "resources.gptq.gpus=0"))
    assert later.returncode == 0, said(later)[-3000:]
    job = jobs(out)[-1]
    script = submission_script(job)
    assert "--gpus-per-node" not in script and "--ntasks-per-node=1" in script
    log = job_log(job)
    for stage in ("base", "train", "merge"):
        assert f"{stage}: up to date, skipped" in log, stage
    assert "gptq: done" in log and read_manifest(out / "tiny" / "gptq")["config"]["gptq"]["bits"] == 3


@pytest.fixture(scope="module")
def ddp_train_on_slurm(slurm, tiny_model_dir, tmp_path_factory):
    """One uninterrupted SLURM job of 2 tasks that trains: (conf, output_dir, the command's result)."""
    tmp = tmp_path_factory.mktemp("ddp-slurm")
    conf, out = tmp / "conf", tmp / "outputs"
    experiment_file(conf, tiny_model_dir, *SMALL_JOBS)
    return conf, out, pipeline(*on_slurm(conf, out, *LONG_TRAIN))


def test_two_task_train_job_on_slurm_writes_the_adapter_once(ddp_train_on_slurm):
    _, out, result = ddp_train_on_slurm
    assert result.returncode == 0, said(result)[-3000:]
    assert_one_ddp_adapter(out, out / "tiny", steps=300)
    (job,) = jobs(out)
    assert "--ntasks-per-node=2" in submission_script(job)


def launch(args: list[str], log: Path) -> subprocess.Popen:
    """A pipeline command in the background, its output to a file (a full pipe would block it)."""
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=ENV)


def wait_until(happened: Callable[[], bool], launcher: subprocess.Popen, log: Path) -> None:
    """Poll, for 5 minutes at most, while the launcher runs: its log says why it stopped."""
    deadline = time.time() + 300
    while not happened():
        assert launcher.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def signal_job(job: Path) -> None:
    """Send submitit's requeue signal (USR2) as SLURM does at the time limit (--signal without B:): to every
    process of the job's steps, not to its batch script."""
    subprocess.run(["scancel", "--signal=USR2", job.name.split("_")[0]], check=True)


def release_requeued(launcher: subprocess.Popen) -> None:
    """Wait for the launcher; meanwhile start every requeued job a few seconds after its requeue instead of the 2
    minutes SLURM holds it, a wait that tests nothing of ours. Not at once: slurmd refuses to start a job whose
    credential dates from the same second as the requeue that revoked its previous one ("Job credential revoked",
    the job ends FAILED: seen once in 16 runs when it was released at once). A later StartTime would not do either:
    the job would wait for the backfill scheduler's next pass (30 s); StartTime=now starts it on the spot."""
    seen: dict[tuple[str, str], float] = {}  # (job, the start SLURM's hold set) -> when it was first seen held
    while launcher.poll() is None:
        held = subprocess.run(["squeue", "--me", "--noheader", "--states=PENDING", "--format=%i %r %S"],
                              capture_output=True, text=True).stdout.split()
        for job, reason, start in zip(held[::3], held[1::3], held[2::3]):
            if reason == "BeginTime" and time.time() - seen.setdefault((job, start), time.time()) >= 3:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        time.sleep(0.5)


def test_train_job_signalled_at_its_time_limit_is_requeued_and_resumes_to_the_same_adapter(ddp_train_on_slurm,
                                                                                         tmp_path):
    conf, straight, _ = ddp_train_on_slurm
    out, log = tmp_path / "outputs", tmp_path / "launcher.log"
    # The test sends the time-limit signal itself, once a checkpoint is written: SLURM's own comes at a 30-second
    # tick up to 30 s ahead of signal_delay_s, at a moment no test can choose (here not before 9 minutes). A job of
    # 10 minutes or less is one submitit counts as timed out when signalled, as at its limit.
    args = on_slurm(conf, out, *LONG_TRAIN, "resources.train.timeout_min=10", "hydra.launcher.signal_delay_s=30")
    launcher = launch(args, log)
    wait_until(lambda: any(out.glob("store/.train-*.partial/checkpoints/checkpoint-*/trainer_state.json")),
               launcher, log)
    (job,) = jobs(out)
    signal_job(job)
    release_requeued(launcher)
    assert launcher.wait() == 0, log.read_text()[-3000:]

    assert "--signal=USR2@30" in submission_script(job)  # what has SLURM send it at the limit
    assert runs(job) == 2
    job_said = job_log(job)
    assert "Requeued job" in job_said and "this job is timed-out" in job_said
    assert "resuming from checkpoint-" in job_said
    metrics = read_manifest(out / "tiny" / "train")["metrics"]
    assert metrics["resumed_from"].startswith("checkpoint-") and metrics["steps"] == 300
    resumed, uninterrupted = (load_file(o / "tiny" / "train" / "adapter" / "adapter_model.safetensors")
                              for o in (out, straight))
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert (resumed[name] - uninterrupted[name]).abs().max().item() < 1e-4, name


def test_job_signalled_while_it_starts_is_requeued(slurm, tiny_model_dir, tmp_path):
    conf, out, log = tmp_path / "conf", tmp_path / "outputs", tmp_path / "launcher.log"
    experiment_file(conf, tiny_model_dir, *SMALL_JOBS)
    launcher = launch(on_slurm(conf, out, "stage=train", "resources.train.gpus=0"), log)
    # submitit's first line, before it unpickles the job (which imports torch: seconds) and installs its handler.
    wait_until(lambda: any("Starting with JobEnvironment" in p.read_text() for p in out.glob("slurm/*/*_log.out")),
               launcher, log)
    (job,) = jobs(out)
    signal_job(job)
    release_requeued(launcher)
    assert launcher.wait() == 0, log.read_text()[-3000:]

    assert runs(job) == 2
    assert "SIGUSR2 arrived while this task was starting" in job_log(job), job_log(job)[-3000:]
    assert read_manifest(out / "tiny" / "train")["metrics"]["steps"] == 12


def test_cancelled_train_job_resumes_when_run_again(slurm, tiny_model_dir, tmp_path):
    conf, out, log = tmp_path / "conf", tmp_path / "outputs", tmp_path / "launcher.log"
    experiment_file(conf, tiny_model_dir, *SMALL_JOBS)
    args = on_slurm(conf, out, "stage=train", "resources.train.gpus=0", "train.max_steps=300", "train.save_steps=10")
    launcher = launch(args, log)
    wait_until(lambda: any(out.glob("store/.train-*.partial/checkpoints/checkpoint-*/trainer_state.json")),
               launcher, log)
    (job,) = jobs(out)
    subprocess.run(["scancel", job.name.split("_")[0]], check=True)
    # The launcher learns it from squeue (no accounting here) and stops, instead of waiting forever.
    assert launcher.wait(timeout=120) != 0
    assert "state: CANCELLED" in log.read_text(), log.read_text()[-3000:]
    assert read_manifest(out / "tiny" / "train") is None

    again = pipeline(*args)
    assert again.returncode == 0, said(again)[-3000:]
    assert "resuming from checkpoint-" in job_log(jobs(out)[-1])
    metrics = read_manifest(out / "tiny" / "train")["metrics"]
    assert metrics["resumed_from"].startswith("checkpoint-") and metrics["steps"] == 300


def test_slurm_launcher_asks_for_each_stage_resources():
    for stage, gpus, request, tasks in (("train", 4, 4, 4), ("gptq", 1, 1, 1), ("eval", 0, None, 1)):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", ["hydra/launcher=slurm", f"stage={stage}", "hydra.launcher.partition=gpu",
                                     f"resources.{stage}.gpus={gpus}"], return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (request, tasks, "gpu")
        assert launcher.timeout_min == cfg.resources[stage].timeout_min
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"


def hydra_job(sweep_dir: Path, *overrides: str, sweeper_params: dict | None = None) -> DictConfig:
    """What a sweep point's job sees of Hydra: its own overrides, and the sweep's directory."""
    return OmegaConf.create({"overrides": {"task": list(overrides)}, "sweep": {"dir": str(sweep_dir)},
                             "job": {"config": {"override_dirname": {"exclude_keys": ["experiment", "output_dir"]}}},
                             "sweeper": {"params": sweeper_params}})


def test_sweep_points_are_named_by_what_varies(tmp_path):
    def point(command: list[str], job: list[str], sweeper_params: dict | None = None) -> str:
        # Hydra writes the sweep's own config, command line included, to multirun.yaml before any job starts.
        sweep = OmegaConf.create({"hydra": hydra_job(tmp_path, *command, sweeper_params=sweeper_params)})
        OmegaConf.save(sweep, tmp_path / "multirun.yaml")
        return sweep_point_name(hydra_job(tmp_path, *job))

    shared = ["model.name_or_path=/models/m", "experiment=a,b", "output_dir=/o"]  # experiment: a folder of its own
    assert point([*shared, "gptq.bits=3,4", "train.lr=1e-3,2e-3"], [*shared[:1], "experiment=a", "output_dir=/o",
                 "train.lr=1e-3", "gptq.bits=3"]) == "gptq.bits=3,train.lr=1e-3"
    assert point([*shared, "gptq.bits=4"], [*shared[:1], "gptq.bits=4"]) == ""  # one point: the experiment folder
    assert point(["data.source=/d/a.jsonl,/d/b.jsonl"], ["data.source=/d/a.jsonl"]) == "data.source=_d_a.jsonl"
    assert point(["gptq.bits=4"], ["gptq.bits=4", "train.lora_r=8"], {"train.lora_r": "8,16"}) == "train.lora_r=8"
    deep = "/data" * 40
    long = point([f"data.source={deep}/a.jsonl,{deep}/b.jsonl"], [f"data.source={deep}/a.jsonl"])
    assert len(long) < 120 and "/" not in long


def test_ddp_train_through_accelerate_writes_the_adapter_once(tiny_model_dir, tmp_path):
    # --multi_gpu is accelerate's torchrun launcher; without a GPU its processes train over gloo on the CPU.
    out = tmp_path / "outputs"
    accelerate = (str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes",
                  "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    result = pipeline("stage=train", f"model.name_or_path={tiny_model_dir}", *TINY, f"output_dir={out}",
                      launcher=accelerate)
    assert result.returncode == 0, said(result)[-3000:]
    assert_one_ddp_adapter(out, out / "default", steps=12)


def assert_one_ddp_adapter(out: Path, exp: Path, steps: int) -> None:
    """A 2-process train: rank 0 wrote the adapter, once; rank 1 trained and logged, and wrote nothing."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train = exp / "train"
    manifest = read_manifest(train)
    assert manifest["processes"] == 2 and manifest["metrics"]["steps"] == steps
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


def hold_lock(stage: StageDir) -> subprocess.Popen:
    """A process that holds the stage's build lock until a line arrives on its stdin, then releases it cleanly."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from pipeline.artifacts import exclusive\n"
         f"with exclusive(Path({str(stage.store)!r}) / '.{stage.name}.lock', {stage.name!r}):\n"
         "    print('held', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_two_runs_of_one_stage_build_it_once(finished, tmp_path):
    out, overrides, _ = finished
    mine = tmp_path / "outputs"
    shutil.copytree(out, mine, symlinks=True)
    drop(mine / "default", "gptq")
    args = [*overrides, f"output_dir={mine}", "stage=gptq"]
    gptq = StageDir(mine / "store", "gptq", fingerprints(compose_config(*args))["gptq"])
    # Both runs must reach the lock before either can build (a tiny gptq builds in about a second, faster than
    # a second run starts): a third process holds it until both say they wait, then lets them race for it.
    holder = hold_lock(gptq)
    cmd = [sys.executable, "-m", "pipeline", *args]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]  # files, not pipes: a full pipe would block a run
    runs = [subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV) for log in logs]
    try:
        waiting = f"is being built by pid {holder.pid}"
        deadline = time.monotonic() + 300
        while not all(waiting in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(run.poll() is None for run in runs), \
                [log.read_text()[-3000:] for log in logs]
            time.sleep(0.5)
    finally:
        holder.communicate("release\n")
    assert [run.wait(timeout=600) for run in runs] == [0, 0], [log.read_text()[-3000:] for log in logs]
    both = "".join(log.read_text() for log in logs)
    assert both.count("gptq: running") == 1 and both.count("gptq: up to date, skipped") == 1
    assert "recovered the lock" not in both
    assert gptq.is_fresh()
    assert len(list((mine / "store").glob("gptq-*"))) == 1 and not list((mine / "store").glob(".*.partial"))


def test_busy_lock_stops_or_waits_and_a_dead_holder_is_recovered(finished, tmp_path):
    out, overrides, _ = finished
    mine = tmp_path / "outputs"
    shutil.copytree(out, mine, symlinks=True)
    args = [*overrides, f"output_dir={mine}", "stage=merge", "force=true"]
    merge = StageDir(mine / "store", "merge", fingerprints(compose_config(*args))["merge"])
    holder = hold_lock(merge)
    try:
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
