"""The one table of scripts/gpu_check.sh, from a finished run's files: stage times, decode speed of every artifact
eager and compiled with its kernels and roofline fraction, scripts/bench_kernels.py's formats, serving, and the GPU
goals of issue 26 with PASS/FAIL where this run measured them. Writes gpu_check.md and gpu_check.json into the
experiment folder and prints the markdown.

    python scripts/gpu_check.py outputs/gpu_check/gpu_check [--wall-s SECONDS]
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from pipeline import memory, report
from pipeline.artifacts import read_manifest
from pipeline.config import STAGES

EIGHT_B = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8}  # bench_kernels.py's default shape
NOT_RUN = re.compile(r"\] - (\w+): not run: (.*)$")
SERVER_KERNEL = re.compile(r"Using (\w+Kernel)\b")


def not_run(exp: Path) -> dict[str, str]:
    """Why stages did not run, from the runner's log of the latest run: the runner keeps the reasons nowhere else."""
    logs = sorted((exp / "logs").glob("*.log"))
    lines = logs[-1].read_text().splitlines() if logs else []
    return dict(match.groups() for line in lines if (match := NOT_RUN.search(line)))


def stage_times(exp: Path, reasons: dict[str, str]) -> dict[str, dict]:
    times = {}
    for stage in STAGES:
        manifest = read_manifest(exp / stage)
        times[stage] = ({"seconds": manifest["seconds"], "peak_memory": manifest["peak_memory"],
                         "predicted_peak_memory": manifest.get("predicted_peak_memory")} if manifest else
                        {"not_run": reasons.get(stage, "no artifact: it failed or was not reached (see logs/)")})
    return times


def served_kernels(exp: Path) -> list[str]:
    """The linear kernels vLLM says it picked (`Using MarlinLinearKernel for ...`): serve.json does not keep them."""
    log = exp / "serve" / "server.log"
    return sorted(set(SERVER_KERNEL.findall(log.read_text(errors="replace")))) if log.is_file() else []


def speeds(exp: Path, bench: dict, served: dict) -> list[dict]:
    """Batch-1 decode of every benchmarked artifact, eager and compiled, and of the served checkpoint, as the
    report reads them."""
    def kernels(name):
        if name == report.SERVED:
            return served_kernels(exp) or ["vLLM"]
        return bench["artifacts"][name]["kernels"] or ["torch Linear (16-bit)"]
    return [{"artifact": row["artifact"], "eager_tok_s": row["decode"], "compiled_tok_s": row["compiled"],
             "compile_s": row.get("compile_s"), "roofline": row["roofline"], "kernels": kernels(row["artifact"])}
            for row in report.rows({}, bench, served)]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def goal(name: str, value: float | None, target: float, shown: str, not_here: str | None, at_most=False) -> dict:
    """A goal's verdict: PASS/FAIL where this run measures what the goal is about, else n.a. and why."""
    if value is None:
        return {"goal": name, "value": None, "measured": "-", "verdict": "n.a. (not measured)"}
    met = value <= target if at_most else value >= target
    return {"goal": name, "value": value, "measured": shown.format(value),
            "verdict": f"n.a. ({not_here})" if not_here else "PASS" if met else "FAIL"}


def goals(kernels: dict, artifacts: list[dict], on_gpu: bool, wall_s: float | None) -> list[dict]:
    formats = kernels.get("formats", {})
    step_ms = {name: formats.get(name, {}).get("decode_step_ms") for name in ("nf4", "gptq")}
    merged = next((a for a in artifacts if a["artifact"] == "merged"), {})
    off_gpu = None if on_gpu else "CPU: not the GPU goal"
    at_8b = all(kernels.get("shape", {}).get(key) == value for key, value in EIGHT_B.items())
    off_shape = off_gpu or (None if at_8b else "not the 8B layer shape")
    return [
        goal("batch-1 GPTQ decode >= 2x NF4 at the 8B layer shape (bench_kernels)",
             ratio(step_ms["nf4"], step_ms["gptq"]), 2, "{:.2f}x", off_shape),
        goal("GPTQ decode >= 50% of the bandwidth roofline at the 8B layer shape",
             formats.get("gptq", {}).get("decode_roofline"), 0.5, "{:.1%}", off_shape),
        goal("compiled decode of merged >= 5x eager (batch 1)",
             ratio(merged.get("compiled_tok_s"), merged.get("eager_tok_s")), 5, "{:.2f}x", off_gpu),
        goal("the whole check <= 10 min on an H100, install included", wall_s and wall_s / 60, 10, "{:.1f} min",
             off_gpu, at_most=True)]


