"""gptq: re-quantize the merged 16-bit checkpoint with GPTQModel and save a standard GPTQ checkpoint.

The stage directory is the checkpoint (config.json with quant_method gptq, safetensors with qweight/qzeros/
scales/g_idx, tokenizer): `AutoModelForCausalLM.from_pretrained(<exp>/gptq)` loads it, and so does vLLM when
the manifest's `vllm_compatible` is true.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .. import quantease
from ..config import Config, GPTQConfig
from ..data import calibration_windows, read_jsonl
from ..models import device, load_gptq, load_tokenizer, meta_model, quantized_kernels

# GPTQModel sizes its CPU worker pool at import and crashes on 2-core machines unless told to use 2 or more.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))

log = logging.getLogger(__name__)

AUTO_GROUP_SIZES = (128, 64, 32)


def linear_in_features(model_dir: Path, trust_remote_code: bool) -> set[int]:
    """Input sizes of the layers GPTQ quantizes (every Linear but the LM head), read on the meta device."""
    model = meta_model(model_dir, trust_remote_code)
    head = model.get_output_embeddings()
    return {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head}


def choose_group_size(requested: int | None, in_features: set[int]) -> int:
    if requested is not None:
        return requested
    for size in AUTO_GROUP_SIZES:
        if all(f % size == 0 for f in in_features):
            return size
    return -1


def settings_problems(g: GPTQConfig) -> list[str]:
    """What in the GPTQ settings alone makes a checkpoint vLLM refuses. Its GPTQ layers run on Marlin kernels,
    which take 4- and 8-bit symmetric grids in static order only."""
    problems = []
    if g.desc_act:
        problems.append("desc_act=true (dynamic act-order): vLLM refuses such checkpoints")
    if g.bits not in (4, 8):
        problems.append(f"bits={g.bits}: vLLM's GPTQ kernels take 4 or 8 bits")
    if not g.sym:
        problems.append("sym=false: vLLM's GPTQ kernels take symmetric grids only")
    return problems


def vllm_problems(g: GPTQConfig, group_size: int, in_features: set[int]) -> list[str]:
    problems = settings_problems(g)
    if group_size > 0 and any(f % group_size for f in in_features):
        problems.append(f"group_size={group_size} does not divide every layer input size {sorted(in_features)}: "
                        "vLLM's loader fails on it")
    return problems


def mse_exponent(g: GPTQConfig) -> float:
    """gptq.mse with null resolved: the MSE range search on a GPU; min/max on CPU, where GPTQModel's search more
    than doubles the stage's time (README, GPTQ levers)."""
    if g.mse is not None:
        return g.mse
    if device().type == "cuda":
        return 2.4
    log.info("gptq: min/max group ranges on CPU (gptq.mse=null); gptq.mse=2.4 searches them as on a GPU: "
             "better (README, GPTQ levers), and minutes slower here")
    return 0.0


def kernel_name(checkpoint: Path) -> str:
    """The kernel class(es) that loading the checkpoint with transformers, as eval and users do, uses here."""
    return ", ".join(quantized_kernels(load_gptq(checkpoint)))


def group_size_for(cfg: Config, merged: Path) -> tuple[int, set[int]]:
    in_features = linear_in_features(merged, cfg.model.trust_remote_code)
    return choose_group_size(cfg.gptq.group_size, in_features), in_features


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
    model = GPTQModel.load(str(merged), quant_config, device=device(), trust_remote_code=cfg.model.trust_remote_code)
    with contextlib.chdir(out), refinement:  # GPTQModel writes per-layer stats to ./logs: keep them with it
        model.quantize(calibration, batch_size=cfg.gptq.batch_size)
    model.save(str(out))
    forget_offload_path(out)
    # GPTQModel writes a generation config that turns sampling on: keep the merged model's, so that a server
    # decodes and stops as the fine-tuned model does.
    GenerationConfig.from_pretrained(str(merged)).save_pretrained(out)
    load_tokenizer(merged).save_pretrained(out)
    shutil.rmtree(out / "offload", ignore_errors=True)


def run(cfg: Config, work: Path, inputs: dict[str, Path]) -> dict:
    from gptqmodel.quantization.config import GPTQConfig as QuantizeConfig  # GPTQModel's; ours is GPTQConfig

    g, merged = cfg.gptq, inputs["merge"]
    group_size, in_features = group_size_for(cfg, merged)
    problems = vllm_problems(g, group_size, in_features)
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
                                  offload_to_disk_path=str(work.resolve() / "offload"))
    errors: dict[str, tuple[float, float]] = {}
    refinement = (quantease.refining_gptq(g.refine_sweeps, g.damp_percent, errors) if g.refine == "quantease"
                  else contextlib.nullcontext())
    quantize(cfg, merged, work, quant_config, calibration, refinement)

    result = {"group_size": group_size, "act_group_aware": quant_config.act_group_aware, "mse": mse,
              "calibration_windows": len(windows), "layer_in_features": sorted(in_features),
              "vllm_compatible": not problems, "vllm_problems": problems, "kernel": kernel_name(work)}
    if errors:
        (work / "quantease_errors.json").write_text(json.dumps(errors, indent=1))
        before, after = (sum(e[i] for e in errors.values()) / len(errors) for i in (0, 1))
        log.info("gptq: QuantEase lowered the mean layer error of %d layers from %.5f to %.5f (%.1f%% less)",
                 len(errors), before, after, 100 * (1 - after / before))
        result["quantease"] = {"sweeps": g.refine_sweeps, "layers": len(errors), "layer_error_before": before,
                               "layer_error_after": after}
    return result
