"""Checks of the world outside the config, run before any heavy work: the model and data exist and have the
right shape, the output directory is writable and has room."""
from __future__ import annotations

import json
import os
import shutil
from importlib import metadata
from pathlib import Path

from .config import ConfigError, DataConfig, ModelConfig
from .data import load_source, local_data_files
from .models import gguf_file, is_hub_id, source_config

GIB = 2**30


def check_model(name_or_path: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> None:
    gguf = gguf_file(name_or_path)  # raises ConfigError for a missing package
    if gguf is not None:
        if not gguf.is_file():
            raise ConfigError(f"model.name_or_path={name_or_path!r}: no such GGUF file")
        return
    if is_hub_id(name_or_path):
        return  # checked when it is loaded
    local = Path(name_or_path)
    if not local.is_dir():
        raise ConfigError(f"model.name_or_path={name_or_path!r}: no such directory")
    try:
        config = json.loads((local / "config.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(f"model.name_or_path={name_or_path!r}: no readable config.json, not an HF model "
                          "directory") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.get("auto_map") and not trust_remote_code:
        raise ConfigError(f"model.name_or_path={name_or_path!r}: the model ships its own Python code (auto_map in "
                          "config.json), which runs when loaded: set model.trust_remote_code=true if you trust it")
    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not config.get("auto_map"):
        raise ConfigError(f"model.name_or_path={name_or_path!r}: model_type {config.get('model_type')!r} is not a "
                          "causal language model")
    if not allow_pickle and not list(local.glob("*.safetensors")):
        raise ConfigError(f"model.name_or_path={name_or_path!r}: no .safetensors weights; pickled weights (.bin, .pt) "
                          "can run code when loaded: convert them, or set model.allow_pickle=true if you trust them")


def check_gptq_support(model: ModelConfig) -> None:
    """GPTQModel knows the architecture: it quantizes layer by layer along a per-architecture definition (for an
    unknown one it guesses the layer tree, which is not something to find out after training)."""
    from gptqmodel.models.auto import MODEL_MAP

    try:
        config = source_config(model)
    except OSError:
        return  # a hub id that cannot be reached from here: the base stage reports that
    if config.model_type not in MODEL_MAP:
        raise ConfigError(f"model.name_or_path={model.name_or_path!r}: model_type {config.model_type!r} is not "
                          f"supported by GPTQModel {metadata.version('gptqmodel')} (gptqmodel.models.auto.MODEL_MAP "
                          "lists what is), so the gptq stage cannot quantize it; stage=train and stage=merge work")


def check_gguf_support(model: ModelConfig) -> None:
    """llama.cpp's converter knows the architecture and the tokenizer: it writes the model's vocabulary (its
    `--vocab-only` mode, seconds) before training, from the source's config and tokenizer."""
    import tempfile

    from .stages.gguf import convert, converter

    if converter() is None:
        return  # the stage says so when it comes to it
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(model.name_or_path)
        if not folder.is_dir():  # a GGUF file or a hub id: its config and tokenizer, as the merged checkpoint has them
            from .models import load_tokenizer

            try:
                source_config(model).save_pretrained(tmp)
                load_tokenizer(model.name_or_path, model).save_pretrained(tmp)
            except OSError:
                return  # a hub id that cannot be reached from here: the base stage reports that
            folder = Path(tmp)
        try:
            convert(folder, Path(tmp) / "vocab.gguf", "f16", Path(tmp) / "convert.log", vocab_only=True)
        except RuntimeError as why:
            raise ConfigError(f"model.name_or_path={model.name_or_path!r}: {why}; so the gguf stage cannot convert "
                              "it (gguf.enabled=false runs without it)") from None


def check_data_file(key: str, source: str) -> None:
    """A local dataset file exists, is not empty and (JSONL) parses line by line."""
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{key}={source!r}: no such file")
    if path.stat().st_size == 0:
        raise ConfigError(f"{key}={source!r}: the file is empty")
    if path.suffix == ".jsonl":
        malformed = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                if line.strip():
                    json.loads(line)
            except ValueError:
                malformed.append(number)
        if malformed:
            lines = ", ".join(map(str, malformed[:10])) + (f" and {len(malformed) - 10} more" if malformed[10:] else "")
            raise ConfigError(f"{key}={source!r}: malformed JSON on line {lines}")


def check_data_files(data: DataConfig) -> None:
    for key, path, _ in local_data_files(data):
        check_data_file(key, path)


def check_data_rows(data: DataConfig) -> None:
    """Every row of every local file has a known shape (read as the train stage reads it; datasets caches it)."""
    for key, path, split in local_data_files(data):
        load_source(data, path, split, f"{key}={path!r}", 0, None)


def check_output_dir(output_dir: str, needed_bytes: int) -> None:
    root = Path(output_dir)
    existing = next((p for p in [root, *root.parents] if p.exists()), Path("."))
    probe = existing / f".pipeline-write-test-{os.getpid()}"  # per process: concurrent runs probe together
    try:
        probe.touch()
        probe.unlink()
    except OSError:
        raise ConfigError(f"output_dir={output_dir!r}: {existing} is not writable") from None
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise ConfigError(f"output_dir={output_dir!r}: {free / GIB:.1f} GiB free, the run needs about "
                          f"{needed_bytes / GIB:.1f} GiB")


def source_bytes(name_or_path: str) -> int:
    """Bytes of the base model's weight files; 0 when unknown before download (a hub id)."""
    gguf = gguf_file(name_or_path)
    if gguf is not None:
        return gguf.stat().st_size
    if Path(name_or_path).is_dir():
        return sum(p.stat().st_size for p in Path(name_or_path).glob("*.safetensors"))
    return 0


def estimated_run_bytes(name_or_path: str) -> int:
    """Disk a whole run writes, about three 16-bit copies of the model (source, merged, and the 4-bit ones)."""
    to_sixteen_bit = 4 if gguf_file(name_or_path) is not None else 1  # 4-5 bit GGUF blocks -> 16-bit weights
    return 3 * to_sixteen_bit * source_bytes(name_or_path)


def check(cfg) -> None:
    check_model(cfg.model.name_or_path, cfg.model.allow_pickle, cfg.model.trust_remote_code)
    check_data_files(cfg.data)
    check_output_dir(cfg.output_dir, estimated_run_bytes(cfg.model.name_or_path))
