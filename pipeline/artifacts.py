"""The artifact cache: one directory per stage, trusted only when its manifest says it is complete.

A stage works in a hidden `.<stage>.<fingerprint>.partial` directory next to its final place. Only when the
stage has finished is `manifest.json` written (last) and the directory renamed into place, so a crash never
leaves a directory that a later run would trust. The partial directory of the train stage survives a crash on
purpose: it holds the periodic checkpoints that the rerun resumes from.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LIBRARIES = ("pipeline", "torch", "transformers", "peft", "bitsandbytes", "gptqmodel", "optimum", "datasets",
             "accelerate")


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


@dataclass
class StageDir:
    root: Path  # the experiment directory
    stage: str
    fingerprint: str

    @property
    def path(self) -> Path:
        return self.root / self.stage

    @property
    def partial(self) -> Path:
        return self.root / f".{self.stage}.{self.fingerprint}.partial"

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
        """A clean working directory; with resume, keep what an interrupted run of the same inputs left."""
        for stale in self.root.glob(f".{self.stage}.*.partial"):
            if stale != self.partial:
                shutil.rmtree(stale)
        if self.partial.exists() and not resume:
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        return self.partial

    def commit(self, record: dict) -> dict:
        """Write the manifest last, then swap the working directory into place."""
        manifest = {"stage": self.stage, "fingerprint": self.fingerprint,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record,
                    "versions": library_versions(), "files": _files(self.partial)}
        tmp = self.partial / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        tmp.rename(self.partial / MANIFEST)
        old = self.root / f".{self.stage}.old"
        if old.exists():
            shutil.rmtree(old)
        if self.path.exists():
            self.path.rename(old)
        self.partial.rename(self.path)
        shutil.rmtree(old, ignore_errors=True)
        return manifest
