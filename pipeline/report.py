"""The side-by-side report: `${output_dir}/${experiment}/report.md` (one table) and PNG plots next to it."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

REFERENCE = "merged"
BASE = "base16"  # general-text perplexity is also shown against the base model: how much of it the run kept
COLUMNS = ("artifact", "size MB", "params MB", "ppl", "ppl / base16", "task acc", "task sim", "prefill ms", "decode tok/s",
           "compiled tok/s", "roofline", "peak mem MB", "placement")


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _cell(value, reference, fmt: str, ratio: bool = True) -> str:
    if value is None:
        return "-"
    text = format(value, fmt)
    if ratio and reference and reference != value:
        times = value / reference
        text += f" ({times:.2f}x)" if times < 100 else f" ({times:.3g}x)"  # a base model's answer perplexity: 4e+06x
    return text


def _vs_base(ppl: float | None, base_ppl: float | None) -> str:
    return f"{ppl / base_ppl:.2f}x" if ppl and base_ppl else "-"


def _batch1(bench: dict, compiled: bool = False) -> dict | None:
    runs = [r for r in bench.get("runs", []) if r["batch"] == 1 and r["use_cache"]
            and r.get("compiled", False) == compiled]
    return min(runs, key=lambda r: r["new_tokens"]) if runs else None


SERVED = "gptq (vLLM)"


def _served_speed(levels: list[dict]) -> tuple[float | None, float | None]:
    """A server's time to first token (ms, median) and streamed output tok/s of one request at a time."""
    single = next((level for level in levels if level["concurrency"] == 1), None)
    if not single:
        return None, None
    return (single["ttft_s"]["p50"] * 1e3 if single["ttft_s"] else None), single["output_tok_s"]


def gguf_name(gguf_type: str) -> str:
    return f"gguf {gguf_type} (llama.cpp)"


def rows(evaluation: dict, bench: dict, served: dict | None = None, made: dict | None = None) -> list[dict]:
    """The table's rows: each artifact eval and bench measured, then the vLLM-served checkpoint (serve.json), then
    each GGUF file in llama.cpp's server (`made`: gguf.json)."""
    names = list(dict.fromkeys([*evaluation.get("artifacts", {}), *bench.get("artifacts", {})]))
    table = []
    for name in names:
        e = evaluation.get("artifacts", {}).get(name, {})
        b = bench.get("artifacts", {}).get(name, {})
        single, fast = _batch1(b), _batch1(b, compiled=True)
        table.append({
            "artifact": name, "size": e.get("disk_bytes"), "params": e.get("param_bytes"), "ppl": e.get("ppl"),
            "task": e.get("task_accuracy"), "similarity": e.get("task_similarity"),
            "prefill": single["prefill_ms"]["median"] if single else None,
            "decode": single["decode_tok_s"]["median"] if single else None,
            "compiled": fast["decode_tok_s"]["median"] if fast else None,
            "compile_s": fast["compile_s"] if fast else None,
            "roofline": b.get("roofline_fraction"),
            "peak": single["peak_memory_bytes"] if single else None, "placement": _placement(e, b)})
    if served:  # the deployed checkpoint: speed at concurrency 1 (time to first token, streamed output tok/s)
        gptq = next((r for r in table if r["artifact"] == "gptq"), {})
        prefill, decode = _served_speed(served["load"])
        table.append({"artifact": SERVED, "size": gptq.get("size"), "params": None, "ppl": None,
                      "task": served["task_accuracy"], "similarity": served.get("task_similarity"),
                      "prefill": prefill, "decode": decode, "compiled": None, "roofline": None,
                      "peak": None, "placement": None})
    for gguf_type, r in (made or {}).get("types", {}).items():
        prefill, decode = _served_speed(r["load"])
        table.append({"artifact": gguf_name(gguf_type), "size": r["bytes"], "params": None, "ppl": r["ppl"],
                      "task": r["task_accuracy"], "similarity": None, "prefill": prefill, "decode": decode,
                      "compiled": None, "roofline": None, "peak": None, "placement": "llama.cpp server"})
    return table


def _placement(evaluated: dict, benched: dict) -> str | None:
    """Where eval and bench ran the artifact (both named when they differ: each placed it in the memory it found)."""
    places = {stage: r.get("placement") or "skipped" for stage, r in (("eval", evaluated), ("bench", benched))
              if r.get("placement") or "skipped" in r}
    if len(set(places.values())) > 1:
        return ", ".join(f"{place} ({stage})" for stage, place in places.items())
    return next(iter(places.values()), None)


