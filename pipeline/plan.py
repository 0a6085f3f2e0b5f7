"""The plan: before any model is loaded, each stage's predicted peak memory against what the machine has, and its
predicted time (pipeline/timing.py).

The model's shapes come from its config on the meta device (no weights read); the machine's room from
memory.budgets (each visible GPU's free memory; the host memory this process may really use: available memory,
cgroup limit, RLIMIT_AS/RLIMIT_DATA). A stage runs on the GPU when there is one (its peak there is its device
allocations; its host peak is the process's resident set) and on the host otherwise.

Each prediction is the sum of a few named terms (weights in the stage's format, the largest tensor the stage holds
whole, LoRA and optimizer state, activations, logits) and the stage's import floor. The constants were fitted on
this CPU to the measured peaks of the tiny test models, the embedded default and scripts/bench_memory.py's 0.28B,
0.45B and 0.81B Llamas (docs/memory.md has the table); each manifest records predicted beside measured peaks.
"""
from __future__ import annotations

import dataclasses

from . import compute, distributed, timing
from .config import Config, ConfigError, imatrix_used

GIB = 2**30
# The process with the stage's libraries imported, before any model: the tiny models' measured peaks (their
# weights are a few MB). Imports stay, so in one process a stage starts from the highest floor before it.
FLOOR = {"base": 0.6 * GIB, "train": 0.7 * GIB, "merge": 0.65 * GIB, "gptq": 0.75 * GIB, "gguf": 0.7 * GIB,
         "eval": 0.75 * GIB,
         "bench": 0.95 * GIB, "serve": 0.65 * GIB}  # bench: torch.compile's workers
VLLM_FLOOR = 2.2 * GIB  # vLLM's server and engine processes before weights and KV cache (their VmHWM, summed)
NF4_BYTES = 0.52  # per 4-bit parameter: 4 bits, an fp8 absmax per 64 and its fp32 scales (double quant)
ADAM_BYTES = 16  # per trained (LoRA) parameter: fp32 weight, gradient and two Adam moments
ACTIVATION_BYTES = 20  # per token x hidden unit x layer kept for the backward pass without checkpointing (bf16)
# llama.cpp's types, bytes per parameter (their block sizes; the K-quant mixes as llama-quantize writes them)
GGUF_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 1.0625, "q6_k": 0.82, "q5_k_m": 0.71, "q5_k_s": 0.69,
              "q4_k_m": 0.61, "q4_k_s": 0.57, "q4_0": 0.5625, "q3_k_m": 0.49, "q2_k": 0.33}


@dataclasses.dataclass
class Shape:
    """What sets a model's memory, from its config on the meta device."""
    params: int  # every parameter, tied ones once
    linear: int  # parameters of the decoder layers' linear modules (what NF4, LoRA and GPTQ change)
    layer: int  # parameters of one decoder layer
    embedding: int  # input embedding, plus the LM head when it is not tied
    largest: int  # the largest tensor (what the base stage holds at once)
    lora: int  # LoRA parameters at train.lora_r on train.target_modules
    hidden: int
    vocab: int
    layers: int
    largest_input: int  # the widest input of a linear module (a GPTQ Hessian is its square, in fp32)
    kv_bytes_per_token: int  # K and V of every layer, in 16 bits
    modules: int  # the decoder layers' linear modules (what GPTQ quantizes one by one)
    inputs_squared: int  # their inputs squared, summed (a Hessian's entries)
    solver_flops: int  # their inputs squared times outputs, summed (GPTQ's solve)


