"""Peak memory of each stage as the model grows: random Llama models of one width and several depths (so the
model grows and a layer does not), each stage run alone as a user runs it (`python -m pipeline stage=X`, the
earlier stages cached), its peak read from the stage's manifest (`peak_memory`, measured by the pipeline; serve adds
the vLLM server's), beside the memory plan's prediction (`predicted_peak_memory`).

    python scripts/bench_memory.py                       # width 2048 (TinyLlama's shape), depths 4, 8, 16
    python scripts/bench_memory.py --depths 4 16 --stages merge
    python scripts/bench_memory.py --depths 4 16 --stages eval serve   # the plan's prediction there too

Writes <out>/bench_memory.json (per model and stage: parameters, peak host RSS, seconds; per stage: the extra
peak memory per extra parameter between the smallest and the largest model; predicted / measured) and
<out>/bench_memory.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.config import STAGES
from pipeline.runner import stages_for

DEFAULT_STAGES = ("base", "train", "merge", "gptq")
# Small settings, so that the stages' own work is small next to the weights: the benchmark measures what grows
# with the model.
SMALL = ["train.max_steps=2", "train.batch_size=1", "train.save_steps=2", "train.logging_steps=1",
         "data.builtin_examples=64", "data.heldout_examples=8", "data.max_seq_len=64", "merge.probe_examples=2",
         "gptq.calib_samples=4", "gptq.calib_seq_len=64", "gptq.batch_size=1", "eval.ppl_windows=2",
         "eval.task_examples=8", "eval.lm_eval.limit=8", "serve.task_examples=4", "serve.requests=4",
         "serve.concurrency=[1,4]"]


def build_model(out: Path, width: int, depth: int, intermediate: int, heads: int, kv_heads: int) -> int:
    """A random Llama in bf16 with the embedded default model's tokenizer, saved to `out`; returns its size."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.config import DEFAULT_MODEL
    from pipeline.models import gguf_file

    gguf = gguf_file(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=intermediate,
                         num_hidden_layers=depth, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def run_stage(stage: str, model: Path, output_dir: Path, extra: list[str]) -> dict:
    args = [sys.executable, "-m", "pipeline", f"stage={stage}", f"model.name_or_path={model}",
            f"output_dir={output_dir}", *SMALL, *extra]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"{' '.join(args[2:])} failed:\n{done.stderr[-3000:]}")
    manifest = json.loads((output_dir / "default" / stage / "manifest.json").read_text())
    server = manifest["metrics"].get("server_peak_rss_bytes", 0) if stage == "serve" else 0  # vLLM's processes
    predicted = (manifest.get("predicted_peak_memory") or {}).get("bytes")
    peak = manifest["peak_memory"]["host_rss_bytes"] + server
    return {"peak_rss_bytes": peak, "peak_device_bytes": manifest["peak_memory"].get("device_bytes"),
            "seconds": manifest["seconds"], "predicted_bytes": predicted,
            "predicted_over_measured": predicted / peak if predicted else None}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    params = [m["params"] / 1e9 for m in result["models"]]
    for stage in result["stages"]:
        ax.plot(params, [m["stages"][stage]["peak_rss_bytes"] / 2**30 for m in result["models"]], marker="o",
                label=f"{stage} ({result['bytes_per_extra_param'][stage]:.2f} B/param)")
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("peak host RSS (GiB)")
    ax.set_title(f"Peak memory per stage, random Llama, width {result['width']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--stages", nargs="+", default=list(DEFAULT_STAGES), choices=STAGES)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_memory"))
    parser.add_argument("overrides", nargs="*", help="more pipeline overrides, e.g. merge.max_shard_size=500MB")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"width": args.width, "intermediate": args.intermediate, "stages": args.stages,
              "overrides": SMALL + args.overrides, "models": []}
    for depth in sorted(args.depths):
        model = args.out / "models" / f"w{args.width}-d{depth}"
        params = build_model(model, args.width, depth, args.intermediate, args.heads, args.kv_heads)
        stages = {}
        needed = {up for stage in args.stages for up in stages_for(stage)}
        for stage in [s for s in STAGES if s in needed]:  # each in a process of its own, the earlier ones cached
            measured = run_stage(stage, model, args.out / "runs" / f"d{depth}", args.overrides)
            if stage in args.stages:
                stages[stage] = measured
                print(f"depth {depth} ({params / 1e9:.2f}B params): {stage} peak "
                      f"{measured['peak_rss_bytes'] / 2**30:.2f} GiB in {measured['seconds']:.0f} s (predicted "
                      f"{(measured['predicted_bytes'] or 0) / 2**30:.2f} GiB)", flush=True)
        result["models"].append({"depth": depth, "params": params, "stages": stages})
    small, large = result["models"][0], result["models"][-1]
    result["bytes_per_extra_param"] = {
        stage: (large["stages"][stage]["peak_rss_bytes"] - small["stages"][stage]["peak_rss_bytes"])
        / max(large["params"] - small["params"], 1) for stage in args.stages}
    (args.out / "bench_memory.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "bench_memory.png")
    print(json.dumps(result["bytes_per_extra_param"], indent=2))
    print(f"wrote {args.out / 'bench_memory.json'} and {args.out / 'bench_memory.png'}")


if __name__ == "__main__":
    main()