def skipped(evaluation: dict, bench: dict) -> list[str]:
    """The artifacts eval or bench did not measure, and why."""
    return [f"Not measured: {name} in {stage}: {r['skipped']}." for stage, results in (("eval", evaluation),
                                                                                       ("bench", bench))
            for name, r in results.get("artifacts", {}).items() if "skipped" in r]


def _compiled(row: dict) -> str:
    """Compiled decode tok/s, its speed-up over the same artifact's eager decode, and the compile time."""
    if not row.get("compiled"):
        return "-"
    # No eager figure to compare with when the bench matrix has no batch-1 run with the KV cache on.
    eager = f"{row['compiled'] / row['decode']:.2f}x eager, " if row["decode"] else ""
    return f"{row['compiled']:.1f} ({eager}{row['compile_s']:.0f} s compile)"


def markdown(table: list[dict]) -> str:
    ref = next((r for r in table if r["artifact"] == REFERENCE), {})
    base_ppl = next((r["ppl"] for r in table if r["artifact"] == BASE), None)
    mb = 1e6
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in table:
        def scaled(key):
            return (r[key] / mb if r[key] else None), (ref.get(key) / mb if ref.get(key) else None)
        cells = [r["artifact"], _cell(*scaled("size"), ".1f"), _cell(*scaled("params"), ".1f"),
                 _cell(r["ppl"], ref.get("ppl"), ".2f"), _vs_base(r["ppl"], base_ppl),
                 _cell(r["task"], None, ".1%", ratio=False),
                 _cell(r["similarity"], None, ".1%", ratio=False), _cell(r["prefill"], ref.get("prefill"), ".1f"),
                 _cell(r["decode"], ref.get("decode"), ".1f"),
                 _compiled(r), _cell(r["roofline"], None, ".1%", ratio=False), _cell(*scaled("peak"), ".0f"),
                 r["placement"] or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(exp: Path, evaluation: dict, bench: dict, made: dict | None = None) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written, made = [], made or {}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(exp / name, dpi=110)
        plt.close(fig)
        written.append(exp / name)

    losses = json.loads((exp / "train" / "loss.json").read_text()) if (exp / "train" / "loss.json").is_file() else []
    if losses:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, label in (("loss", "training"), ("eval_loss", "held-out")):
            points = [(e["step"], e[key]) for e in losses if key in e]
            if points:
                ax.plot(*zip(*points), marker=".", label=label)
        ax.set(xlabel="step", ylabel="loss", yscale="log", title="QLoRA training loss")
        ax.legend()
        save(fig, "train_loss.png")

    if bench.get("artifacts"):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = list(bench["artifacts"])
        batches = sorted({r["batch"] for b in bench["artifacts"].values() for r in b.get("runs", [])})
        width = 0.8 / len(batches)
        for i, batch in enumerate(batches):
            values = [max((r["decode_tok_s"]["median"] for r in bench["artifacts"][n].get("runs", [])
                           if r["batch"] == batch and r["use_cache"] and not r.get("compiled")), default=0)
                      for n in names]
            ax.bar([j + i * width for j in range(len(names))], values, width, label=f"batch {batch}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
        ax.set(ylabel="decode tokens/s", title="Generation speed (KV cache on)")
        ax.legend()
        save(fig, "decode_speed.png")

    # eval's artifacts and the GGUF files, each file's perplexity taken on eval's windows
    sized = {n: (r.get("disk_bytes"), r["ppl"]) for n, r in evaluation.get("artifacts", {}).items() if r.get("ppl")}
    sized |= {gguf_name(t): (r["bytes"], r["ppl"]) for t, r in made.get("types", {}).items() if r.get("ppl")}
    if sized:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(sized)), 3.5))
        ax.bar([n.replace(" (", "\n(") for n in sized], [ppl for _, ppl in sized.values()], color="tab:orange")
        source = evaluation.get("ppl_source")
        ax.set(ylabel="perplexity (lower is better)", title="Held-out perplexity" + (f" ({source})" if source else ""))
        save(fig, "perplexity.png")
    on_disk = {n: point for n, point in sized.items() if point[0]}
    if len(on_disk) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        # names above and below their points in turn, by size: neighbours' names would overlap otherwise
        for i, (name, (size, ppl)) in enumerate(sorted(on_disk.items(), key=lambda item: item[1][0])):
            ax.scatter(size / 1e6, ppl, marker="s" if name.startswith("gguf") else "o")
            ax.annotate(name.removesuffix(" (llama.cpp)"), (size / 1e6, ppl), textcoords="offset points",
                        xytext=(4, 5 if i % 2 == 0 else -12), fontsize=8)
        ax.margins(x=0.3)  # room for the names
        ax.set(xlabel="size on disk (MB)", ylabel="perplexity (lower is better)", title="Quality against size")
        save(fig, "quality_vs_size.png")

    histogram = evaluation.get("weight_histogram")
    if histogram:
        lo, hi = histogram["range"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name, counts in histogram["counts"].items():
            step = (hi - lo) / len(counts)
            ax.step([lo + step * (i + 0.5) for i in range(len(counts))], counts, where="mid", label=name)
        ax.set(xlabel="weight value", ylabel="count", yscale="log", title=f"Weights of {histogram['layer']}")
        ax.legend()
        save(fig, "weight_histogram.png")
    return written


def notes(bench: dict) -> list[str]:
    if not bench:
        return []
    first = next((b for b in bench["artifacts"].values() if b.get("runs")), {})
    single = _batch1(first) or {}
    device = bench["device"]
    where = device.get("gpu") or device.get("cpu")
    cuda = f", CUDA {device['cuda']}" if device.get("cuda") else ""
    return [f"Ratios in parentheses are against the {REFERENCE} 16-bit model; `ppl / base16` against the base "
            f"model in 16 bits (what a run kept of the original model's general text). Speed: batch 1, prompt "
            f"{single.get('prompt_len')} tokens, {single.get('new_tokens')} new tokens, KV cache on, median of "
            f"repeats. Compiled: transformers' static KV cache + torch.compile, batch 1, compilation not counted "
            f"(`-`: not measured, or a quantization transformers does not compile, as GPTQ). Roofline: decode tok/s "
            f"x weight bytes read per token / copy bandwidth ({bench['bandwidth_bytes_s'] / 1e9:.1f} GB/s).",
            f"Device: {where} ({device['threads']} threads{cuda}), torch {device['torch']}.", *fastest_4bit(bench)]


def computed(evaluation: dict, bench: dict) -> list[str]:
    """The dtype the measurements computed in, and why (compute_dtype, resolved on the machine that ran them)."""
    record = evaluation.get("compute") or bench.get("compute")
    return [f"Computed in {record['dtype']}: {record['why']}."] if record else []


def fastest_4bit(bench: dict) -> list[str]:
    """Which 4-bit format decodes fastest at batch 1 on this machine, and on which kernels."""
    speeds = {name: (_batch1(bench["artifacts"][name]) or {}).get("decode_tok_s", {}).get("median")
              for name in ("nf4", "gptq") if name in bench["artifacts"]}
    speeds = {name: tps for name, tps in speeds.items() if tps}
    if not speeds:
        return []
    ranked = sorted(speeds, key=speeds.get, reverse=True)
    said = [f"{name} {speeds[name]:.1f} tok/s on {', '.join(bench['artifacts'][name]['kernels']) or '-'}"
            for name in ranked]
    return [f"Fastest 4-bit decode here (batch 1): {'; then '.join(said)}."]


def replace(path: Path, text: str) -> None:
    """Write whole, then rename: runs of one experiment, or sweep points, may finish together."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def serving(served: dict, not_run: dict[str, str], made: dict | None = None) -> list[str]:
    """The deployment check: answers through vLLM against transformers', and the server under load; where vLLM did not
    serve, the GGUF files that llama.cpp's server did (`made`: gguf.json)."""
    if not served:
        why = not_run.get("serve", "stage=serve did not run")
        instead = (f" Served by llama.cpp instead: the {', '.join(gguf_name(t) for t in made['types'])} rows above"
                   " and the GGUF section below." if made and made.get("types") else "")
        return [f"Served (vLLM): not served ({why}).{instead}"]
    def share(key: str) -> str:
        return _cell(served[key], None, ".1%", ratio=False)
    layout = served["server"].get("layout")  # serve.json from before it was recorded has none
    gpus = served["server"].get("tensor_parallel_size", 1)
    lines = [f"Served (vLLM, {served['server']['vllm']}{f', {layout.upper()} layout' if layout else ''}"
             f"{f', tensor parallel over {gpus} GPUs' if gpus > 1 else ''}): task "
             f"accuracy {share('task_accuracy')} through the server "
             f"vs {share('transformers_task_accuracy')} with transformers on the same checkpoint; the answers agree "
             f"on {share('agreement_with_transformers')} of {served['task_examples']} prompts. Its row above: "
             f"prefill is the time to first token and decode the streamed output tok/s of one request at a time.",
             "",
             "| concurrency | requests | output tok/s | TTFT p50 ms | TTFT p95 ms | latency p50 s | latency p95 s |",
             "|---|---|---|---|---|---|---|"]
    for level in served["load"]:
        ttft = level["ttft_s"] or {}
        lines.append(f"| {level['concurrency']} | {level['requests']} | {level['output_tok_s']:.1f} | "
                     f"{_cell(ttft.get('p50') and ttft['p50'] * 1e3, None, '.0f')} | "
                     f"{_cell(ttft.get('p95') and ttft['p95'] * 1e3, None, '.0f')} | "
                     f"{level['latency_s']['p50']:.2f} | {level['latency_s']['p95']:.2f} |")
    return lines


def quantized_with(imatrix: dict | None) -> str:
    if not imatrix:
        return "Quantized without an importance matrix."
    return (f"Quantized with an importance matrix ({imatrix['file']}: {imatrix['entries']} weights, "
            f"{imatrix['windows']} windows of {imatrix['seq_len']} tokens of {imatrix['source']} text; q8_0 does not "
            "use it).")


def gguf_files(exp: Path, made: dict) -> list[str]:
    """The gguf stage's files in llama.cpp's server (`made`: gguf.json), beside the merged model in transformers."""
    if not made:
        return []
    tools = ", ".join(f"{name} {version}" for name, version in made["tools"].items())
    levels = [level["concurrency"] for level in next(iter(made["types"].values()))["load"]]
    lines = [f"GGUF files in llama.cpp's server ({tools}; `ollama create NAME -f Modelfile.<type>` in the gguf "
             f"folder): task accuracy through the server on {made['task_examples']} held-out prompts, against "
             f"{_cell(made['transformers_task_accuracy'], None, '.1%')} for the merged model in transformers, and how "
             f"often their answers agree; perplexity on eval's {made['ppl_windows']} windows of each file's weights "
             "as stored, computed by transformers (in parentheses: the ratio to merged), beside the gptq stage's "
             f"checkpoint. {quantized_with(made.get('imatrix'))}", "",
             "| file | size MB | ppl | task accuracy | agrees with merged | "
             + " | ".join(f"output tok/s at {c}" for c in levels) + " |",
             "|---|---|---|---|---|" + "---|" * len(levels)]
    reference = made["merged_ppl"]
    lines.append(f"| merged (transformers) | {made['merged_bytes'] / 1e6:.1f} | {_cell(reference, None, '.3f')} | "
                 f"{_cell(made['transformers_task_accuracy'], None, '.1%')} | - |" + " - |" * len(levels))
    for name, r in made["types"].items():
        lines.append(f"| {name} | {r['bytes'] / 1e6:.1f} | {_cell(r['ppl'], reference, '.3f')} | "
                     f"{_cell(r['task_accuracy'], None, '.1%')} | "
                     f"{_cell(r['agreement_with_transformers'], None, '.1%')} | "
                     + " | ".join(f"{level['output_tok_s']:.1f}" for level in r["load"]) + " |")
    gptq = _load(exp / "eval" / "eval.json").get("artifacts", {}).get("gptq")
    if gptq and gptq.get("ppl") and gptq.get("disk_bytes"):
        lines.append(f"| gptq (transformers, eval) | {gptq['disk_bytes'] / 1e6:.1f} | "
                     f"{_cell(gptq['ppl'], reference, '.3f')} | {_cell(gptq.get('task_accuracy'), None, '.1%')} | - |"
                     + " - |" * len(levels))
    return lines


def results(exp: Path) -> tuple[dict, dict, dict]:
    """The experiment's eval.json, bench.json and serve.json ({} for those it does not have)."""
    return (_load(exp / "eval" / "eval.json"), _load(exp / "bench" / "bench.json"),
            _load(exp / "serve" / "serve.json"))


def kernels(exp: Path) -> list[str]:
    """`scripts/bench_kernels.py --out <experiment>/bench_kernels.json`: the formats at a 7-8B layer shape."""
    measured = _load(exp / "bench_kernels.json")
    if not measured:
        return []
    lines = [f"Kernels at a Llama-3-8B layer shape ({measured['scaled_down']}; scripts/bench_kernels.py):", "",
             "| format | kernels | decode step ms | roofline | prefill ms |", "|---|---|---|---|---|"]
    for name, r in measured["formats"].items():
        lines.append(f"| {name} | {', '.join(r['kernels'])} | {r['decode_step_ms']:.2f} | {r['decode_roofline']:.1%} "
                     f"| {r['prefill_ms']:.1f} |")
    image = exp / "bench_kernels.png"
    return lines + (["", f"![bench_kernels]({image.name})"] if image.is_file() else [])


def lm_eval_table(evaluation: dict) -> list[str]:
    """lm-evaluation-harness scores: one row per artifact, one column per task and metric, ratios to merged."""
    scored = {name: r["lm_eval"] for name, r in evaluation.get("artifacts", {}).items() if r.get("lm_eval")}
    if not scored:
        return []
    columns = list(dict.fromkeys((task, metric) for tasks in scored.values()
                                 for task, metrics in tasks.items() for metric in metrics))
    ref = scored.get(REFERENCE, {})
    lines = ["lm-evaluation-harness (in parentheses: the ratio to merged):", "",
             "| artifact | " + " | ".join(f"{task} {metric}" for task, metric in columns) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for name, tasks in scored.items():
        cells = [_cell(tasks.get(task, {}).get(metric), ref.get(task, {}).get(metric), ".4g")
                 for task, metric in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write(exp: Path, not_run: dict[str, str] | None = None) -> str | None:
    """Write report.md and the plots from whatever eval.json / bench.json / serve.json exist; returns the table.
    `not_run` gives the stages this run could not run, and why."""
    evaluation, bench, served = results(exp)
    made = _load(exp / "gguf" / "gguf.json")
    if not evaluation and not bench and not served and not made:
        return None
    table = markdown(rows(evaluation, bench, served, made))
    images = plots(exp, evaluation, bench, made)
    text = [f"# Report: {exp.name}", "", table, "", *skipped(evaluation, bench), "", *lm_eval_table(evaluation), "",
            *notes(bench), *computed(evaluation, bench), "", *serving(served, not_run or {}, made), "",
            *gguf_files(exp, made),
            "", *kernels(exp), "",
            *[f"![{p.stem}]({p.name})" for p in images]]
    replace(exp / "report.md", "\n".join(text) + "\n")
    return table


def write_sweep(root: Path) -> str | None:
    """`<experiment>/sweep.md`: the GPTQ checkpoint of every sweep point side by side (quality, lm-eval scores,
    the gptq stage's time, speed and size), rewritten as points finish."""
    points = sorted(p for p in root.iterdir() if (p / "report.md").is_file())
    evals = {p: _load(p / "eval" / "eval.json") for p in points}
    scores = {p: e.get("artifacts", {}).get("gptq", {}).get("lm_eval", {}) for p, e in evals.items()}
    lm_columns = list(dict.fromkeys((task, metric) for tasks in scores.values()
                                    for task, metrics in tasks.items() for metric in metrics))
    lines = ["| sweep point | gptq ppl | merged ppl | gptq ppl / base16 | task acc | task sim | "
             + "".join(f"{task} {metric} | " for task, metric in lm_columns)
             + "gptq s | decode tok/s | size MB |", "|" + "---|" * (9 + len(lm_columns))]
    for point in points:
        by_name = {r["artifact"]: r for r in rows(evals[point], _load(point / "bench" / "bench.json"))}
        gptq, merged, base = by_name.get("gptq", {}), by_name.get("merged", {}), by_name.get(BASE, {})
        size = gptq.get("size") and gptq["size"] / 1e6
        seconds = _load(point / "gptq" / "manifest.json").get("seconds")
        lm = "".join(f"{_cell(scores[point].get(task, {}).get(metric), None, '.4g')} | " for task, metric in lm_columns)
        lines.append(f"| [{point.name}]({point.name}/report.md) | {_cell(gptq.get('ppl'), None, '.2f')} | "
                     f"{_cell(merged.get('ppl'), None, '.2f')} | {_vs_base(gptq.get('ppl'), base.get('ppl'))} | "
                     f"{_cell(gptq.get('task'), None, '.1%', False)} | "
                     f"{_cell(gptq.get('similarity'), None, '.1%', False)} | {lm}{_cell(seconds, None, '.0f')} | "
                     f"{_cell(gptq.get('decode'), None, '.1f')} | {_cell(size, None, '.1f')} |")
    if len(lines) == 2:
        return None
    table = "\n".join(lines)
    replace(root / "sweep.md", f"# Sweep: {root.name}\n\n{table}\n")
    return table
