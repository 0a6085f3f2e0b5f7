"""The artifact store: one directory per stage and fingerprint, trusted only when its manifest says it is complete.

`<output_dir>/store/<stage>-<fingerprint>/` holds an artifact; an experiment folder shows the artifacts of its
config as relative links (`<experiment>/train -> ../store/train-<fingerprint>`). So experiments and sweep
points whose stages have the same inputs share one artifact, and the output directory moves as a whole.

A stage works in a hidden `.<stage>-<fingerprint>.partial` directory next to its final place, under a lock
(`.<stage>-<fingerprint>.lock`), so that two processes never build the same artifact. Only when the stage has
finished is `manifest.json` written (last) and the directory renamed into place, so a crash never leaves a
directory that a later run would trust. The partial directory of the train stage survives a crash on
purpose: it holds the periodic checkpoints that the rerun resumes from.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LIBRARIES = ("pipeline", "torch", "transformers", "peft", "bitsandbytes", "gptqmodel", "optimum", "datasets",
             "accelerate", "tokenizers", "gguf", "lm_eval", "ik-llama-cpp-python", "xllamacpp")


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_hashes(paths) -> dict[str, str]:
    """A hash of each file's content, keyed by its path as given (paths that are no file are left out): put in a
    stage's fingerprint, an edited input file rebuilds the stage."""
    hashes = {}
    for path in paths:
        if Path(path).is_file():
            with open(path, "rb") as f:
                hashes[str(path)] = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    return hashes


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


class StageBusy(ConfigError):
    """Another process is building the artifact and the user asked not to wait (lock.wait=false)."""


@contextlib.contextmanager
def exclusive(path: Path, what: str, wait: bool = True, timeout_s: float | None = None):
    """Hold an exclusive lock on `path` (flock) while the block runs.

    The kernel drops a flock when its process dies, however it dies, so a lock left by a crashed run never
    blocks anyone: the next run takes it and says so. The file names its holder so that a waiting run can say
    whom it waits for. (filelock truncates the file on every attempt, so it could not keep that name.)
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start, told = time.monotonic(), 0.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                waited = time.monotonic() - start
                if not wait:
                    raise StageBusy(f"{what} is being built by {holder}: rerun when it is done, or set lock.wait=true "
                                    "to wait for it") from None
                if timeout_s is not None and waited > timeout_s:
                    raise StageBusy(f"{what} is still being built by {holder} after lock.timeout_s={timeout_s:g} s")
                if waited >= told:
                    log.info("%s is being built by %s: waiting (lock.wait=false stops instead)", what, holder)
                    told = waited + 60
                time.sleep(0.5)
        left = os.pread(fd, 512, 0).decode(errors="replace").strip()
        if left:  # a holder that released properly clears its name first
            log.warning("%s: recovered the lock left by %s, which is no longer running", what, left)
        me = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def partials(store: Path) -> list[Path]:
    """The store's partial artifacts: stages at work, interrupted, or waiting in a queue to resume."""
    return sorted(store.glob(".*.partial"))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def clean_partials(store: Path) -> list[tuple[Path, int]]:
    """Remove the partial artifacts that no running process holds (its lock free), and say which with their sizes.
    What a requeued job waiting in the queue left goes too: run it when no job of this store is queued."""
    removed = []
    for partial in partials(store):
        with contextlib.suppress(StageBusy), exclusive(partial.with_suffix(".lock"), partial.name, wait=False):
            removed.append((partial, dir_bytes(partial)))
            shutil.rmtree(partial, ignore_errors=True)
    return removed


@dataclass
class StageDir:
    store: Path  # <output_dir>/store, shared by every experiment in the output directory
    stage: str
    fingerprint: str

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.fingerprint}"

    @property
    def path(self) -> Path:
        return self.store / self.name

    @property
    def partial(self) -> Path:
        return self.store / f".{self.name}.partial"

    def locked(self, wait: bool = True, timeout_s: float | None = None):
        return exclusive(self.store / f".{self.name}.lock", f"{self.stage} ({self.name})", wait, timeout_s)

    def is_fresh(self) -> bool:
        """Complete, for these inputs, and with every listed file present at its recorded size."""
        manifest = read_manifest(self.path)
        if manifest is None or manifest.get("fingerprint") != self.fingerprint:
            return False
        for name, size in manifest.get("files", {}).items():
            f = self.path / name
            if not f.is_file() or f.stat().st_size != size:
                log.warning("%s: %s is missing or has the wrong size; rebuilding", self.stage, name)
                return False
        return True

    def begin(self, resume: bool = False) -> Path:
        """A clean working directory; with resume, keep what an interrupted run of the same inputs left.
        Call it holding the lock. The partial directories of other inputs stay: one may be a requeued job's
        checkpoints, its lock released while it waits in the queue (`clean=true` removes them)."""
        if self.partial.exists() and not resume:
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        return self.partial

    def commit(self, record: dict) -> dict:
        """Write the manifest last, then swap the working directory into place. Call it holding the lock."""
        manifest = {"stage": self.stage, "fingerprint": self.fingerprint,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record,
                    "versions": library_versions(), "files": _files(self.partial)}
        tmp = self.partial / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        tmp.rename(self.partial / MANIFEST)
        old = self.store / f".{self.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.path.exists():  # a damaged copy of the same artifact
            self.path.rename(old)
        self.partial.rename(self.path)
        shutil.rmtree(old, ignore_errors=True)
        return manifest

    def adopt(self, experiment: Path) -> None:
        """A real `<experiment>/<stage>` folder with this fingerprint (an experiment copied without its store)
        becomes the store's entry instead of being rebuilt. Call it holding the lock."""
        view = experiment / self.stage
        if (not view.is_symlink() and (read_manifest(view) or {}).get("fingerprint") == self.fingerprint
                and not self.is_fresh()):
            shutil.rmtree(self.path, ignore_errors=True)
            shutil.move(view, self.path)

    def link(self, experiment: Path) -> Path:
        """Show this artifact in the experiment folder as `<experiment>/<stage>`, a relative link."""
        experiment.mkdir(parents=True, exist_ok=True)
        view = experiment / self.stage
        target = os.path.relpath(self.path, experiment)
        if view.is_symlink() and os.readlink(view) == target:
            return view
        if view.is_dir() and not view.is_symlink():  # a dereferenced copy or an older layout: the store has it
            shutil.rmtree(view)
        tmp = experiment / f".{self.stage}.link-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, view)  # atomic: a reader sees the old artifact or the new one
        return view
