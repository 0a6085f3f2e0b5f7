"""gptq: re-quantize the merged 16-bit checkpoint with GPTQModel, and save it in the layout gptq.format names.

The stage directory is the checkpoint (config.json with its quantization config, safetensors, tokenizer): GPTQModel's
GPTQ layout (quant_method gptq: qweight/qzeros/scales/g_idx), or the same weights repacked into the AWQ layout
(quant_method awq, pipeline/awq.py), in which vLLM serves asymmetric grids. `AutoModelForCausalLM.from_pretrained(
<exp>/gptq)` loads either, and so does vLLM when the manifest's `vllm_compatible` is true.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .. import awq, compute, quantease
from ..config import Config, ConfigError, GPTQConfig, checkpoint_format
from ..data import calibration_windows, read_jsonl
from ..models import device, load_tokenizer, meta_model, torch_dtype

# GPTQModel sizes its CPU worker pool at import and crashes on 2-core machines unless told to use 2 or more.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))

log = logging.getLogger(__name__)

AUTO_GROUP_SIZES = (128, 64, 32)


# vLLM fuses these projections into one layer, which takes one setting: every part must get the same.
FUSED_IN_VLLM = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def quantized_linears(model_dir: Path, trust_remote_code: bool) -> dict[str, int]:
    """The input size of each layer GPTQ quantizes (every Linear but the LM head) by name, read on the meta
    device."""
    model = meta_model(model_dir, trust_remote_code)
    head = model.get_output_embeddings()
    return {name: m.in_features for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head}


def choose_group_size(requested: int | None, in_features: set[int]) -> int:
    if requested is not None:
        return requested
    for size in AUTO_GROUP_SIZES:
        if all(f % size == 0 for f in in_features):
            return size
    return -1


def dynamic_rules(g: GPTQConfig) -> dict | None:
    """gptq.dynamic as the plain dict GPTQModel takes."""
    return OmegaConf.to_container(g.dynamic) if OmegaConf.is_config(g.dynamic) else g.dynamic


def module_settings(g: GPTQConfig, group_size: int, name: str) -> dict | None:
    """The settings module `name` is quantized with: those of gptq.dynamic's first rule matching it (resolved
    by GPTQModel, as vLLM resolves them) over the stage's; None where a '-:' rule leaves it 16-bit."""
    from gptqmodel.quantization.config import dynamic_get

    rule = dynamic_get(dynamic_rules(g), name)
    if rule is False:
        return None
    return {"bits": g.bits, "group_size": group_size, "sym": g.sym, "desc_act": g.desc_act, **(rule or {})}


def check_rules_match(g: GPTQConfig, linears: dict[str, int]) -> None:
    """A gptq.dynamic rule that matches no layer is a typo, not a choice: stop before quantizing."""
    from gptqmodel.quantization.config import dynamic_get

    for pattern in dynamic_rules(g) or {}:
        if all(dynamic_get({pattern: {}}, name) is None for name in linears):
            raise ConfigError(f"gptq.dynamic[{pattern!r}] matches no layer GPTQ quantizes; their names are like "
                              f"{next(iter(linears))!r}")


