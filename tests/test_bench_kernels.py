"""scripts/bench_kernels.py on tiny shapes: every format timed on the kernel the pipeline loads it with, sane
numbers, and the JSON the report and users read."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline.report import write as write_report

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"


def test_kernel_benchmark_on_a_tiny_shape(copy_of, tmp_path):
    exp, _ = copy_of
    out = exp / "bench_kernels.json"  # where the report finds it
    result = subprocess.run([sys.executable, str(SCRIPT), "--hidden", "256", "--intermediate", "512", "--heads", "4",
                             "--kv-heads", "2", "--layers", "1", "--prefill", "16", "--repeats", "2", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads(out.read_text())
    assert report["shape"]["layers"] == 1 and "decoder layers" in report["scaled_down"]
    assert report["bandwidth_bytes_s"] > 1e8
    formats = report["formats"]
    assert list(formats) == ["dense", "nf4", "gptq"]
    assert formats["dense"]["kernels"] == [f"torch Linear ({report['compute']['dtype']})"]
    assert formats["nf4"]["kernels"][0].startswith("bitsandbytes Linear4bit")
    assert formats["gptq"]["kernels"] and not formats["gptq"]["kernels"][0].startswith(("torch", "bitsandbytes"))
    # 4-bit layers hold about a quarter of the 16-bit bytes (an eighth of float32's)
    assert formats["gptq"]["layer_weight_bytes"] < 0.5 * formats["dense"]["layer_weight_bytes"]
    for name, r in formats.items():
        assert r["decode_step_ms"] > 0 and r["prefill_ms"] > 0 and 0 < r["decode_roofline"] < 2, name
        modules = {m["module"] for m in r["matmuls"]}
        assert {"self_attn.q_proj", "mlp.down_proj"} <= modules, name
        for m in r["matmuls"]:
            assert m["decode_ms"] > 0 and m["prefill_tflops"] > 0 and m["weight_bytes"] > 0, (name, m)
    assert report["fastest_decode"]["format"] in formats
    assert f"fastest decode here: {report['fastest_decode']['format']}" in result.stdout
    assert out.with_suffix(".png").stat().st_size > 5000

    # The experiment's report puts the kernel table and plot next to its own figures.
    write_report(exp)
    text = (exp / "report.md").read_text()
    assert "| format | kernels | decode step ms | roofline | prefill ms |" in text
    assert "| gptq | " in text and "![bench_kernels](bench_kernels.png)" in text
