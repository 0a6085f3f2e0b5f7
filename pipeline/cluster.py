"""`-m` runs: the folder of each sweep point, what a SLURM job asks for, a requeue signal that cannot kill a job
while it starts, and job states on clusters without accounting. Used by the command-line edge (__main__) and by
conf/hydra/launcher/slurm.yaml."""
from __future__ import annotations

import hashlib
import logging
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from omegaconf import DictConfig, OmegaConf
from submitit import JobEnvironment
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

log = logging.getLogger(__name__)


def varying_keys(sweep_overrides: list[str], sweeper_params: dict | None = None) -> set[str]:
    """The keys a sweep gives more than one value (`gptq.bits=3,4`), from the command line or hydra.sweeper.params."""
    lines = [*sweep_overrides, *(f"{key}={values}" for key, values in (sweeper_params or {}).items())]
    return {o.key_or_group for o in OverridesParser.create().parse_overrides(lines)
            if o.is_sweep_override() and len(set(o.sweep_string_iterator())) > 1}


def sweep_point_name(hydra_cfg: DictConfig) -> str:
    """A sweep point's folder: its values of the keys that vary across the sweep (gptq.bits=3,train.lr=0.001), so
    that the settings every point shares stay out of the name; empty for a single point, which then writes to the
    experiment folder. Hydra keeps the sweep's own command line in multirun.yaml in the sweep directory."""
    mine = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    sweep = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if sweep.exists():
        master = OmegaConf.load(sweep).hydra
        varying = varying_keys(list(master.overrides.task), master.sweeper.get("params"))
    else:  # a sweeper that keeps no record: every override names the point
        varying = {o.key_or_group for o in mine}
    varying -= set(hydra_cfg.job.config.override_dirname.exclude_keys)  # e.g. experiment: a folder of its own
    name = ",".join(sorted(o.input_line for o in mine if o.key_or_group in varying)).replace("/", "_")
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


def slurm_gpus(gpus: int) -> int | None:
    """A stage job's --gpus-per-node: none asked for with gpus: 0 (a CPU job)."""
    if gpus < 0:
        raise ValueError(f"resources.<stage>.gpus={gpus}: 0 (a CPU-only job) or more")
    return gpus or None


def slurm_tasks(gpus: int) -> int:
    """A stage job's tasks per node: one process per GPU (train runs DDP over them); one for a CPU job."""
    return max(gpus, 1)


OmegaConf.register_new_resolver("slurm_gpus", slurm_gpus, replace=True)
OmegaConf.register_new_resolver("slurm_tasks", slurm_tasks, replace=True)


# submitit's requeue signal (USR2, or $SUBMITIT_PREEMPT_SIGNAL): SLURM sends it to every process of a job's steps
# signal_delay_s before the time limit; a preempting scheduler or `scancel --signal` may send it any time. Until
# submitit has installed its handler (once Python has started and unpickled the job, which imports torch: seconds),
# its default action kills a task, and the job fails instead of being requeued. So a task starts with it blocked
# (slurm_hold_requeue_signal), and the job's function unblocks it (release_requeue_signal).
REQUEUE_SIGNAL = signal.Signals["SIG" + JobEnvironment.USR_SIG]


def slurm_hold_requeue_signal() -> list[str]:
    """srun's last arguments, before the task's command: a bare Python (-I -S: it starts in milliseconds) blocks the
    signal and execs the command, which inherits the blocked signal; one sent meanwhile waits, pending."""
    return [sys.executable, "-I", "-S", "-c", "import os, signal, sys; "
            f"signal.pthread_sigmask(signal.SIG_BLOCK, [signal.{REQUEUE_SIGNAL.name}]); "
            "os.execvp(sys.argv[1], sys.argv[1:])"]


def release_requeue_signal() -> None:
    """Unblock the requeue signal: in a SLURM task, submitit's handler is installed by the time the job's function
    runs, and a signal held since the task started reaches it now."""
    if REQUEUE_SIGNAL in signal.sigpending():
        log.warning("%s arrived while this task was starting: handing it to submitit now", REQUEUE_SIGNAL.name)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [REQUEUE_SIGNAL])


@dataclass
class SlurmSchema(SlurmQueueConf):
    """hydra/launcher=slurm: hydra-submitit-launcher's settings and submitit's srun_args, which the launcher passes
    on to submitit but its schema (1.2) does not list."""
    srun_args: list[str] = field(default_factory=list)


ConfigStore.instance().store(group="hydra/launcher", name="slurm_schema", node=SlurmSchema)
OmegaConf.register_new_resolver("slurm_hold_requeue_signal", slurm_hold_requeue_signal, replace=True)


class JobStates(SlurmInfoWatcher):
    """submitit's job states, logged as they change, also on clusters that keep no accounting (no slurmdbd,
    common on small clusters). There sacct fails: submitit would warn on every poll, and would wait forever for a
    job that ended without a result (cancelled, killed for memory, node failure). squeue knows every job
    slurmctld still holds, finished ones included (MinJobAge, 300 s by default); a job it no longer lists ended."""

    def __init__(self, delay_s: int) -> None:
        super().__init__(delay_s)
        self._accounting: bool | None = None  # asked of slurmctld once, at the first poll

    def has_accounting(self) -> bool:
        if self._accounting is None:
            config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
            self._accounting = "accounting_storage/none" not in config
        return self._accounting

    def register_job(self, job_id: str) -> None:
        super().register_job(job_id)
        log.info("SLURM job %s submitted", job_id)

    def update(self) -> None:
        before = {job_id: self._info_dict.get(job_id, {}).get("State") for job_id in self._registered}
        super().update()
        for job_id, state in sorted(before.items()):
            now = self._info_dict.get(job_id, {}).get("State")
            if now and now != state:
                log.info("SLURM job %s: %s", job_id, now)

    def _make_command(self) -> list[str] | None:
        command = super()._make_command()
        if command is None or self.has_accounting():
            return command
        return ["squeue", "--me", "--states=all", "--noheader", "--format=%i|%T|%N"]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        if self.has_accounting():
            return super().read_info(string)
        text = string.decode() if isinstance(string, bytes) else string
        states = super().read_info("JobID|State|NodeList\n" + text)  # sacct's columns
        listed = {job_id.split("_")[0] for job_id in states}  # a job array's tasks are listed, not its own id
        for job_id in self._registered - self._finished:
            if job_id.split("_")[0] not in listed:
                states[job_id] = {"JobID": job_id, "State": "ENDED"}
        return states


def follow_jobs_without_accounting() -> None:
    """Have submitit's SLURM jobs (all of them share one watcher) use JobStates."""
    SlurmJob.watcher = JobStates(delay_s=600)