def settings_problems(g: GPTQConfig, on_cpu: bool = False) -> list[str]:
    """What in the GPTQ settings alone (the stage's and each gptq.dynamic rule's) makes a checkpoint vLLM refuses
    (`on_cpu`: vLLM's CPU build). Its GPTQ layers run on Marlin kernels, which take 4- and 8-bit (on CPU: 4-bit)
    grids in static order, symmetric ones only in the GPTQ layout: asymmetric ones it takes as AWQ (4-bit, static
    order, as gptq.format=awq is validated)."""
    problems, served_bits = [], (4,) if on_cpu else (4, 8)
    gptq_layout = checkpoint_format(g) == "gptq"
    rules = {"": {"bits": g.bits, "sym": g.sym, "desc_act": g.desc_act}}
    rules |= {f"gptq.dynamic[{pattern!r}]: ": rule for pattern, rule in (dynamic_rules(g) or {}).items()
              if not pattern.startswith("-:")}
    for where, rule in rules.items():
        if rule.get("desc_act"):
            problems.append(f"{where}desc_act=true (dynamic act-order): vLLM refuses such checkpoints")
        if rule.get("bits", 4) not in served_bits:
            problems.append(f"{where}bits={rule['bits']}: vLLM's GPTQ kernels take "
                            f"{' or '.join(map(str, served_bits))} bits{' on CPU' if on_cpu else ''}")
        if rule.get("sym") is False and gptq_layout:
            problems.append(f"{where}sym=false in the GPTQ layout: vLLM takes symmetric grids only there "
                            "(gptq.sym=true), asymmetric ones in the AWQ layout (gptq.format=auto or awq: 4 bits, "
                            "no gptq.dynamic rules, no desc_act)")
    return problems


def vllm_problems(g: GPTQConfig, group_size: int, linears: dict[str, int]) -> list[str]:
    """settings_problems, and what in the model's layers makes vLLM refuse the checkpoint (one line per kind)."""
    problems = settings_problems(g)
    settings = {name: module_settings(g, group_size, name) for name in linears}
    misfits: dict[tuple[int, int], list[str]] = {}  # (group size, input size) -> layers
    for name, size in linears.items():
        group = (settings[name] or {}).get("group_size", -1)
        if group > 0 and size % group:
            misfits.setdefault((group, size), []).append(name)
    for (group, size), names in misfits.items():
        problems.append(f"group_size={group} does not divide the input size {size} of {names[0]}"
                        f"{f' and {len(names) - 1} more' if len(names) > 1 else ''}: vLLM's loader fails on it")
    for fused, parts in FUSED_IN_VLLM.items():
        split = []
        for name in linears:
            parent, _, part = name.rpartition(".")
            names = [f"{parent}.{p}" for p in parts[1:]] + [f"{parent}.{fused}"]
            if part == parts[0] and any(module_settings(g, group_size, n) != settings[name] for n in names):
                split.append(parent)
        if split:
            problems.append(f"gptq.dynamic treats the parts of {fused} ({', '.join(parts)}) differently in "
                            f"{', '.join(split)}: vLLM runs them as one layer and refuses that")
    return problems


def mse_exponent(g: GPTQConfig) -> float:
    """gptq.mse with null resolved: the MSE range search on a GPU; min/max on CPU, where GPTQModel's search more
    than doubles the stage's time (docs/gptq.md, Levers)."""
    if g.mse is not None:
        return g.mse
    if device().type == "cuda":
        return 2.4
    log.info("gptq: min/max group ranges on CPU (gptq.mse=null); gptq.mse=2.4 searches them as on a GPU: "
             "better (docs/gptq.md, Levers), and minutes slower here")
    return 0.0


def highest_losses(checkpoint: Path, linears: dict[str, int], count: int = 5) -> dict[str, float]:
    """The layers GPTQ quantized worst, by GPTQModel's log of each one's loss: the first to give more bits with
    gptq.dynamic (on the default model, three down_proj layers lose far more than all others)."""
    path = checkpoint / "quant_log.csv"
    if not path.is_file():
        return {}
    with open(path) as f:
        rows = sorted(csv.DictReader(f), key=lambda row: -float(row["loss"]))[:count]
    # The log names a layer by its block's index and its name inside the block.
    short = {row["layer"] + "." + row["module"]: float(row["loss"]) for row in rows}
    return {next((name for name in linears if name.endswith("." + layer)), layer): loss
            for layer, loss in short.items()}


def group_size_for(cfg: Config, merged: Path) -> tuple[int, dict[str, int]]:
    """The stage-wide group size, and the input size of each layer GPTQ quantizes."""
    linears = quantized_linears(merged, cfg.model.trust_remote_code)
    return choose_group_size(cfg.gptq.group_size, set(linears.values())), linears


