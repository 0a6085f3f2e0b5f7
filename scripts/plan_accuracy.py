"""How close the plan came: each stage's predicted time and peak memory beside what its run measured, read from an
experiment's manifests (every run records both). Writes JSON and prints a table.

    python -m pipeline                                       # any run, on any machine
    python scripts/plan_accuracy.py outputs/default --out plan_accuracy.json

A stage counts when this experiment's run built it (a cached stage's manifest keeps the prediction of the run that
built it). Timings on a shared 2-core machine move by a third from run to run: run nothing beside the pipeline.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.artifacts import read_manifest
from pipeline.config import STAGES


def accuracy(exp: Path) -> dict:
    stages = {}
    for stage in STAGES:
        manifest = read_manifest(exp / stage)
        if not manifest or not manifest.get("predicted_seconds"):
            continue
        memory = manifest.get("predicted_peak_memory") or {}
        measured_memory = manifest["peak_memory"].get("device_bytes" if memory.get("where", "cpu") != "cpu"
                                                      else "host_rss_bytes")
        if stage == "serve" and memory.get("where", "cpu") == "cpu":  # the plan counts vLLM's processes too
            measured_memory += manifest["metrics"].get("server_peak_rss_bytes", 0)
        stages[stage] = {
            "seconds": manifest["seconds"], "predicted_seconds": manifest["predicted_seconds"]["seconds"],
            "time_ratio": manifest["predicted_seconds"]["seconds"] / manifest["seconds"],
            "time_terms": manifest["predicted_seconds"]["terms"],
            "peak_bytes": measured_memory, "predicted_peak_bytes": memory.get("bytes"),
            "memory_ratio": memory["bytes"] / measured_memory if memory.get("bytes") and measured_memory else None,
            "compute": manifest.get("compute", {}).get("dtype")}
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="an experiment folder, e.g. outputs/default")
    parser.add_argument("--out", type=Path, default=Path("plan_accuracy.json"))
    args = parser.parse_args()
    stages = accuracy(args.experiment)
    args.out.write_text(json.dumps({"experiment": str(args.experiment), "stages": stages}, indent=1))
    print(f"{'stage':<6} {'seconds':>8} {'predicted':>9} {'ratio':>6} {'peak GiB':>9} {'predicted':>9} {'ratio':>6}")
    for stage, r in stages.items():
        memory = (f"{r['peak_bytes'] / 2**30:>9.2f} {r['predicted_peak_bytes'] / 2**30:>9.2f} "
                  f"{r['memory_ratio']:>6.2f}" if r["memory_ratio"] else "")
        print(f"{stage:<6} {r['seconds']:>8.1f} {r['predicted_seconds']:>9.1f} {r['time_ratio']:>6.2f} {memory}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
