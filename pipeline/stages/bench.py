"""bench: generation speed of every artifact, written to `bench.json`.

Protocol after the HF quantization overview: a prompt of `prompt_len` tokens, `new_tokens` generated greedily,
at several batch sizes, KV cache on and off. Prefill latency (one forward pass over the prompt) and decode
throughput (the generated tokens after the first, over the time after prefill) are reported separately, as
medians over `repeats` after `warmup` runs, with their spread. Peak memory (memory.peak) is the GPU's max
allocated, or on CPU the process's peak RSS, during generation. Decode at batch 1 is also put against the memory
bandwidth roofline: tokens/s x bytes of weights read per token / measured copy bandwidth. Besides eager
generation, transformers' fast path (a static KV cache and torch.compile, `bench.compile`) at batch 1, with the
compilation timed on its own (`compile_s`), not in the decode figures.
"""
from __future__ import annotations

import itertools
import json
import logging
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from .. import compute, memory
from ..config import Config
from ..models import computes_in, device, kernel_names, load_placed, placed_on

log = logging.getLogger(__name__)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write) on this device."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device())
    dst = torch.empty_like(src)
    best = min(timed(lambda: dst.copy_(src), 1, repeats))
    return 2 * src.numel() / best


def device_facts() -> dict:
    facts = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()}
    try:
        facts["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        facts.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return facts


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: every parameter and buffer, minus the input embedding table when it
    is not tied to the LM head (a step reads one row of it)."""
    total = model.get_memory_footprint()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embedding.weight.data_ptr() != head.weight.data_ptr():
        total -= embedding.weight.numel() * embedding.weight.element_size()
    return total


def compile_config():
    """transformers' fast generation path: a static KV cache and the decoding forward compiled with torch.compile
    (transformers does it inside `generate` when given a static cache; off CUDA only when told to)."""
    from transformers.generation.configuration_utils import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True
    return config


def compiles(model) -> bool:
    """Whether transformers compiles generation for this model (it does not for quantizers it cannot compile,
    GPTQ's among them)."""
    quantizer = getattr(model, "hf_quantizer", None)
    return quantizer is None or quantizer.is_compileable


def compiled_artifacts(cfg: Config) -> list[str]:
    """bench.compile: all (every artifact), none, one artifact's name, or auto: all on a GPU, none on CPU. On CPU a
    compilation with a fresh machine's empty cache takes 45-55 s on the default, more than the whole eager decoding
    it speeds up (1.15x: CPU decode is not launch-bound)."""
    if cfg.bench.compile == "all" or (cfg.bench.compile == "auto" and torch.cuda.is_available()):
        return list(cfg.bench.artifacts)
    return [cfg.bench.compile] if cfg.bench.compile in cfg.bench.artifacts else []


def spread(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


@torch.no_grad()
def measure(model, prompt_len: int, new_tokens: int, batch: int, use_cache: bool, warmup: int, repeats: int,
            seed: int, compiled: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(100, vocab - 1, (batch, prompt_len), generator=generator).to(model.device)
    mask = torch.ones_like(prompt)
    prefill = timed(lambda: model(input_ids=prompt, attention_mask=mask, use_cache=use_cache), warmup, repeats)
    fast = {"cache_implementation": "static", "compile_config": compile_config()} if compiled else {}

    def generate(tokens: int):
        return lambda: model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=tokens,
                                      min_new_tokens=tokens, do_sample=False, use_cache=use_cache,
                                      pad_token_id=model.config.eos_token_id, **fast)
    # Compiled: the first generation compiles (timed on its own, not counted below); a static cache is sized by
    # the generation length, so the warm-up generates the full length. Eager: a short one warms the kernels.
    compile_s = timed(generate(new_tokens), 0, 1)[0] if compiled else None
    for _ in range(warmup):
        generate(new_tokens if compiled else min(new_tokens, 4))()
    with memory.peak() as peak:
        total = timed(generate(new_tokens), 0, repeats)
    prefill_s = statistics.median(prefill)
    decode_tps = [batch * (new_tokens - 1) / max(t - prefill_s, 1e-9) for t in total]
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "batch": batch, "use_cache": use_cache,
            "compiled": compiled, "compile_s": compile_s,
            "prefill_ms": {k: v * 1e3 for k, v in spread(prefill).items()},
            "decode_tok_s": spread(decode_tps), "peak_memory_bytes": peak.get("device_bytes", peak["host_rss_bytes"])}


def measure_artifact(cfg: Config, name: str, inputs: dict[str, Path], work: Path, matrix, compile_it: bool,
                     bandwidth: float) -> dict:
    """One artifact's speed over the matrix (and compiled, where asked). The model lives in this function only, so
    that it is freed before the next artifact loads."""
    b = cfg.bench
    loaded = load_placed("bench", name, inputs, cfg, work / "offload")
    if isinstance(loaded, str):
        return {"skipped": loaded}
    model, placed = loaded
    model.eval()
    per_token = weight_bytes_per_token(model)
    runs = []
    for new_tokens, batch, use_cache in itertools.product(matrix.new_tokens, matrix.batch_sizes, matrix.use_cache):
        runs.append(measure(model, b.prompt_len, new_tokens, batch, use_cache, b.warmup, b.repeats, cfg.seed))
        log.info("bench: %-6s batch %2d, %3d new tokens, cache %-5s: prefill %.1f ms, decode %.1f tok/s", name,
                 batch, new_tokens, use_cache, runs[-1]["prefill_ms"]["median"], runs[-1]["decode_tok_s"]["median"])
    # Batch 1; a static cache compiles once per generation length. Not across devices: accelerate's offload
    # hooks move weights inside the forward, which torch.compile(fullgraph=True) cannot trace.
    if compile_it and compiles(model) and placed.whole:
        for new_tokens in matrix.new_tokens:
            runs.append(measure(model, b.prompt_len, new_tokens, 1, True, b.warmup, b.repeats, cfg.seed,
                                compiled=True))
            log.info("bench: %-6s batch  1, %3d new tokens, compiled (static cache): decode %.1f tok/s "
                     "(compiled in %.1f s)", name, new_tokens, runs[-1]["decode_tok_s"]["median"],
                     runs[-1]["compile_s"])
    elif compile_it:
        log.info("bench: %s: %s; eager only", name, "transformers does not compile generation for this "
                 "quantization" if placed.whole else f"not compiled on {placed_on(model)}")
    single = [r for r in runs if r["batch"] == 1 and r["use_cache"] and not r["compiled"]]
    shutil.rmtree(work / "offload", ignore_errors=True)  # its weights offloaded to disk, if any
    return {"kernels": kernel_names(model), "placement": placed_on(model), "computed_in": computes_in(model),
            "weight_bytes_per_token": per_token, "runs": runs,
            "roofline_fraction": (single[0]["decode_tok_s"]["median"] * per_token / bandwidth) if single else None}


def run(cfg: Config, work: Path, inputs: dict[str, Path]) -> dict:
    b = cfg.bench
    matrix = b.full if b.matrix == "full" or (b.matrix == "auto" and torch.cuda.is_available()) else b.cpu
    to_compile = compiled_artifacts(cfg)
    bandwidth = memory_bandwidth()
    log.info("bench: copy bandwidth %.1f GB/s", bandwidth / 1e9)
    results = {}
    for name in b.artifacts:
        results[name] = measure_artifact(cfg, name, inputs, work, matrix, name in to_compile, bandwidth)
        memory.release_freed_heap()  # the artifact is gone (it lived in measure_artifact): the next loads in its place
    report = {"device": device_facts(), "compute": compute.record(cfg), "bandwidth_bytes_s": bandwidth,
              "matrix": {"new_tokens": list(matrix.new_tokens), "batch_sizes": list(matrix.batch_sizes),
                         "use_cache": list(matrix.use_cache)}, "artifacts": results}
    (work / "bench.json").write_text(json.dumps(report, indent=1))
    return {name: r.get("roofline_fraction") for name, r in results.items()}
