"""Peak memory of a stage, measured: the process's resident set (host) and, on a GPU, the device's allocations."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import resource
from pathlib import Path

import torch


_host_peak_reset = False  # whether the kernel's high-water mark was reset (else it counts from the process's start)


def _reset() -> None:
    """Reset the peaks: the kernel's high-water mark of this process's resident set (Linux: clear_refs 5), and
    torch's on a GPU."""
    global _host_peak_reset
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _host_peak_reset = True
    except OSError:
        _host_peak_reset = False
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _status_bytes(field: str, pid: int | str = "self") -> int:
    """A size from a process's /proc status (VmRSS, VmHWM, VmSize, VmData), in bytes; 0 if it has none."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _host_peak() -> int:
    if _host_peak_reset:
        return _status_bytes("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB since the process started


_open_meters: list[dict[str, int]] = []  # the `peak` blocks running now, outermost first


def _fold_peaks() -> None:
    """Fold the peaks since the last reset into every open meter: before a nested meter resets them, and when one
    ends, so that an inner block's reset never hides an outer block's peak."""
    readings = {"host_rss_bytes": _host_peak()}
    if torch.cuda.is_available():
        readings["device_bytes"] = torch.cuda.max_memory_allocated()
    for meter in _open_meters:
        for key, value in readings.items():
            meter[key] = max(meter.get(key, 0), value)


@contextlib.contextmanager
def peak():
    """Fills the yielded dict with the peaks while the block ran: `host_rss_bytes` (what was already resident
    counts too, as in /usr/bin/time) and, on a GPU, `device_bytes` (torch's allocations on this process's GPU).
    Memory of child processes (the vLLM server) is not counted. Blocks nest: the one meter of a stage, and of each
    generation bench measures inside it."""
    _fold_peaks()
    _reset()
    measured: dict[str, int] = {}
    _open_meters.append(measured)
    try:
        yield measured
    finally:
        _fold_peaks()
        _open_meters.pop()  # this block's (blocks end in the order opposite to their start; equal dicts compare equal)


def described(peaks: dict[str, int]) -> str:
    """A `peak` dict in words: "host_rss 1.50 GiB, device 0.80 GiB"."""
    return ", ".join(f"{key.removesuffix('_bytes')} {value / 2**30:.2f} GiB" for key, value in peaks.items())


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
    `stage=all` against 1.29 alone. No-op off glibc. On a GPU, torch's cached blocks go back to the device too, so
    that what reads its free memory next (eval's and bench's placement) sees them free."""
    gc.collect()  # what only reference cycles hold is freed first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 `memory.max`, v1 `hierarchical_memory_limit`, which takes the
    parents' limits into account), as a SLURM job's --mem sets it; None when unlimited or unknown."""
    limits = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: the limits of this group and every group above it
            group = Path("/sys/fs/cgroup") / path.lstrip("/")
            for folder in [group, *group.parents]:
                value = folder / "memory.max"
                if value.is_file() and value.read_text().strip() != "max":
                    limits.append(int(value.read_text()))
                if folder == Path("/sys/fs/cgroup"):
                    break
        elif "memory" in controllers.split(","):
            stat = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.stat"
            if stat.is_file():
                for entry in stat.read_text().splitlines():
                    if entry.startswith("hierarchical_memory_limit "):
                        limits.append(int(entry.split()[1]))
    limits = [limit for limit in limits if limit < 2**60]  # "no limit" reads as about 2**63
    return min(limits) if limits else None


def host_budget() -> tuple[int, str]:
    """How many bytes this process may hold resident, and what sets that: the least of the memory the kernel says
    is available (plus what this process holds already), the cgroup limit, and the room left under RLIMIT_AS and
    RLIMIT_DATA (a limit on address space: what this process maps from now on, counted as resident)."""
    resident = _status_bytes("VmRSS")
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    candidates = [(int(meminfo["MemAvailable"].split()[0]) * 1024 + resident, "available memory")]
    cgroup = _cgroup_limit()
    if cgroup is not None:
        candidates.append((cgroup, "cgroup memory limit"))
    for limit, field, name in ((resource.RLIMIT_AS, "VmSize", "RLIMIT_AS"), (resource.RLIMIT_DATA, "VmData",
                                                                              "RLIMIT_DATA")):
        soft, _ = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY:
            candidates.append((resident + max(soft - _status_bytes(field), 0), name))
    return min(candidates)


def gpu_free() -> list[int]:
    """Free bytes on each visible GPU."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def budgets(max_memory: dict | None, headroom: float) -> dict:
    """What each device may hold, in accelerate's max_memory form ({0: bytes, 1: bytes, "cpu": bytes}): the sizes
    `memory.max_memory` names, else what is free less the headroom."""
    from .config import shard_bytes

    named = {("cpu" if str(key) == "cpu" else int(key)): shard_bytes(size) for key, size in (max_memory or {}).items()}
    found = {i: int(free * (1 - headroom)) for i, free in enumerate(gpu_free())}
    found["cpu"] = int(host_budget()[0] * (1 - headroom))
    return {**found, **named}


def process_tree_peak(pid: int) -> int:
    """The peak resident sets (VmHWM) of a process and of every process under it, summed: a child server's memory,
    which `peak` does not count. An upper bound on what they held at once."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(OSError):  # ended meanwhile
            total += _status_bytes("VmHWM", process.pid)
    return total