def offload_finds_the_head(merged: Path, trust_remote_code: bool) -> bool:
    """Whether GPTQModel's model definition names the LM head as transformers does. Its disk offload looks the
    head up by that name when saving; where the name is stale (its GPT-NeoX definition says `embed_out`,
    transformers 5 says `lm_head`) saving fails with "Offloaded tensor 'lm_head.weight' not found"."""
    from gptqmodel.models.auto import check_and_get_model_definition

    model = meta_model(merged, trust_remote_code)
    head = model.get_output_embeddings()
    names = [name for name, module in model.named_modules() if module is head]
    return check_and_get_model_definition(str(merged), trust_remote_code=trust_remote_code).lm_head in names


def forget_offload_path(checkpoint: Path) -> None:
    """GPTQModel records in the checkpoint's metadata where it offloaded layers while quantizing: a folder of this
    build, gone once it is done. Drop it, so that a checkpoint names no path of the machine that made it."""
    for name, section in (("config.json", "quantization_config"), ("quantize_config.json", None)):
        path = checkpoint / name
        config = json.loads(path.read_text())
        (config[section] if section else config).get("meta", {}).pop("offload_to_disk_path", None)
        path.write_text(json.dumps(config, indent=2) + "\n")


def store_unquantized(checkpoint: Path, dtype: torch.dtype) -> None:
    """The checkpoint's unquantized weights (embeddings, norms, head, biases) in `dtype`, as the merged checkpoint
    stores them: GPTQModel saves them in the dtype it computed in (float32 on CPUs without fast bfloat16), which
    would double their bytes. Shard by shard; the quantized layers' scales keep their own dtype."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    narrowed = 0
    for shard in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors, metadata = {name: f.get_tensor(name) for name in f.keys()}, f.metadata()
        cast = {name: tensor.to(dtype) for name, tensor in tensors.items()
                if tensor.is_floating_point() and tensor.dtype != dtype and not name.endswith(".scales")}
        if not cast:
            continue
        narrowed += sum(tensors[name].nbytes - tensor.nbytes for name, tensor in cast.items())
        partial = shard.with_suffix(".partial")
        save_file({**tensors, **cast}, partial, metadata)
        os.replace(partial, shard)
    index = checkpoint / "model.safetensors.index.json"
    if narrowed and index.is_file():
        contents = json.loads(index.read_text())
        if "total_size" in contents.get("metadata", {}):
            contents["metadata"]["total_size"] -= narrowed
            index.write_text(json.dumps(contents, indent=2) + "\n")
    config = json.loads((checkpoint / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def quantize(cfg: Config, merged: Path, out: Path, quant_config, calibration: list[dict] | None,
             refinement: contextlib.AbstractContextManager = contextlib.nullcontext()) -> None:
    """Quantize the merged checkpoint with GPTQModel (GPTQ with calibration data, RTN without) into `out`.
    `quant_config` offloads to `out / "offload"` (GPTQModel's default is the system temp dir); `refinement`
    is a context active while GPTQModel quantizes."""
    from gptqmodel import GPTQModel
    from transformers import GenerationConfig, set_seed

    merged, out = merged.resolve(), out.resolve()  # GPTQModel reads the weights lazily, from inside the chdir below
    out.mkdir(parents=True, exist_ok=True)
    if not offload_finds_the_head(merged, cfg.model.trust_remote_code):
        log.info("gptq: GPTQModel's definition of this model names its LM head differently from transformers: "
                 "quantizing without disk offload (the finished layers stay in memory)")
        quant_config.offload_to_disk = False
    set_seed(cfg.seed)
    # In the run's compute dtype: GPTQModel's own default on CPU is bfloat16, 250x slower than float32 on AVX2.
    model = GPTQModel.load(str(merged), quant_config, device=device(), dtype=compute.dtype(cfg),
                           trust_remote_code=cfg.model.trust_remote_code)
    with contextlib.chdir(out), refinement:  # GPTQModel writes per-layer stats to ./logs: keep them with it
        model.quantize(calibration, batch_size=cfg.gptq.batch_size)
    model.save(str(out))
    store_unquantized(out, torch_dtype(cfg.merge.dtype))
    forget_offload_path(out)
    # GPTQModel writes a generation config that turns sampling on: keep the merged model's, so that a server
    # decodes and stops as the fine-tuned model does.
    GenerationConfig.from_pretrained(str(merged)).save_pretrained(out)
    load_tokenizer(merged).save_pretrained(out)
    shutil.rmtree(out / "offload", ignore_errors=True)


def run(cfg: Config, work: Path, inputs: dict[str, Path]) -> dict:
    from gptqmodel.quantization.config import GPTQConfig as QuantizeConfig  # GPTQModel's; ours is GPTQConfig

    g, merged = cfg.gptq, inputs["merge"]
    group_size, linears = group_size_for(cfg, merged)
    check_rules_match(g, linears)
    problems = vllm_problems(g, group_size, linears)
    for problem in problems:
        log.warning("gptq: the checkpoint will not serve in vLLM: %s", problem)

    rows = read_jsonl(inputs["train"] / "data" / "train.jsonl")
    windows = calibration_windows(load_tokenizer(merged), g.calib_source, rows, g.calib_samples, g.calib_seq_len,
                                  cfg.seed)
    calibration = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]
    # GPTQModel turns act_group_aware on by default, but its GPTAQ and FOEM solvers never read it: say so.
    act_group_aware = g.act_group_aware if g.method == "gptq" else False
    mse = mse_exponent(g)
    quant_config = QuantizeConfig(bits=g.bits, group_size=group_size, desc_act=g.desc_act, sym=g.sym,
                                  act_group_aware=act_group_aware, mse=mse, damp_percent=g.damp_percent,
                                  gptaq={} if g.method == "gptaq" else None, foem={} if g.method == "foem" else None,
                                  dynamic=dynamic_rules(g), offload_to_disk_path=str(work.resolve() / "offload"))
    errors: dict[str, tuple[float, float]] = {}
    refinement = (quantease.refining_gptq(g.refine_sweeps, g.damp_percent, errors) if g.refine == "quantease"
                  else contextlib.nullcontext())
    quantize(cfg, merged, work, quant_config, calibration, refinement)
    layout = checkpoint_format(g)
    if layout == "awq":
        awq.to_awq(work)
        log.info("gptq: repacked GPTQModel's checkpoint into the AWQ layout (gptq.format=%s): the same weights, in "
                 "the layout vLLM serves asymmetric grids in", g.format)

    losses = highest_losses(work, linears)
    if losses:
        log.info("gptq: the highest losses: %s (gptq.dynamic can give such layers more bits; docs/gptq.md, Levers)",
                 ", ".join(f"{name} {loss:.3g}" for name, loss in losses.items()))
    result = {"format": layout, "group_size": group_size, "act_group_aware": quant_config.act_group_aware,
              "mse": mse, "calibration_windows": len(windows), "layer_in_features": sorted(set(linears.values())),
              "vllm_compatible": not problems, "vllm_problems": problems, "computed_in": compute.dtype_name(cfg),
              "highest_losses": losses}
    if errors:
        (work / "quantease_errors.json").write_text(json.dumps(errors, indent=1))
        before, after = (sum(e[i] for e in errors.values()) / len(errors) for i in (0, 1))
        log.info("gptq: QuantEase lowered the mean layer error of %d layers from %.5f to %.5f (%.1f%% less)",
                 len(errors), before, after, 100 * (1 - after / before))
        result["quantease"] = {"sweeps": g.refine_sweeps, "layers": len(errors), "layer_error_before": before,
                               "layer_error_after": after}
    return result
