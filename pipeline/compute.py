"""What this machine computes fast: the one dtype every stage computes in (`compute_dtype`, resolved once per run),
and the measured matmul rates the plan predicts stage times from.

PyTorch's CPU matmul in bfloat16 is fast only through oneDNN (AVX512-BF16, AMX, or AVX-512, where oneDNN converts
to float32 inside its kernel); on a CPU with AVX2 alone it falls back to a scalar loop 250x slower than float32
(measured: 0.3 against 76 GFLOP/s), and float16 is as slow on every CPU here. So `compute_dtype=auto` is bfloat16 on
a GPU that has it (else float16) and on a CPU with oneDNN's bfloat16 path, float32 on any other CPU. What is written
to disk stays as `model.dtype` and `merge.dtype` say; what is computed follows this.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(frozen=True)
class Machine:
    """What decides the compute dtype."""
    gpu: bool
    gpu_bf16: bool  # the GPU computes bfloat16 (Ampere and later)
    cpu_bf16: bool  # PyTorch's CPU matmul takes oneDNN's bfloat16 path
    cpu_class: str  # the CPU's vector class in words: "AVX512-BF16", "AMX", "AVX-512", "AVX2"...
    hardware: str = ""  # the devices in words: "1x NVIDIA H200 (139 GiB)", "AVX512-BF16, 2 cores, 23 GiB"


def _onednn_bf16() -> bool:
    """Whether oneDNN computes bfloat16 on this CPU (it honours ONEDNN_MAX_CPU_ISA, as PyTorch's dispatch does)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def this_machine() -> Machine:
    gpu = torch.cuda.is_available()
    capability = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY
    cpu_bf16 = _onednn_bf16()
    if cpu_bf16 and torch.cpu._is_amx_tile_supported():
        cpu_class = "AMX"
    elif cpu_bf16 and torch.cpu._is_avx512_bf16_supported():
        cpu_class = "AVX512-BF16"
    elif capability.startswith("AVX512"):
        cpu_class = "AVX-512"
    else:
        cpu_class = capability
    if gpu:
        names = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} "
                 "GiB)" for i in range(torch.cuda.device_count())]
        hardware = ", ".join(f"{names.count(name)}x {name}" for name in dict.fromkeys(names))
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        hardware = f"{cpu_class}, {os.cpu_count()} cores, {total / 2**30:.0f} GiB"
    return Machine(gpu=gpu, gpu_bf16=gpu and torch.cuda.is_bf16_supported(), cpu_bf16=cpu_bf16, cpu_class=cpu_class,
                   hardware=hardware)


def resolve(requested: str, machine: Machine) -> tuple[str, str]:
    """The dtype to compute in, and why, for `compute_dtype=requested` on `machine`."""
    if requested != AUTO:
        if requested == "bfloat16" and machine.gpu and not machine.gpu_bf16:
            return "float16", "compute_dtype=bfloat16, but this GPU has no bfloat16: computing in float16"
        return requested, f"compute_dtype={requested}: computing in {requested}"
    if machine.gpu:
        if machine.gpu_bf16:
            return "bfloat16", "this GPU computes bfloat16: computing in bfloat16"
        return "float16", "this GPU has no bfloat16: computing in float16"
    if machine.cpu_bf16:
        return "bfloat16", f"this CPU computes bfloat16 fast ({machine.cpu_class}): computing in bfloat16"
    return "float32", f"this CPU has no fast bfloat16 ({machine.cpu_class}): computing in float32"


@functools.cache
def machine() -> Machine:
    """This machine, looked at once per process."""
    return this_machine()


@functools.cache
def _resolved(requested: str) -> tuple[str, str]:
    return resolve(requested, machine())


def dtype_name(cfg) -> str:
    """cfg.compute_dtype resolved on this machine (decided once per process)."""
    return _resolved(cfg.compute_dtype)[0]


def dtype(cfg) -> torch.dtype:
    return getattr(torch, dtype_name(cfg))


def why(cfg) -> str:
    """The choice in one line, for the log, the manifests and the report."""
    return _resolved(cfg.compute_dtype)[1]


def record(cfg) -> dict:
    """What a manifest and a report say of the choice."""
    return {"requested": cfg.compute_dtype, "dtype": dtype_name(cfg), "why": why(cfg),
            "cpu_class": machine().cpu_class, "hardware": machine().hardware}


# The matmul the rates are measured on: [256, 1024] x [1024, 1024], the shape of a small model's linear layer on a
# batch of tokens. Seconds at most even where a dtype is slow (0.54 GFLOP at 0.3 GFLOP/s).
RATE_SHAPE = (256, 1024, 1024)


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "pipeline" / "matmul_rates.json"


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _machine_key(device: torch.device, name: str) -> str:
    """Rates depend on the processor, what PyTorch may use of it (its dispatch limits, threads) and the dtype."""
    if device.type == "cuda":
        what = [torch.cuda.get_device_name(device)]
    else:
        what = [_cpu_name(), torch.backends.cpu.get_cpu_capability(), str(_onednn_bf16()), str(torch.get_num_threads())]
    text = "|".join([platform.node(), torch.__version__, *what, name])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _measure(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of RATE_SHAPE's matmul in `dtype` on `device`: the best of a few runs within about a second."""
    m, k, n = RATE_SHAPE
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    best, spent = once(), 0.0  # the first run warms the kernel up; a slow dtype stops after it
    while spent < 0.5 and best < 0.25:
        seconds = once()
        best, spent = min(best, seconds), spent + seconds
    return 2 * m * k * n / best


def matmul_rate(dtype: torch.dtype, device: torch.device | None = None) -> float:
    """FLOP/s of a matmul in `dtype` on `device` (this process's by default), measured once per machine and cached
    in ~/.cache/pipeline/matmul_rates.json."""
    from .models import device as this_device

    device = device or this_device()
    name = str(dtype).removeprefix("torch.")
    key, path = _machine_key(device, name), _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return cached[key]["flop_s"]
    rate = _measure(device, dtype)
    cached[key] = {"flop_s": rate, "dtype": name, "device": str(device)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cached, indent=1))
        os.replace(tmp, path)
    except OSError as err:
        log.info("matmul rates not cached (%s)", err)
    return rate
