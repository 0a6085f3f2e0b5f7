"""Memory at the sizes QLoRA is for, measured on this machine: the base stage and the merge run under an address-space
cap smaller than the model's float32 copy (what the in-memory merge held), the base stage in less than half the
model's 16-bit weights (what it loaded whole before it streamed), and scripts/bench_memory.py measures every stage's
peak as the model grows; what a stage frees is given back before the next one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.artifacts import read_manifest


# The capped base stage and merge: a Llama of TinyLlama's width, deep enough that its float32 copy (what the in-memory merge
# held) is larger than the address space the merge may use (the imports alone take some 2.4 GB of it; the merge
# peaked at 2.7 GB here). MALLOC_ARENA_MAX=1: glibc's per-thread arenas reserve 64 MB of address space each
# without using it.
CAP_BYTES = 3_500_000_000
BIG = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 32,
       "num_key_value_heads": 4}
QUICK = ["train.max_steps=1", "train.batch_size=1", "train.save_steps=1", "train.logging_steps=1",
         "data.builtin_examples=40", "data.heldout_examples=4", "data.max_seq_len=48", "merge.probe_examples=2",
         "merge.max_shard_size=200MB"]


def test_base_and_merge_run_in_less_memory_than_the_model_takes(tiny_model_dir, tmp_path):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.update(BIG)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    float32_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert float32_bytes > CAP_BYTES
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "model")
    del model

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_ARENA_MAX": "1"}
    args = [sys.executable, "-m", "pipeline", f"model.name_or_path={tmp_path / 'model'}",
            f"output_dir={tmp_path / 'out'}", *QUICK]
    based = subprocess.run(["prlimit", f"--as={CAP_BYTES}", *args, "stage=base"], capture_output=True, text=True,
                           timeout=900, env=env)
    assert based.returncode == 0, based.stderr[-3000:]
    base = read_manifest(tmp_path / "out" / "default" / "base")
    sixteen_bit = base["metrics"]["sixteen_bit_memory_bytes"]  # what the base stage loaded whole before it streamed
    assert base["peak_memory"]["host_rss_bytes"] < 0.5 * sixteen_bit < CAP_BYTES, base["peak_memory"]
    trained = subprocess.run([*args, "stage=train"], capture_output=True, text=True, timeout=900, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    merged = subprocess.run(["prlimit", f"--as={CAP_BYTES}", *args, "stage=merge"], capture_output=True, text=True,
                            timeout=900, env=env)
    assert merged.returncode == 0, merged.stderr[-3000:]

    manifest = read_manifest(tmp_path / "out" / "default" / "merge")
    assert manifest["peak_memory"]["host_rss_bytes"] < CAP_BYTES < float32_bytes
    assert manifest["peak_memory"]["host_rss_bytes"] < 0.5 * float32_bytes, manifest["peak_memory"]
    assert manifest["metrics"]["check"]["argmax_agreement"] == 1.0, manifest["metrics"]
    with safe_open(tmp_path / "model" / "model.safetensors", "pt") as source:
        weights = set(source.keys())
    index = json.loads((tmp_path / "out" / "default" / "merge" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == weights and len(set(index["weight_map"].values())) > 5


def test_bench_memory_writes_peaks_per_stage_and_size(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_memory.py"
    # Layers of 3M parameters, so the 12.6M between the two depths stand out from allocator noise (under 1 MB): a
    # base stage that held the whole model (2.75 bytes per parameter before it streamed) would grow by 35 MB.
    done = subprocess.run([sys.executable, str(script), "--width", "512", "--intermediate", "1536", "--heads", "8",
                           "--kv-heads", "2", "--depths", "1", "5", "--stages", "base", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_memory.json").read_text())
    assert [m["depth"] for m in result["models"]] == [1, 5] and result["stages"] == ["base"]
    small, large = result["models"]
    assert large["params"] > small["params"] > 0
    for model in result["models"]:
        measured = model["stages"]["base"]
        assert 2**28 < measured["peak_rss_bytes"] < 2**33 and measured["seconds"] > 0, measured
    growth = large["stages"]["base"]["peak_rss_bytes"] - small["stages"]["base"]["peak_rss_bytes"]
    assert result["bytes_per_extra_param"] == {"base": growth / (large["params"] - small["params"])}
    assert abs(result["bytes_per_extra_param"]["base"]) < 1.0, result["bytes_per_extra_param"]  # streams: about 0
    assert (tmp_path / "bench_memory.png").stat().st_size > 5000


FRAGMENTED_HEAP = """
import torch
from pipeline import memory

def rss():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))

memory.return_freed_memory()  # as the merge sets it: 256 KiB blocks come from the heap
freed, kept = [], []
for _ in range(2000):  # 500 MiB freed below 2000 small tensors still in use, so the heap cannot just shrink
    freed.append(torch.ones(64 * 1024))
    kept.append(torch.ones(16))
del freed
before = rss()
memory.release_freed_heap()
print(before, rss())
"""


def test_freed_heap_is_given_back_between_stages():
    """What a stage freed is given back before the next stage (the runner calls release_freed_heap after each):
    glibc keeps freed heap blocks resident, which in stage=all the next stage counted in its own peak."""
    done = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = map(int, done.stdout.split())
    assert before - after > 400 * 2**20, (before, after)  # of the 500 MiB freed
