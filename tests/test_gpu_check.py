"""scripts/gpu_check.sh end to end in its reduced CPU mode on a tiny model: the install check, the pipeline run, the
kernel benchmark and the one table it prints and writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import TINY

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
STAGES = ("base", "train", "merge", "gptq", "eval", "bench")


def test_cpu_check_prints_the_table(tiny_model_dir, tmp_path):
    out = tmp_path / "outputs"
    result = subprocess.run([str(SCRIPT), str(out), *TINY, "bench.artifacts=[nf4,merged,gptq]",
                             "eval.artifacts=[merged,gptq]"],
                            env={**os.environ, "PYTHON": sys.executable, "MODEL": str(tiny_model_dir)},
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "no GPU: reduced CPU check (not the GPU figures)" in result.stdout
    exp = out / "gpu_check"
    check = json.loads((exp / "gpu_check.json").read_text())
    table = (exp / "gpu_check.md").read_text()
    assert table in result.stdout, "the table printed is the one written"
    assert "Mode: CPU, reduced (not the GPU figures)" in table and check["wall_s"] > 0

    assert all(check["stages"][stage]["seconds"] > 0 for stage in STAGES), check["stages"]
    assert check["stages"]["serve"] == {"not_run": "serve.enabled=false"}  # TINY turns serving off
    assert "| serve | not run: serve.enabled=false | |" in table
    assert check["serve"] == {"not_run": "serve.enabled=false"}

    speeds = {a["artifact"]: a for a in check["artifacts"]}
    assert list(speeds) == ["nf4", "merged", "gptq"]
    assert all(a["eager_tok_s"] > 0 and a["roofline"] > 0 and a["kernels"] for a in speeds.values()), speeds
    assert speeds["merged"]["compiled_tok_s"] > 0 and speeds["merged"]["compile_s"] > 0  # on CPU: merged alone
    assert speeds["nf4"]["kernels"][0].startswith("bitsandbytes Linear4bit")
    assert not speeds["gptq"]["kernels"][0].startswith(("torch", "bitsandbytes"))  # GPTQModel's kernel, named
    assert f"| gptq | {speeds['gptq']['eager_tok_s']:.1f} | - |" in table

    formats = check["bench_kernels"]["formats"]
    assert list(formats) == ["dense", "nf4", "gptq"] and check["bench_kernels"]["shape"]["hidden"] == 256
    assert all(f["decode_step_ms"] > 0 and f["decode_roofline"] > 0 for f in formats.values())
    assert "| format | kernels | decode step ms | roofline | prefill ms |" in table

    # Every goal measured, none judged: these are CPU figures at a tiny shape.
    assert len(check["goals"]) == 4 and "Goals (issue 26, on an H100):" in table
    for goal in check["goals"]:
        assert goal["value"] is not None and goal["verdict"] == "n.a. (CPU: not the GPU goal)", goal
        assert f"| {goal['goal']} | {goal['measured']} | {goal['verdict']} |" in table
