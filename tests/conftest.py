"""Fixtures: tiny 2-layer models of several architectures with a BPE tokenizer trained on pydoc text, and
Hydra-composed configs."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.data import alpaca_messages, builtin_task, pydoc_texts
from pipeline.runner import run

# The suite's workers (-n 2) share the machine's cores. Left alone, torch in each worker and in every pipeline process
# a test starts runs an OpenMP thread per core, and threads spinning on a core the other worker holds slow tiny models
# down 8x (a tiny train beside a busy neighbour, 2 cores: 66.8 s with 2 threads, 8.7 s with 1). Each worker gets its
# share, inherited by the processes and SLURM jobs it starts. (Only in a worker: the controller, which imports this
# file too, starts the workers with its environment.)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Settings small enough for a 2-core CI machine; each test adds its own overrides.
TINY = ["train.max_steps=12", "train.batch_size=4", "train.save_steps=4", "train.logging_steps=2",
        "train.lr=1e-2", "data.builtin_examples=200", "data.heldout_examples=16", "gptq.calib_samples=8",
        "gptq.calib_seq_len=64", "merge.probe_examples=4", "eval.ppl_windows=4", "eval.ppl_seq_len=64",
        "eval.task_examples=8", "eval.max_new_tokens=8", "bench.cpu.new_tokens=[8]", "bench.cpu.batch_sizes=[1,2]",
        "bench.warmup=1", "bench.repeats=2", "bench.compile=merged", "serve.enabled=false", "gguf.enabled=false",
        "gguf.imatrix_samples=8", "gguf.imatrix_seq_len=64",
        "eval.lm_eval.tasks=[pipeline_text,pipeline_heldout]"]  # both of the pipeline's own lm-eval tasks


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


# Tiny shapes of the families a user brings. GPT-NeoX and Phi keep their separate LM heads; Gemma's default head
# size (256) is cut to the tiny width.
ARCHITECTURES = {
    "llama": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen2": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "mistral": {"num_key_value_heads": 2, "sliding_window": None},
    "gemma": {"num_key_value_heads": 2, "head_dim": 32},
    "phi": {"partial_rotary_factor": 0.5},
    "gpt_neox": {"rotary_pct": 0.25},
}


def train_tokenizer(chat_template: bool):
    """A byte-level BPE on pydoc text and the built-in task. With a chat template: ChatML tokens, as SmolLM2 and
    Qwen2 have them; without: a GPT-NeoX-style tokenizer whose only special token is <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = pydoc_texts(heldout=False)[:200] + [
        m["content"] for row in builtin_task(500, seed=1)
        for m in alpaca_messages(row["instruction"], row["input"], row["output"])]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if chat_template else ["<|endoftext|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if not chat_template:
        return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token="<|im_start|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def build_tiny_model(out: Path, architecture: str = "llama", chat_template: bool = True) -> Path:
    """A 2-layer model of `architecture` with random weights in bf16 and a trained tokenizer, saved to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = train_tokenizer(chat_template)
    config = AutoConfig.for_model(
        architecture, vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, **ARCHITECTURES[architecture])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def finished(tiny_model_dir, tmp_path_factory):
    """One uninterrupted stage=all run of the tiny model: (output_dir, overrides, results). Read it, don't change
    it: tests that change outputs work on a copy."""
    out = tmp_path_factory.mktemp("chain") / "outputs"
    overrides = [f"model.name_or_path={tiny_model_dir}", *TINY]
    results = run(compose_config(f"output_dir={out}", *overrides))
    return out, overrides, results


def drop(exp: Path, stage: str) -> None:
    """Delete a stage's artifact: its store entry and the experiment's link to it."""
    shutil.rmtree((exp / stage).resolve())
    (exp / stage).unlink()


@pytest.fixture
def copy_of(finished, tmp_path):
    """A private copy of the finished outputs, and a function that reruns the pipeline on it with overrides."""
    out, overrides, _ = finished
    mine = tmp_path / "outputs"
    shutil.copytree(out, mine, symlinks=True)

    def rerun(*more: str):
        return run(compose_config(f"output_dir={mine}", *overrides, *more))
    return mine / "default", rerun