def shape(cfg: Config) -> Shape:
    import torch

    from .models import meta_model_of, source_config

    config = source_config(cfg.model)
    model = meta_model_of(config, cfg.model.trust_remote_code)
    # The decoder layers: a causal LM's first ModuleList (model.layers, gpt_neox.layers, transformer.h...)
    blocks = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))
    linears = [(name, m) for block in blocks for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = cfg.train.target_modules
    lora = sum(cfg.train.lora_r * (m.in_features + m.out_features) for name, m in linears
               if targets == "all-linear" or name.split(".")[-1] in targets)
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return Shape(params=sum(p.numel() for p in model.parameters()), linear=sum(m.weight.numel() for _, m in linears),
                 layer=sum(p.numel() for p in blocks[0].parameters()),
                 embedding=embed.weight.numel() + (0 if tied or head is None else head.weight.numel()),
                 largest=max(p.numel() for p in model.parameters()),
                 lora=lora, hidden=text.hidden_size, vocab=text.vocab_size, layers=len(blocks),
                 largest_input=max(m.in_features for _, m in linears),
                 kv_bytes_per_token=2 * len(blocks) * kv_heads * head_dim * 2, modules=len(linears),
                 inputs_squared=sum(m.in_features ** 2 for _, m in linears),
                 solver_flops=sum(m.in_features ** 2 * m.out_features for _, m in linears))


@dataclasses.dataclass
class Row:
    stage: str
    where: str  # "cuda:0", "cpu"...
    predicted: int  # peak bytes where the stage's weights live
    available: int
    terms: dict  # name -> bytes: why it is that much
    fix: str  # the keys that make it smaller
    seconds: dict  # name -> seconds: how long it takes (pipeline/timing.py)

    @property
    def fits(self) -> bool:
        return self.predicted <= self.available


def sixteen_bit(s: Shape, width: int = 2) -> int:
    """A model's weights in 16 bits, or `width` bytes a parameter (a 16-bit checkpoint computing in float32)."""
    return width * s.params


def four_bit(s: Shape, bytes_per_param: float = NF4_BYTES, width: int = 2) -> int:
    """A model with its decoder layers' linear weights in 4 bits and the rest (embeddings, norms) in 16 bits, or
    `width` bytes a parameter (loaded computing in float32)."""
    return int(bytes_per_param * s.linear + width * (s.params - s.linear))


def logits(tokens: int, s: Shape) -> int:
    return 4 * tokens * s.vocab  # fp32


def gptq_bytes_per_param(cfg: Config) -> float:
    group = cfg.gptq.group_size or 128  # null: chosen per model, 128 where it divides the layers' inputs
    return cfg.gptq.bits / 8 + 4 / (group if group > 0 else 4096)  # codes, a 16-bit scale and zero per group


def loading(weights: int, on_gpu: bool) -> dict:
    """On CPU, a checkpoint's file pages stay mapped (and resident) beside the weights copied out of them: measured
    on the 0.81B Llama's eval, 6.06 GiB against 4.50 predicted without this term."""
    return {} if on_gpu else {"its checkpoint, mapped while loading": weights}


def largest_artifact(artifacts: list[str], s: Shape, width: int, on_gpu: bool) -> dict:
    """Eval's and bench's largest artifact, one at a time: 16-bit when base16 or merged is among them, its 16-bit
    parts loaded `width` bytes a parameter (the compute dtype's), and on CPU its checkpoint mapped while loading."""
    dense = {"base16", "merged"} & set(artifacts)
    return {"largest artifact (16-bit)": sixteen_bit(s, width) if dense else four_bit(s, width=width),
            **loading(sixteen_bit(s) if dense else four_bit(s), on_gpu)}


@dataclasses.dataclass(frozen=True)
class Launch:
    """How train runs: in how many processes (one per GPU), and whether FSDP shards the model across them."""
    processes: int = 1
    fsdp: bool = False

    @staticmethod
    def this() -> "Launch":
        """As this process was launched (accelerate launch, torchrun, a SLURM job of several tasks)."""
        return Launch(distributed.world_size(), distributed.fsdp())


def nf4_layer(s: Shape) -> int:
    """One decoder layer with its linear weights in NF4 and the rest in 16 bits."""
    linear = s.linear // s.layers
    return int(NF4_BYTES * linear + 2 * (s.layer - linear))


def train_terms(cfg: Config, s: Shape, on_gpu: bool, width: int, launch: Launch) -> dict:
    """Train's peak in one process. Each takes train.batch_size / processes rows a step. Under FSDP each GPU keeps its
    share of the NF4 weights, LoRA weights and Adam state, and gathers the whole of the layer it computes and of the
    next (prefetched); otherwise every process holds the whole model."""
    tokens = -(-cfg.train.batch_size // launch.processes) * cfg.data.max_seq_len
    activations = tokens * s.hidden * (
        2 * s.layers + ACTIVATION_BYTES if cfg.train.gradient_checkpointing else ACTIVATION_BYTES * s.layers)
    work = {"activations": activations, "logits and their gradient": 3 * logits(tokens, s)}
    if launch.fsdp:
        return {"NF4 weights, this rank's share": four_bit(s) // launch.processes,
                "two layers gathered": 2 * nf4_layer(s),
                "LoRA + Adam, this rank's share": ADAM_BYTES * s.lora // launch.processes, **work}
    terms = {"NF4 weights": four_bit(s), "LoRA + Adam": ADAM_BYTES * s.lora, **work,
             "embeddings in fp32": 2 * s.embedding}  # peft's k-bit preparation upcasts what is not 4-bit
    if not on_gpu and not cfg.train.gradient_checkpointing:
        # bitsandbytes' CPU path saves each layer's weight, dequantized to the compute dtype, for the backward
        terms["dequantized weights kept for backward"] = width * s.linear
    return terms


def stage_terms(stage: str, cfg: Config, s: Shape, on_gpu: bool, source_gguf: bool,
                launch: Launch = Launch()) -> dict:
    """The bytes a stage holds at its peak, by what holds them (the import floor is added on the host only)."""
    width = compute.dtype(cfg).itemsize  # bytes of a weight computed with: eval, bench, serve load 16-bit parts in it
    if stage == "base":  # streamed: one tensor at a time (measured flat from 0.28B to 0.81B: 0.80 GiB)
        if source_gguf:  # the GGUF's dequantized float32, the processors' copy of it, and its 16-bit cast
            return {"largest tensor, dequantized and cast": 10 * s.largest}
        # on a GPU, its allocator's peak: 9 bytes a parameter of the largest tensor (an H200: 0.10 GiB for 11.5M)
        return {"largest tensor, read and quantized": int((9 if on_gpu else 2.5) * s.largest)}
    if stage == "train":
        return train_terms(cfg, s, on_gpu, width, launch)
    if stage == "merge":  # streamed: a layer (or the embedding) at a time, in fp32, plus what peft's layers hold
        return {"largest layer in fp32, merged and written": 12 * max(s.layer, s.embedding),
                "probe logits, reference and merged": 2 * logits(cfg.merge.probe_examples * cfg.data.max_seq_len, s),
                "rest": int(0.13 * s.params)}
    if stage == "gptq":  # GPTQModel: a layer at a time, finished layers offloaded to disk
        from .config import checkpoint_format

        # GPTQModel's own: measured, the default model's gptq held 0.5 GiB more than these terms without it
        return {"GPTQModel's buffers": GIB // 4, "embedding in fp32": 4 * s.embedding,
                "one layer, 16-bit and fp32": 6 * s.layer,
                "Hessians of a module group": 2 * 4 * s.largest_input ** 2,
                "calibration activations": 2 * 4 * cfg.gptq.calib_samples * cfg.gptq.calib_seq_len * s.hidden,
                "AWQ repack of the checkpoint": four_bit(s, gptq_bytes_per_param(cfg))
                if checkpoint_format(cfg.gptq) == "awq" else 0}
    if stage == "gguf":  # transformers' reference answers, then llama.cpp's server (in a process of its own)
        largest = max(GGUF_BYTES[t] for t in cfg.gguf.types) * s.params
        server = int(largest + cfg.gguf.context * max(cfg.gguf.concurrency) * s.kv_bytes_per_token)
        g = cfg.gguf
        asks_merged = g.task_examples or g.perplexity or imatrix_used(g)
        reference = sixteen_bit(s, width) + sum(loading(sixteen_bit(s), on_gpu).values()) if asks_merged else 0
        # a file's weights read tensor by tensor into the compute dtype, then a model loaded from them
        read = int(largest + (4 + width) * s.params) if cfg.gguf.perplexity else 0
        return {"merged in transformers, a GGUF file in llama.cpp (and its KV cache) or read by transformers":
                max(reference, server, read)}
    if stage == "eval":  # one artifact at a time; the largest is 16-bit (base16, merged)
        lm_eval_batch = cfg.eval.lm_eval.batch_size if cfg.eval.lm_eval.tasks else 0
        return {**largest_artifact(cfg.eval.artifacts, s, width, on_gpu),
                "logits of a scoring batch": 4 * logits(max(lm_eval_batch, 1) * cfg.eval.ppl_seq_len, s),
                "RTN reference (as gptq)": 8 * s.embedding if "rtn" in cfg.eval.artifacts else 0}
    if stage == "bench":
        batch = max(cfg.bench.full.batch_sizes if on_gpu else cfg.bench.cpu.batch_sizes)
        tokens = cfg.bench.prompt_len + max(cfg.bench.full.new_tokens if on_gpu else cfg.bench.cpu.new_tokens)
        from .stages.bench import compiled_artifacts

        return {**largest_artifact(cfg.bench.artifacts, s, width, on_gpu),
                "KV cache": batch * tokens * s.kv_bytes_per_token,
                "prefill logits": logits(batch * cfg.bench.prompt_len, s),
                # measured on the default model on CPU: compiling the merged model's decoding step took 0.5 GiB in
                # bfloat16; not twice that in float32 (its bench: 1.76 GiB measured, 2.19 predicted with this term)
                "torch.compile": 2 * sixteen_bit(s) if compiled_artifacts(cfg) else 0}
    if stage == "serve":  # transformers' answers from the checkpoint (this process), and the vLLM server
        checkpoint = four_bit(s, gptq_bytes_per_param(cfg))
        terms = {"checkpoint in transformers": four_bit(s, gptq_bytes_per_param(cfg), width),
                 **loading(checkpoint, on_gpu)}
        if on_gpu:  # vLLM takes gpu_memory_utilization of the card; what matters is that the weights fit
            return {**terms, "checkpoint in vLLM": checkpoint}
        return {**terms, "vLLM server": int(VLLM_FLOOR) + checkpoint + cfg.serve.cpu_kv_cache_gb * GIB}
    raise ValueError(stage)


FIXES = {"base": "a machine with more memory", "train": "train.batch_size, data.max_seq_len, "
         "train.gradient_checkpointing=true, train.lora_r", "merge": "a machine with more memory",
         "gptq": "gptq.calib_samples, gptq.calib_seq_len", "gguf": "gguf.perplexity=false, gguf.types, gguf.context",
         "eval": "eval.artifacts without base16 and merged, "
         "eval.lm_eval.batch_size", "bench": "bench.artifacts without base16 and merged, "
         "bench.cpu.batch_sizes / bench.full.batch_sizes", "serve": "serve.cpu_kv_cache_gb, serve.enabled=false"}


FSDP = ("FSDP over the GPUs: accelerate launch --config_file conf/accelerate/fsdp_qlora.yaml --num_processes N "
        "-m pipeline stage=train base.quant_storage=bfloat16")


def train_fix(s: Shape, available: int, launch: Launch) -> str:
    """What makes train fit: its own keys, and FSDP where the NF4 weights alone fill one GPU."""
    if launch.fsdp or four_bit(s) < available / 2:
        return FIXES["train"]
    return f"{FIXES['train']}, or shard the NF4 weights ({four_bit(s) / GIB:.1f} GiB) with {FSDP}"


def rows(cfg: Config, stages: list[str], s: Shape, budgets: dict, rates: timing.Rates, typical: timing.Chats,
         cached: set[str] = frozenset(), launch: Launch = Launch()) -> list[Row]:
    """The plan's rows. Train runs as `launch` says (in each of its processes, on a GPU of its own); the other stages
    run in one process (under a multi-process launch, rank 0 carries on alone after training)."""
    from .models import gguf_file
    from .stages.serve import unservable

    gpus = [key for key in budgets if key != "cpu"]
    on_gpu = bool(gpus)
    where = "cuda:0" if on_gpu else "cpu"
    available = budgets[0] if on_gpu else budgets["cpu"]
    gguf = gguf_file(cfg.model.name_or_path) is not None
    planned, floor = [], 0.0
    for stage in stages:
        if stage == "serve" and unservable(cfg) or stage == "gguf" and cfg.stage == "all" and not cfg.gguf.enabled:
            continue  # the runner says why when it comes to it
        terms = stage_terms(stage, cfg, s, on_gpu, gguf, launch)
        if stage not in cached:  # a cached stage does not run in this process: it imports nothing here
            floor = max(floor, FLOOR[stage])
        if not on_gpu or stage in ("merge", "gptq", "gguf"):  # on the host whatever the device (llama.cpp's CPU build)
            terms = {"libraries": int(max(floor, FLOOR[stage])), **terms}
        place, room = ("cpu", budgets["cpu"]) if stage in ("merge", "gptq", "gguf") and on_gpu else (where, available)
        if stage == "train" and launch.processes > 1:
            place = f"{'FSDP' if launch.fsdp else 'DDP'} x{launch.processes}, each {where}"
        need = sum(terms.values())
        if stage in ("eval", "bench") and on_gpu and need > room:  # the artifact spreads over GPUs, then CPU
            place, room = f"cuda:0-{len(gpus) - 1}", sum(budgets[g] for g in gpus)
            if need > room:
                place, room = place + " + cpu offload", room + budgets["cpu"]
        fix = train_fix(s, available, launch) if stage == "train" and on_gpu else FIXES[stage]
        planned.append(Row(stage, place, need, room, terms, fix,
                           timing.stage_terms(stage, cfg, s, rates, typical, gguf)))
    return planned


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.1f} min" if seconds < 6000 else \
        f"{seconds / 3600:.1f} h"


def table(planned: list[Row], cached: set[str], host_limit: str, computing: str) -> str:
    lines = [f"{'stage':<6} {'runs on':<22} {'predicted':>10} {'available':>10} {'time':>9}",
             f"{'-' * 6} {'-' * 22} {'-' * 10} {'-' * 10} {'-' * 9}"]
    for row in planned:
        mark = " cached" if row.stage in cached else "" if row.fits else "  DOES NOT FIT"
        lines.append(f"{row.stage:<6} {row.where:<22} {row.predicted / GIB:>8.2f} G {row.available / GIB:>8.2f} G"
                     f" {'-' if row.stage in cached else duration(sum(row.seconds.values())):>9}{mark}")
    to_run = sum(sum(row.seconds.values()) for row in planned if row.stage not in cached)
    lines.append(f"(peaks and times predicted from the model's shapes and this machine's matmul rate, see "
                 f"docs/memory.md; {computing}; host memory: {host_limit}; about {duration(to_run)} to run)")
    return "\n".join(lines)


def make(cfg: Config, stages: list[str], cached: set[str]) -> tuple[list[Row], str]:
    """The plan of these stages on this machine (cached ones are shown, not run), and the table that shows it."""
    from . import memory

    # The machine's room, not memory.max_memory: that caps where eval and bench put an artifact's weights (what
    # does not fit goes to the next device or to disk), not what the process may hold.
    budgets = memory.budgets({}, cfg.memory.headroom)
    host_limit = f"{memory.host_budget()[1]}, less memory.headroom"
    planned = rows(cfg, stages, shape(cfg), budgets, timing.machine_rates(cfg), timing.chats(cfg), cached,
                   Launch.this())
    return planned, table(planned, cached, host_limit, compute.why(cfg))


def refuse_misfits(planned: list[Row], cached: set[str]) -> None:
    """Stop before any model loads when a stage cannot fit: one line, the numbers, the keys that change them."""
    for row in planned:
        if not row.fits and row.stage not in cached:
            biggest = max(row.terms, key=row.terms.get)
            raise ConfigError(
                f"memory plan: stage {row.stage} needs about {row.predicted / GIB:.2f} GiB on {row.where} (largest: "
                f"{biggest}, {row.terms[biggest] / GIB:.2f} GiB) and {row.available / GIB:.2f} GiB is available; "
                f"change {row.fix} (plan=true shows the whole plan)")


def predicted_bytes(row: Row) -> dict:
    return {"where": row.where, "bytes": row.predicted, "available_bytes": row.available,
            "terms": {name: int(value) for name, value in row.terms.items()}}


def predicted_seconds(row: Row) -> dict:
    return {"seconds": round(sum(row.seconds.values()), 1), "terms": row.seconds}

