"""Peak memory of a stage, measured: the process's resident set (host) and, on a GPU, the device's allocations."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import resource
from pathlib import Path

import torch


def _reset() -> bool:
    """Reset the kernel's high-water mark of this process's resident set (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _host_peak(since_reset: bool) -> int:
    if since_reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB since the process started


@contextlib.contextmanager
def peak():
    """Fills the yielded dict with the peaks while the block ran: `host_rss_bytes` (what was already resident
    counts too, as in /usr/bin/time) and, on a GPU, `device_bytes` (torch's allocations on this process's GPU).
    Memory of child processes (the vLLM server) is not counted."""
    since_reset = _reset()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    measured: dict[str, int] = {}
    try:
        yield measured
    finally:
        measured["host_rss_bytes"] = _host_peak(since_reset)
        if torch.cuda.is_available():
            measured["device_bytes"] = torch.cuda.max_memory_allocated()


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c"))


def return_freed_memory() -> None:
    """Have glibc give large freed blocks back to the OS at once. By default it raises its mmap threshold after the
    first large free (up to 32 MB), so that buffers the size of a layer's weights are carved from the heap from then
    on and stay resident after they are freed: a layer-at-a-time loop then holds more than a layer (measured on a
    0.81B Llama's merge: 2.09 GiB peak instead of 1.82). A fixed threshold turns that off. No-op off glibc."""
    try:
        _libc().mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB, fixed
    except (OSError, AttributeError, TypeError):
        pass


def release_freed_heap() -> None:
    """Give the heap's free pages back to the OS once a stage is done (glibc's malloc_trim). glibc keeps freed blocks
    below its mmap threshold for reuse, and cannot shrink a heap past a block still in use, so in `stage=all` each
    stage started with the last one's freed heap resident and counted it in its own peak: on the default model the
    train stage left 1.44 GiB (2.08 GiB resident after it, 0.64 after a trim), and the merge measured 2.85 GiB in
    `stage=all` against 1.29 alone. No-op off glibc."""
    gc.collect()  # what only reference cycles hold is freed first
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
