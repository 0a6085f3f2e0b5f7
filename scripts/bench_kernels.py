"""Kernel speed at the sizes users deploy: decoder layers of a Llama-3-8B shape (random weights: speed does not
depend on the values) dense (in the compute dtype, `compute_dtype=auto` as the pipeline resolves it: bf16 where
the machine computes it fast), bitsandbytes NF4 and GPTQ 4-bit, timed as decode-sized (1 token) and
prefill-sized matmuls and as a whole decode step, each against the memory-bandwidth roofline. Writes JSON.

    python scripts/bench_kernels.py                      # 8B shape: 4 layers on a GPU, 2 on a CPU
    python scripts/bench_kernels.py --layers 1 --prefill 128 --out kernels.json

The model has `--layers` of the 8B's 32 decoder layers and a 1024-token vocabulary (the real 128k-token LM head
is left out), so the decode step measures the layers alone; the JSON says so. Each format loads the way the
pipeline loads it: NF4 with the base stage's settings, GPTQ (group size 128, written by GPTQModel's RTN, the same
format GPTQ writes) on the kernel `models.load_gptq` picks (Marlin on CUDA, the int4pack ATen kernel on CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipeline import compute
from pipeline.config import BaseConfig, Config, ModelConfig
from pipeline.models import bnb_config, device, kernel_names, load_causal_lm, load_gptq, load_nf4
from pipeline.stages.bench import device_facts, memory_bandwidth, sync, timed
from pipeline.stages.gptq import quantize

FORMATS = ("dense", "nf4", "gptq")


def build(args, out: Path) -> None:
    """A random bf16 Llama of the chosen shape, saved as an HF checkpoint."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=4096)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    vocab = {f"t{i}": i for i in range(1024)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), eos_token="t1",
                            pad_token="t0").save_pretrained(out)  # GPTQModel saves one with the checkpoint


def load(name: str, source: Path, gptq_dir: Path, cfg):
    """A format as the pipeline loads it, computing in the run's compute dtype."""
    if name == "gptq":
        return load_gptq(gptq_dir, compute.dtype(cfg))
    if name == "nf4":
        nf4_dir = source.with_name("nf4")
        load_causal_lm(source, ModelConfig(), "bfloat16", bnb_config(BaseConfig(), "bfloat16")).save_pretrained(nf4_dir)
        return load_nf4(nf4_dir, cfg)  # as the base stage writes it and train, eval and bench load it
    return load_causal_lm(source, ModelConfig(), compute.dtype_name(cfg))


def weight_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@torch.no_grad()
def measure(model, args, bandwidth: float, dtype: torch.dtype) -> dict:
    model.eval()
    layer = model.model.layers[0]
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear) or hasattr(m, "qweight")}
    matmuls = []
    for name, module in linears.items():
        in_features = module.in_features
        row = {"module": name, "in_features": in_features, "out_features": module.out_features,
               "weight_bytes": weight_bytes(module)}
        for tokens, key in ((1, "decode"), (args.prefill, "prefill")):
            x = torch.randn(1, tokens, in_features, dtype=dtype, device=device())
            seconds = min(timed(lambda: module(x), args.warmup, args.repeats))
            row[f"{key}_ms"] = seconds * 1e3
            row[f"{key}_tflops"] = 2 * tokens * in_features * module.out_features / seconds / 1e12
        row["decode_roofline"] = row["weight_bytes"] / (row["decode_ms"] / 1e3) / bandwidth
        matmuls.append(row)

    # A whole decode step: one new token on top of a cache of the prefill, through every layer.
    ids = torch.randint(2, 1024, (1, args.prefill), device=device())
    prefill = min(timed(lambda: model(input_ids=ids, use_cache=False), args.warmup, args.repeats))
    cache = model(input_ids=ids, use_cache=True).past_key_values
    step_bytes = sum(weight_bytes(layer) for layer in model.model.layers)
    first_len = cache.get_seq_length()

    def step():
        extra = cache.get_seq_length() - first_len
        if extra:
            cache.crop(-extra)  # the same cache length every repeat
        model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
    decode = min(timed(step, args.warmup, args.repeats))
    return {"kernels": kernel_names(model) or [f"torch Linear ({str(dtype).removeprefix('torch.')})"],
            "layer_weight_bytes": step_bytes,
            "decode_step_ms": decode * 1e3, "decode_roofline": step_bytes / decode / bandwidth,
            "prefill_ms": prefill * 1e3, "matmuls": matmuls}


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4 if cuda else 2, help="of the 8B's 32 decoder layers")
    parser.add_argument("--prefill", type=int, default=512, help="tokens of a prefill-sized matmul and of the cache")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5 if cuda else 3)
    parser.add_argument("--out", default="bench_kernels.json")
    args = parser.parse_args()

    bandwidth = memory_bandwidth()
    cfg = OmegaConf.structured(Config)
    results = {"device": device_facts(), "compute": compute.record(cfg), "bandwidth_bytes_s": bandwidth,
               "shape": {"hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
                         "kv_heads": args.kv_heads, "layers": args.layers, "vocab": 1024, "prefill": args.prefill},
               "scaled_down": f"{args.layers} decoder layers (a Llama-3-8B has 32), 1024-token vocabulary: the decode "
                              "step covers the layers only", "formats": {}}
    with tempfile.TemporaryDirectory() as tmp:
        source, gptq_dir = Path(tmp) / "bf16", Path(tmp) / "gptq"
        build(args, source)
        from gptqmodel.quantization.config import RTNConfig
        quantize(cfg, source, gptq_dir, RTNConfig(bits=4, group_size=128, sym=True,
                                                  offload_to_disk_path=str(gptq_dir / "offload")), None)
        for name in FORMATS:
            model = load(name, source, gptq_dir, cfg)
            results["formats"][name] = measure(model, args, bandwidth, compute.dtype(cfg))
            r = results["formats"][name]
            print(f"{name:5s} {', '.join(r['kernels']):32s} decode step {r['decode_step_ms']:8.2f} ms "
                  f"({r['decode_roofline']:.1%} of roofline), prefill {r['prefill_ms']:8.1f} ms", flush=True)
            del model
            sync()
    fastest = min(results["formats"], key=lambda n: results["formats"][n]["decode_step_ms"])
    results["fastest_decode"] = {"format": fastest, "kernels": results["formats"][fastest]["kernels"]}
    Path(args.out).write_text(json.dumps(results, indent=1))
    plot(results, Path(args.out).with_suffix(".png"))
    print(f"fastest decode here: {fastest} ({', '.join(results['fastest_decode']['kernels'])}); wrote {args.out}")


def plot(results: dict, path: Path) -> None:
    """Decode step time and its roofline fraction per format, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["formats"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(names, [results["formats"][n]["decode_step_ms"] for n in names], color="tab:blue")
    left.set(ylabel="ms per decode step (lower is better)", title=f"{results['shape']['layers']} layers, 8B shape")
    right.bar(names, [100 * results["formats"][n]["decode_roofline"] for n in names], color="tab:green")
    right.set(ylabel="% of memory-bandwidth roofline", title=results["device"].get("gpu") or results["device"]["cpu"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