def number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(exp: Path, check: dict, kernel_lines: list[str], serve_lines: list[str]) -> str:
    device = check["device"]
    if device.get("gpu"):
        mode = f"GPU, {device['gpu']} (CUDA {device['cuda']}), torch {device['torch']}"
    elif device:
        mode = (f"CPU, reduced (not the GPU figures): {device['cpu']} ({device['threads']} threads), "
                f"torch {device['torch']}")
    else:
        mode = "unknown (no bench results)"
    wall = f"; wall time {check['wall_s'] / 60:.1f} min, install included" if check["wall_s"] else ""
    lines = [f"# GPU check: {exp}", "", f"Mode: {mode}{wall}.", "",
             "| stage | seconds | peak memory | predicted by the plan |", "|---|---|---|---|"]
    for stage, t in check["stages"].items():
        if "not_run" in t:
            lines.append(f"| {stage} | not run: {t['not_run']} | | |")
        else:
            peaks = memory.described(t["peak_memory"])
            plan = t["predicted_peak_memory"]
            predicted = f"{plan['bytes'] / 2**30:.2f} GiB on {plan['where']}" if plan else "-"
            lines.append(f"| {stage} | {t['seconds']:.1f} | {peaks} | {predicted} |")
    lines += ["", f"Decode at batch 1, KV cache on ({check['new_tokens']} new tokens); compiled: static cache + "
                  "torch.compile, compilation not counted:", "",
              "| artifact | eager tok/s | compiled tok/s | compiled / eager | compile s | roofline | kernels |",
              "|---|---|---|---|---|---|---|"]
    for a in check["artifacts"]:
        speedup = ratio(a["compiled_tok_s"], a["eager_tok_s"])
        lines.append(f"| {a['artifact']} | {number(a['eager_tok_s'], '.1f')} | {number(a['compiled_tok_s'], '.1f')} "
                     f"| {number(speedup, '.2f')} | {number(a['compile_s'], '.0f')} | {number(a['roofline'], '.1%')} "
                     f"| {', '.join(a['kernels'])} |")
    shape = check["bench_kernels"]["shape"]
    if shape:  # the 8B layer shape, or the CPU check's tiny one
        lines += ["", f"scripts/bench_kernels.py measured hidden {shape['hidden']}, intermediate "
                      f"{shape['intermediate']}, {shape['heads']}/{shape['kv_heads']} heads, {shape['layers']} layers:"]
    lines += ["", *(kernel_lines or ["Kernels (scripts/bench_kernels.py): not measured."]), "", *serve_lines, "",
              "Goals (issue 26, on an H100):", "", "| goal | measured | verdict |", "|---|---|---|",
              *(f"| {g['goal']} | {g['measured']} | {g['verdict']} |" for g in check["goals"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="the run's experiment folder: <output_dir>/<experiment>")
    parser.add_argument("--wall-s", type=float, help="the whole check's wall time, for its goal")
    args = parser.parse_args()
    exp = args.experiment.resolve()

    evaluation, bench, served = report.results(exp)
    kernels = json.loads((exp / "bench_kernels.json").read_text()) if (exp / "bench_kernels.json").is_file() else {}
    reasons = not_run(exp)
    device = bench.get("device") or kernels.get("device") or {}
    artifacts = speeds(exp, bench, served)
    check = {
        "device": device, "wall_s": args.wall_s, "stages": stage_times(exp, reasons), "artifacts": artifacts,
        "new_tokens": min(bench["matrix"]["new_tokens"]) if bench else None,
        "bench_kernels": {"shape": kernels.get("shape"), "formats": {
            name: {key: r[key] for key in ("kernels", "decode_step_ms", "decode_roofline", "prefill_ms")}
            for name, r in kernels.get("formats", {}).items()}},
        "serve": ({"task_accuracy": served["task_accuracy"],
                   "output_tok_s": {level["concurrency"]: level["output_tok_s"] for level in served["load"]}}
                  if served else {"not_run": reasons.get("serve", "stage=serve did not run")}),
        "goals": goals(kernels, artifacts, bool(device.get("gpu")), args.wall_s)}
    text = markdown(exp, check, report.kernels(exp), report.serving(served, reasons))
    (exp / "gpu_check.json").write_text(json.dumps(check, indent=1))
    (exp / "gpu_check.md").write_text(text)
    print(text + f"\n(written: {exp / 'gpu_check.md'} and gpu_check.json)")


if __name__ == "__main__":
    main()
