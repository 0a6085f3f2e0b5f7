"""kill -9 in the middle of merge or gptq, rerun the same command: it completes, nothing half-written is trusted,
and the artifacts are bit-identical to those of the uninterrupted run."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pipeline.artifacts import read_manifest

from .conftest import drop


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kill_when(pattern: str, store, args: list[str], delay: float) -> None:
    """Run the pipeline in a subprocess and SIGKILL it `delay` seconds after `pattern` appears in the store."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(store.glob(pattern)):
        time.sleep(0.01)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.parametrize("pattern, delay", [
    (".merge-*.partial", 0.0),                  # as merge starts
    (".gptq-*.partial/logs/*", 0.0),            # while GPTQModel quantizes (it writes its log first)
    (".gptq-*.partial/model.safetensors", 0.0),  # checkpoint saved, stage not yet committed (kernel check runs)
])
def test_killed_stage_reruns_to_identical_artifacts(finished, tmp_path, pattern, delay):
    out, overrides, _ = finished
    mine = tmp_path / "outputs"
    shutil.copytree(out, mine, symlinks=True)
    exp = mine / "default"
    for stage in ("merge", "gptq", "eval", "bench"):
        drop(exp, stage)
    args = [*overrides, f"output_dir={mine}", "stage=gptq"]

    kill_when(pattern, mine / "store", args, delay)
    assert read_manifest(exp / "gptq") is None, "a killed stage is never trusted"

    rerun = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert not list((mine / "store").glob(".*.partial")), "the rerun cleaned up what the killed run left"
    for stage, weights in (("merge", "model.safetensors"), ("gptq", "model.safetensors")):
        assert digest(exp / stage / weights) == digest(out / "default" / stage / weights), stage
