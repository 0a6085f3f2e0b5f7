"""The GPTQ checkpoint's model card (`<experiment>/gptq/README.md`, the Hugging Face format) and its optional
upload to the hub (`push.repo_id`).

The card is rewritten at the end of every run that evaluates, benchmarks or serves, from the manifests and the
report's results, so it always describes the checkpoint next to it. It is not one of the artifact's listed files:
the checkpoint's fingerprint and freshness do not depend on it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import yaml

from . import report
from .artifacts import read_manifest
from .config import Config, ConfigError
from .models import is_hub_id

log = logging.getLogger(__name__)

# What a deployment needs from the stage directory; the manifest and GPTQModel's logs stay behind.
UPLOAD_IGNORE = ["manifest.json", "logs/*", "quant_log.csv", "offload/*"]


def loss(metrics: dict, key: str) -> str:
    """A loss of the train manifest, or "-": train manifests written before every run logged its last step have none
    when the run was shorter than train.logging_steps (they stay cached)."""
    return "-" if metrics.get(key) is None else f"{metrics[key]:.4f}"


def render(cfg: Config, exp: Path) -> str:
    gptq, train, merge = (read_manifest(exp / stage) or {} for stage in ("gptq", "train", "merge"))
    g, t = gptq["config"]["gptq"], train["config"]["train"]
    layout = gptq["metrics"].get("format", "gptq")  # manifests from before gptq.format wrote GPTQ
    metadata = {"library_name": "transformers", "pipeline_tag": "text-generation",
                "tags": ["gptq", *(["awq"] if layout == "awq" else []), f"{g['bits']}-bit", "qlora", "text-generation"]}
    if is_hub_id(cfg.model.name_or_path):
        metadata["base_model"] = cfg.model.name_or_path
    evaluation, bench, served = report.results(exp)
    table = report.markdown(report.rows(evaluation, bench, served)) if evaluation or bench or served else "-"
    check = merge.get("metrics", {}).get("check", {})
    mse = gptq["metrics"].get("mse", g["mse"])
    ranges = f"MSE search (exponent {mse:g})" if mse else "min/max"
    steps = train.get("metrics", {})
    if g.get("dynamic"):  # transformers' GPTQ loader drops per-module settings and fails on the layers they change
        loaders = f"GPTQModel loads it (per-module settings {g['dynamic']}; transformers cannot)"
        load_lines = ["from gptqmodel import GPTQModel", "from transformers import AutoTokenizer",
                      'model = GPTQModel.load("<this folder or repo>").model']
    else:
        loaders = "transformers and GPTQModel load it"
        load_lines = ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                      'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>", device_map="auto")']
    # The gptq stage's own check of what vLLM's loader takes: a card must not offer `vllm serve` where it fails.
    vllm_refuses = gptq["metrics"].get("vllm_problems", [])
    servers = f"vLLM refuses it ({'; '.join(vllm_refuses)})" if vllm_refuses else "vLLM and SGLang serve it"
    serve_lines = [] if vllm_refuses else [
        "```bash", "vllm serve <this folder or repo>   # OpenAI-compatible server; the chat template ships with the "
        "checkpoint", "```"]
    described = {"gptq": "A standard GPTQ checkpoint (`quant_method: gptq`)",
                 "awq": "GPTQ's weights in the AWQ layout (`quant_method: awq`, GEMM version, a zero point per group), "
                        "repacked from GPTQModel's output without changing one dequantized weight"}[layout]
    sources = steps.get("sources", [])
    data = " + ".join(f"`{c['source']}`" + (f" (weight {c['weight']:g})" if len(sources) > 1 else "") for c in sources)
    lines = [
        "---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "",
        f"# {exp.name}: GPTQ {g['bits']}-bit", "",
        f"`{cfg.model.name_or_path}` fine-tuned with QLoRA on {data}, the adapter "
        "merged into the dequantized NF4 base (which it was trained on), then quantized with GPTQ (GPTQModel). "
        f"{described}: {loaders}; {servers}.", "",
        "## Use it", "", "```python", *load_lines,
        'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>")',
        'prompt = tokenizer.apply_chat_template([{"role": "user", "content": "..."}], add_generation_prompt=True,',
        '                                       return_tensors="pt", return_dict=True).to(model.device)',
        "print(tokenizer.decode(model.generate(**prompt, max_new_tokens=64)[0]))", "```", *serve_lines, "",
        "## Quantization", "",
        "| bits | group size | method | group ranges | desc_act | sym | layout | damp | calibration | "
        "vLLM-compatible |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {g['bits']} | {gptq['metrics']['group_size']} | {g['method']} | {ranges} | {g['desc_act']} | {g['sym']} | "
        f"{layout} | {g['damp_percent']} | "
        f"{gptq['metrics']['calibration_windows']} x {g['calib_seq_len']} tokens ({g['calib_source']}) | "
        f"{gptq['metrics']['vllm_compatible']} |", "",
        "## Training", "",
        "| steps | lr | batch | LoRA r / alpha | target modules | rows | loss first -> last |",
        "|---|---|---|---|---|---|---|",
        f"| {steps.get('steps')} | {t['lr']} | {t['batch_size']} x {t['grad_accum']} | "
        f"{t['lora_r']} / {t['lora_alpha']} | {t['target_modules']} | {steps.get('train_rows')} | "
        f"{loss(steps, 'first_loss')} -> {loss(steps, 'final_loss')} |", "",
        (f"Merge check against NF4 base + adapter, {check['mode']}: argmax agreement "
         f"{check['argmax_agreement']:.4f}, mean |dlogit| {check['mean_abs_logit_diff']:.2e}." if check else ""), "",
        "## Evaluation", "", table, "", *report.notes(bench), "", *report.serving(served, {}), "",
    ]
    return "\n".join(lines)


def write(cfg: Config, exp: Path) -> Path | None:
    """Write `<exp>/gptq/README.md` if the experiment has a GPTQ checkpoint."""
    if read_manifest(exp / "gptq") is None or read_manifest(exp / "train") is None:
        return None
    path = exp / "gptq" / "README.md"
    report.replace(path, render(cfg, exp))
    return path


def upload_args(cfg: Config, exp: Path) -> dict:
    """What `HfApi.upload_folder` is called with."""
    return {"folder_path": str((exp / "gptq").resolve()), "repo_id": cfg.push.repo_id, "repo_type": "model",
            "ignore_patterns": UPLOAD_IGNORE, "commit_message": f"GPTQ checkpoint from pipeline ({exp.name})"}


def push(cfg: Config, exp: Path) -> str:
    """Upload the GPTQ checkpoint (with its card) to `push.repo_id`; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(cfg.push.repo_id, repo_type="model", private=cfg.push.private, exist_ok=True)
        url = api.upload_folder(**upload_args(cfg, exp))
    except Exception as err:  # offline, no token, no rights, network: whatever it is, one line that says so
        raise ConfigError(f"push.repo_id={cfg.push.repo_id!r}: the upload failed: "
                          f"{str(err).strip().splitlines()[0][:200]}") from None
    log.info("pushed %s to %s", exp / "gptq", url)
    return str(url)
