"""How long each stage takes, predicted before it runs: the plan prints it beside the predicted peak memory.

Each stage's time is a sum of named terms: the FLOPs of its work (training steps and tokens, the merge's probe
passes, GPTQ's calibration passes and Hessians, eval's windows, prompts and generated tokens, bench's matrix) at
this machine's matmul rate in the run's compute dtype (pipeline/compute.py measures it once and caches it), the
per-layer cost of each forward call that FLOPs do not account for (op dispatch: what bounds decoding small models),
the per-parameter cost of reading, converting and writing weights, and the fixed cost of the libraries it drives.
The constants were fitted on 2-core CPUs of both classes (AVX512-BF16 in bfloat16, AVX2 in float32) to the tiny
test model and the embedded default; docs/memory.md has predicted beside measured, and every manifest records both.
On a GPU the same formulas run at the GPU's measured rate, unchecked against a measurement.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import IMATRIX_BATCH, Config, imatrix_used

# Seconds per FLOP of a model's passes: a / (matmul rate in the compute dtype) + b / (matmul rate in float32). The
# matmuls run in the compute dtype, below the benchmark's rate; the rest (attention, norms, activations, casts, and
# in training the float32 LoRA weights, their gradients and the optimizer) runs about as float32 matmuls would.
# Fitted on the default model: inference at 190-250 GFLOP/s in bfloat16 (AVX512-BF16) and 105-125 in float32
# (AVX2); training at 117 and 101 GFLOP/s, against benchmark rates of 415 (bfloat16) and 148-176 (float32).
SECONDS_PER_FLOP = {"inference": (1.33, 0.2), "training": (0.74, 1.0)}
# Seconds each decoder layer costs per forward call beyond its FLOPs (op dispatch and Python): 30 layers make a
# 135M model's decode step 57-93 ms on 2 CPU cores in either dtype (measured); a GPU launches kernels faster.
LAYER_CALL_S = {"cpu": 2.8e-3, "cuda": 1.5e-4}
# bitsandbytes' NF4 layers where they dequantize every weight on every call (training, and inference everywhere but
# its packed bfloat16 CPU kernel): per weight and call, and their matmuls' slowdown on the fresh weights (fitted:
# the default's NF4 decode step 149 ms against 70 ms for the merged model, its perplexity pass 1.6x, in float32).
DEQUANT_S_PER_PARAM = {"cpu": 0.7e-9, "cuda": 0.02e-9}
NF4_FLOP_FACTOR = {"cpu": 1.6, "cuda": 1.2}
LORA_MODULE_CALL_S = {"cpu": 1.5e-4, "cuda": 2e-5}  # peft's unmerged LoRA on each adapted module, per call
CHARS_PER_TOKEN = 3.5  # English-like text in a BPE vocabulary: the plan reads no tokenizer
TEMPLATE_TOKENS = 16  # a chat template's markers and default system prompt, per chat
MESSAGE_TOKENS = 4  # role markers per message


@dataclass
class Rates:
    """What the machine does per second: matmul FLOPs in the compute dtype and in float32 (GPTQ's Hessians, the
    merge), on `device` ("cpu" or "cuda"); whether bitsandbytes computes NF4 inference on its packed CPU kernel
    (AVX512-BF16 and bfloat16 compute), which dequantizes nothing per call."""
    compute: float
    float32: float
    device: str
    nf4_packed: bool = False


def machine_rates(cfg: Config) -> Rates:
    import torch

    from . import compute
    from .models import device

    here = device()
    packed = here.type == "cpu" and compute.dtype_name(cfg) == "bfloat16" and torch.cpu._is_avx512_bf16_supported()
    return Rates(compute.matmul_rate(compute.dtype(cfg), here), compute.matmul_rate(torch.float32, here), here.type,
                 packed)


@dataclass
class Chats:
    """Typical lengths of the training data, in tokens (from a sample of rows: characters / CHARS_PER_TOKEN)."""
    prompt: float  # every turn but the last, with the generation prompt
    answer: float  # the last turn

    @property
    def whole(self) -> float:
        return self.prompt + self.answer


def chats(cfg: Config, sample: int = 64) -> Chats:
    """The first source's typical chat, from its first `sample` rows; a hub dataset (not read here) counts as
    data.max_seq_len."""
    from .config import data_sources
    from .data import BUILTIN, LOADERS, alpaca_messages, builtin_task, load_source

    source = data_sources(cfg.data)[0]
    if source.path == BUILTIN:
        rows = [{"messages": alpaca_messages(r["instruction"], r["input"], r["output"])}
                for r in builtin_task(sample, cfg.seed)]
    elif any(source.path.endswith(suffix) for suffix in LOADERS):
        rows = load_source(cfg.data, source.path, source.split, source.path, cfg.seed, None)
        rows = [rows[i] for i in range(min(sample, len(rows)))]
    else:
        return Chats(cfg.data.max_seq_len / 2, cfg.data.max_seq_len / 2)

    def tokens(messages: list[dict]) -> float:
        return sum(len(m["content"]) / CHARS_PER_TOKEN + MESSAGE_TOKENS for m in messages)
    prompts, answers = [], []
    for row in rows:
        if row.get("messages"):
            prompts.append(TEMPLATE_TOKENS + tokens(row["messages"][:-1]) + MESSAGE_TOKENS)
            answers.append(tokens(row["messages"][-1:]))
        else:
            prompts.append(min(len(row["text"]) / CHARS_PER_TOKEN, cfg.data.max_seq_len))
            answers.append(0.0)
    n = max(len(prompts), 1)
    return Chats(min(sum(prompts) / n, cfg.data.max_seq_len), sum(answers) / n)


class Work:
    """The terms of one stage's time, in seconds, added as the stage's work is described."""

    def __init__(self, s, rates: Rates):
        self.s, self.rates, self.terms = s, rates, {}

    def add(self, name: str, seconds: float) -> None:
        self.terms[name] = self.terms.get(name, 0.0) + seconds

    def forward(self, name: str, tokens: float, calls: float, kind: str = "inference", passes: float = 1,
                head: bool = True, artifact: str = "", scale: float = 1.0) -> None:
        """`calls` forward calls over `tokens` tokens in all, each pass `passes` times (training: a forward and a
        backward, about three): their matmul FLOPs (the decoder layers', and the LM head's on every token with
        `head`) and each call's per-layer cost; an `artifact` named nf4 or qlora adds bitsandbytes' and peft's.
        `scale`: a runtime's time against transformers' eager forward (vLLM's)."""
        s, rates, where = self.s, self.rates, self.rates.device
        flops = 2 * (s.linear + (s.hidden * s.vocab if head else 0)) * tokens * passes
        a, b = SECONDS_PER_FLOP[kind]
        per_flop = a / rates.compute + b / rates.float32
        layers = calls * passes * s.layers * LAYER_CALL_S[where]
        if artifact in ("nf4", "qlora") and (kind == "training" or not rates.nf4_packed):
            per_flop *= NF4_FLOP_FACTOR[where] if kind == "inference" else 1  # training's fit includes it
            layers += calls * passes * s.linear * DEQUANT_S_PER_PARAM[where]
        if artifact == "qlora" or kind == "training":
            layers += calls * passes * s.modules * LORA_MODULE_CALL_S[where]
        self.add(name, scale * (flops * per_flop + layers))

    def generate(self, name: str, prompts: int, prompt_tokens: float, new_tokens: int, batch: int,
                 artifact: str = "") -> None:
        """Greedy generation of `new_tokens` for `prompts` prompts, `batch` at a time (the prompt's LM head runs on
        its last position only)."""
        batches = math.ceil(prompts / batch) if prompts else 0
        self.forward(name, prompts * prompt_tokens, batches, head=False, artifact=artifact)  # prefill
        self.forward(name, prompts * (new_tokens - 1), batches * (new_tokens - 1), artifact=artifact)  # decode

    def total(self) -> float:
        return sum(self.terms.values())


# Fixed seconds of each stage besides its modelled work (the libraries' set-up, saving, the trainer's checkpoints),
# and per-parameter seconds of reading, converting and writing weights; fitted as the constants above.
FIXED_S = {"base": 0.5, "train": 2.0, "merge": 0.5, "gptq": 0.5, "gguf": 2.0, "eval": 3.0, "bench": 2.0,
           "serve": 10.0}
# ("load": an artifact loaded for eval or bench, and what eval reads of its weights for the histogram)
WEIGHTS_S_PER_PARAM = {"base": 0.05e-6, "gguf": 0.15e-6, "merge": 0.02e-6, "gptq": 0.03e-6, "load": 0.04e-6,
                       # llama.cpp's converter, llama-quantize per type, and a file's weights dequantized in numpy
                       # and loaded for its perplexity (the default's gguf stage, AVX512-BF16: 13.2 s for both files'
                       # perplexity, 5.8 of it the forward passes)
                       "convert": 0.03e-6, "quantize": 0.004e-6, "gguf_read": 0.03e-6}
# The base stage and the merge on a GPU machine, measured on one H200 host (16 cores; a 1.09B Llama: 6.3 s and 8.2 s):
# reading, quantizing on the GPU and writing, and merging on the host, go 10x and 3x faster than on the 2-core CPUs.
WEIGHTS_S_PER_PARAM_GPU_HOST = {"base": 0.005e-6, "merge": 0.007e-6}
# llama.cpp's server against transformers' eager decoding on the same work (the default's gguf stage, AVX512-BF16:
# 16.7 s of answers and load for Q8_0 and Q4_K_M, the servers' start included, where transformers' terms say 89)
LLAMACPP_STEP_FACTOR = 0.2
GPTQ_MODULE_S = {"cpu": 0.1, "cuda": 0.03}  # GPTQModel's per-module work besides FLOPs (its solver loop, packing)
RTN_MODULE_S = {"cpu": 0.05, "cuda": 0.01}
GPTQ_LAYER_PASSES = 4  # forward passes of each layer over the calibration windows, per module group and after
# torch.compile of a decoding step, with an empty compile cache as on a fresh machine: fixed, and per decoder layer
# (measured on CPU: 22 s for 2 layers, 56-61 s for 30)
COMPILE_S = {"cpu": (20.0, 1.3), "cuda": (30.0, 0.5)}
VLLM_START_S = {"cpu": 40.0, "cuda": 60.0}  # the server up and healthy (its imports, weights, warm-up): 34-45 s
# vLLM's decoding against transformers' eager one on the same work: its fused CPU kernels step about twice as fast
# (measured on the default, AVX512-BF16: 25 s of answers and load where transformers' terms say 63).
VLLM_STEP_FACTOR = 0.45
EVAL_ARTIFACT_S = 0.3  # eval's set-up of each artifact besides loading it (lm-eval's tasks)


def weights_s(work: str, where: str) -> float:
    """Seconds per parameter of a stage's weight work (WEIGHTS_S_PER_PARAM), on a GPU machine where measured there."""
    measured = WEIGHTS_S_PER_PARAM_GPU_HOST if where == "cuda" else {}
    return measured.get(work, WEIGHTS_S_PER_PARAM[work])


def stage_terms(stage: str, cfg: Config, s, rates: Rates, typical: Chats, source_gguf: bool) -> dict[str, float]:
    """The seconds a stage takes, by what takes them."""
    work = Work(s, rates)
    work.add("fixed", FIXED_S[stage])
    where = rates.device
    if stage == "base":
        work.add("weights read, quantized, written", s.params * weights_s("gguf" if source_gguf else "base", where))
    elif stage == "train":
        t = cfg.train
        length = min(typical.whole * 1.15, cfg.data.max_seq_len)  # padded to the longest of a batch
        steps = t.max_steps * t.grad_accum
        work.forward("forward and backward", steps * t.batch_size * length, steps, kind="training",
                     passes=3 + cfg.train.gradient_checkpointing, artifact="nf4")
        work.add("tokenizing the data", 3e-4 * cfg.data.builtin_examples)
    elif stage == "merge":
        probe = cfg.merge.probe_examples * typical.whole
        float32 = Work(s, Rates(rates.float32, rates.float32, where))  # the merge's check computes in float32
        float32.forward("probe passes, reference and merged (float32)", 2 * probe, 2)
        work.terms |= float32.terms
        work.forward("probe pass, read back", probe, 1)
        work.add("weights read, merged, written", s.params * weights_s("merge", where))
    elif stage == "gptq":
        g = cfg.gptq
        tokens = g.calib_samples * g.calib_seq_len
        work.forward("calibration passes", tokens, math.ceil(g.calib_samples / g.batch_size),
                     passes=GPTQ_LAYER_PASSES, head=False)
        work.add("Hessians and the solver (float32)", (2 * s.inputs_squared * tokens + 2 * s.solver_flops)
                 / rates.float32)
        work.add("per-module work", s.modules * GPTQ_MODULE_S[where])
        work.add("weights packed and written", s.params * WEIGHTS_S_PER_PARAM["gptq"])
    elif stage == "eval":
        e = cfg.eval
        prompts = min(e.task_examples, heldout_rows(cfg))
        lm = set(e.lm_eval.tasks)
        for name in e.artifacts:
            work.add("loading the artifacts, lm-eval's set-up", s.params * WEIGHTS_S_PER_PARAM["load"]
                     + EVAL_ARTIFACT_S)
            work.forward("perplexity windows", e.ppl_windows * e.ppl_seq_len, e.ppl_windows, artifact=name)
            work.generate("task answers", prompts, typical.prompt, e.max_new_tokens, e.batch_size, artifact=name)
            if "pipeline_text" in lm:
                work.forward("lm-eval", e.ppl_windows * e.ppl_seq_len, math.ceil(e.ppl_windows / e.lm_eval.batch_size),
                             artifact=name)
            if "pipeline_heldout" in lm:
                work.forward("lm-eval", prompts * typical.whole, math.ceil(prompts / e.lm_eval.batch_size),
                             artifact=name)
        if "rtn" in e.artifacts:
            work.add("RTN quantization", s.modules * RTN_MODULE_S[where] + s.params * WEIGHTS_S_PER_PARAM["gptq"])
    elif stage == "bench":
        from .stages.bench import compiled_artifacts

        b = cfg.bench
        matrix = b.cpu if where == "cpu" else b.full
        for name in b.artifacts:
            work.add("loading the artifacts", s.params * WEIGHTS_S_PER_PARAM["load"])
            for batch in matrix.batch_sizes:
                for new in matrix.new_tokens:
                    for cache in matrix.use_cache:
                        runs = b.warmup + b.repeats  # the prefill timed, and a prefill in each generation
                        work.forward("prefill", 2 * runs * batch * b.prompt_len, 2 * runs, artifact=name)
                        steps = b.repeats * new + b.warmup * min(new, 4)
                        context = 1 if cache else b.prompt_len + new / 2  # without a cache each step rereads it
                        work.forward("decoding steps", steps * batch * context, steps, artifact=name)
            if name in compiled_artifacts(cfg):
                fixed, per_layer = COMPILE_S[where]
                work.add("torch.compile", (fixed + per_layer * s.layers) * len(matrix.new_tokens))
                for new in matrix.new_tokens:
                    steps = (b.repeats + b.warmup) * new
                    work.forward("decoding steps", steps, steps)
    elif stage == "gguf":
        g = cfg.gguf
        prompts = min(g.task_examples, heldout_rows(cfg))
        work.add("converted and quantized", s.params * (WEIGHTS_S_PER_PARAM["convert"] + len(g.types)
                                                        * WEIGHTS_S_PER_PARAM["quantize"]))
        work.generate("transformers' answers", prompts, typical.prompt, g.max_new_tokens, cfg.eval.batch_size)
        waves = [(math.ceil(prompts / max(g.concurrency)), g.max_new_tokens)] + [
            (math.ceil(max(g.requests, c) / c), g.load_max_tokens) for c in g.concurrency]
        tokens = prompts * g.max_new_tokens + sum(max(g.requests, c) * g.load_max_tokens for c in g.concurrency)
        e = cfg.eval
        work.forward("perplexity windows", e.ppl_windows * e.ppl_seq_len, e.ppl_windows)  # the merged model's
        if imatrix_used(g):
            work.forward("importance matrix windows", g.imatrix_samples * g.imatrix_seq_len,
                         math.ceil(g.imatrix_samples / IMATRIX_BATCH), head=False)
        for _ in g.types:
            work.forward("llama.cpp's answers and load", tokens, sum(n * length for n, length in waves),
                         scale=LLAMACPP_STEP_FACTOR)
            work.add("files read for their perplexity", s.params * WEIGHTS_S_PER_PARAM["gguf_read"])
            work.forward("perplexity windows", e.ppl_windows * e.ppl_seq_len, e.ppl_windows)
    elif stage == "serve":
        sv = cfg.serve
        prompts = min(sv.task_examples, heldout_rows(cfg))
        work.add("vLLM server start", VLLM_START_S[where])
        work.generate("transformers' answers", prompts, typical.prompt, sv.max_new_tokens, 16)
        # vLLM decodes the requests in flight together: a step per token of each wave of `concurrency` requests.
        waves = [(math.ceil(prompts / max(sv.concurrency)), sv.max_new_tokens)] + [
            (math.ceil(max(sv.requests, c) / c), sv.load_max_tokens) for c in sv.concurrency]
        tokens = prompts * sv.max_new_tokens + sum(max(sv.requests, c) * sv.load_max_tokens for c in sv.concurrency)
        work.forward("vLLM's answers and load", tokens, sum(n * length for n, length in waves), scale=VLLM_STEP_FACTOR)
    return {name: round(seconds, 2) for name, seconds in work.terms.items()}


def heldout_rows(cfg: Config) -> int:
    """Held-out rows of the run (a held-out file's rows are not counted: eval's task_examples then)."""
    from .config import data_sources, heldout_of

    held = [heldout_of(cfg.data, source) for source in data_sources(cfg.data)]
    return sum(h if isinstance(h, int) else cfg.eval.task_examples for h in held)
