"""The docs cannot go stale: every `python -m pipeline ...` command in README.md and docs/ composes with Hydra and
passes the typed config's checks (no model is loaded), every config key appears in the docs, and every relative
link points to a file that exists."""
from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import pipeline.cluster  # noqa: F401  (registers the SLURM launcher's schema and resolvers)
from pipeline.config import validate

from .conftest import CONF_DIR, compose_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]*(?:\n[^`\n]*)?)`")
PIPELINE_ARGS = re.compile(r"-m pipeline\b(.*)")
MAKE_RUN_ARGS = re.compile(r"make run ARGS=\"([^\"]*)\"")


def commands(text: str) -> list[str]:
    """The arguments of every pipeline command in a page: lines of code blocks (continued with a backslash), inline
    code, and `make run ARGS="..."`."""
    found = []
    for block in CODE_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            if match := PIPELINE_ARGS.search(line.split(" #")[0]):  # not a command quoted in a comment
                found.append(match.group(1))
    outside = CODE_BLOCK.sub("", text)
    for span in INLINE_CODE.findall(outside):
        span = span.replace("\n", " ")
        if match := PIPELINE_ARGS.search(span):
            found.append(match.group(1))
    found += MAKE_RUN_ARGS.findall(text)
    return found


def override_sets(args: str) -> list[list[str]]:
    """One list of overrides per run the command makes: a `-m` sweep (`key=a,b`) runs each of its values."""
    words = [w for w in shlex.split(args, comments=True) if not w.startswith("-")]
    choices = []
    for override in OverridesParser.create().parse_overrides(words):
        key = override.get_key_element()
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [
            override.get_value_element_as_str()]
        choices.append([f"{key}={value}" for value in values])
    return [list(point) for point in itertools.product(*choices)]


DOC_COMMANDS = [(page.relative_to(ROOT).as_posix(), args) for page in PAGES for args in commands(page.read_text())]


def test_the_docs_have_commands_to_check():
    pages = {page for page, _ in DOC_COMMANDS}
    assert "README.md" in pages and len(pages) >= 8 and len(DOC_COMMANDS) >= 40, pages


def check_command(args: str) -> None:
    """Compose each run of a command as `python -m pipeline` would (Hydra's own keys included) and check it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for overrides in override_sets(args):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
            validate(cfg)
            OmegaConf.to_container(cfg.hydra.launcher, resolve=True)  # the SLURM job's resources resolve


@pytest.mark.parametrize("page, args", DOC_COMMANDS, ids=[f"{p}: {a.strip()[:60]}" for p, a in DOC_COMMANDS])
def test_every_documented_command_composes_and_passes_the_checks(page, args):
    check_command(args)


def config_keys() -> list[str]:
    cfg = OmegaConf.to_container(compose_config())

    def flat(node: dict, prefix: str = ""):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield prefix + key

    launcher = yaml.safe_load((ROOT / "conf" / "hydra" / "launcher" / "slurm.yaml").read_text())
    return [*flat(cfg), *(f"hydra.launcher.{key}" for key in launcher if key != "defaults")]


def documented(key: str, text: str) -> bool:
    """`key` in the docs, literally or with some of its parts written as a placeholder (`resources.<stage>.gpus`)."""
    parts = (rf"(?:{re.escape(part)}|<[\w-]+>)" for part in key.split("."))
    return re.search(r"(?<![\w.])" + r"\.".join(parts) + r"(?![\w])", text) is not None


def test_every_config_key_is_documented():
    text = "\n".join(page.read_text() for page in PAGES)
    keys = config_keys()
    assert len(keys) > 100
    assert [key for key in keys if not documented(key, text)] == []


def test_every_relative_link_points_to_a_file():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if path and "://" not in path and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_a_stale_key_fails_the_check():
    """The check itself: a command naming a key the config does not have is refused."""
    with pytest.raises(Exception, match="no_such_key"):
        check_command(commands("```bash\npython -m pipeline train.no_such_key=8\n```\n")[0])
    assert not documented("train.lora_rank", "train.lora_r, `train.lora_ranks`")
    assert documented("resources.train.gpus", "`resources.<stage>.gpus`")
