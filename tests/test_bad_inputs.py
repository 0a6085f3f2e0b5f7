"""Bad input: a one-line error naming the key, exit code 2, no traceback, and no cached artifact touched.

Every case runs the real runner on the composed config; the command line's part (exit code, the error as one log line,
no traceback) is the same for every refusal, so a few cases go through `python -m pipeline` to check it."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.runner import run

from .conftest import compose_config

BAD_MODELS = {
    "no-config": {},
    "not-causal": {"config.json": json.dumps({"model_type": "vit"})},
    "remote-code": {"config.json": json.dumps({"model_type": "mine", "auto_map": {"AutoModelForCausalLM": "m.M"}}),
                    "m.py": "raise SystemExit('remote code ran')"},
    "pickle-only": {"config.json": json.dumps({"model_type": "llama"}), "pytorch_model.bin": "not really"},
    # A causal LM that transformers knows and GPTQModel 7.6 does not: refused before the base stage runs.
    "unsupported": {"config.json": json.dumps({"model_type": "olmo"}), "model.safetensors": "never read"},
}
BAD_DATA = {
    "empty.jsonl": "",
    "malformed.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": \n'
                       '{"instruction": "c", "output": "d"}\n[1]\n',
    "columns.jsonl": '{"instruction": "a", "output": "b"}\n{"question": "a", "answer": "b"}\n',
    "unknown.jsonl": '{"question": "a", "answer": "b"}\n',
}

# (override, what the error says[, exit code]); {tmp} is a folder with the files above.
CASES = [
    ("stage=deploy", "stage='deploy' is not allowed: one of all, base, train"),
    ("gptq.bits=5", "gptq.bits=5 is not allowed: one of 2, 3, 4, 8"),
    ("gptq.bits=1", "gptq.bits=1 is not allowed"),
    ("gptq.group_size=100", "gptq.group_size=100 is not allowed: null (auto), -1 (per channel) or a power of two"),
    ("gptq.group_size=0", "gptq.group_size=0 is not allowed"),
    # Smallest values that make no sense (every smallest legal value runs: tests/test_pipeline.py).
    ("gptq.group_size=8", "gptq.group_size=8 is not allowed: null (auto), -1 (per channel) or a power of two from 16 "
                          "(GPTQModel's kernels take no smaller)"),
    ("gptq.calib_seq_len=10", "gptq.calib_seq_len=10 is not allowed: 11 or more (GPTQModel drops calibration windows"),
    ("bench.cpu.new_tokens=[1]", "bench.cpu.new_tokens=[1] is not allowed: a non-empty list of integers from 2"),
    ("merge.max_mean_abs_logit_diff=0", "merge.max_mean_abs_logit_diff=0.0 is not allowed: a positive number"),
    ("serve.max_model_len=32", "serve.max_model_len=32 is not allowed: more than serve.max_new_tokens and "
                               "serve.load_max_tokens"),
    ("serve.requests=0", "serve.requests=0 is not allowed: a positive integer"),
    ("serve.concurrency=[0]", "serve.concurrency=[0] is not allowed: a non-empty list of positive integers"),
    ("gptq.damp_percent=1.5", "gptq.damp_percent=1.5 is not allowed: a number in (0, 1)"),
    ("gptq.calib_source=web", "gptq.calib_source='web' is not allowed: pydoc, train or mixed"),
    ("train.lora_r=0", "train.lora_r=0 is not allowed: a positive integer"),
    ("train.lr=0", "train.lr=0.0 is not allowed: a positive number"),
    ("train.lr=-1e-4", "train.lr=-0.0001 is not allowed"),
    ("train.max_steps=0", "train.max_steps=0 is not allowed: a positive integer"),
    ("train.target_modules=[]", "train.target_modules=[] is not allowed"),
    ("model.dtype=int8", "model.dtype='int8' is not allowed"),
    ("eval.artifacts=[gptq,awq]", "eval.artifacts=['gptq', 'awq'] is not allowed"),
    ("bench.matrix=huge", "bench.matrix='huge' is not allowed: auto, full or cpu"),
    ("bench.compile=awq", "bench.compile='awq' is not allowed: auto, all, none or an artifact (base16,"),
    # Hydra itself refuses these while composing the config (its exit code is 1): experiment names a file in
    # conf/experiment/, so it cannot point outside output_dir; every key is typed.
    ("experiment=../../etc", "Could not find 'experiment/../../etc'", 1),
    ("gptq.bits=four", "Value 'four' of type 'str' could not be converted to Integer", 1),
    ("train.lorar=8", "Could not override 'train.lorar'", 1),
    ("model.name_or_path=/no/such/model", "model.name_or_path='/no/such/model': no such directory"),
    ("model.name_or_path={tmp}/no-config", "no readable config.json, not an HF model directory"),
    ("model.name_or_path={tmp}/not-causal", "model_type 'vit' is not a causal language model"),
    ("model.name_or_path={tmp}/pickle-only", "no .safetensors weights; pickled weights"),
    ("model.name_or_path={tmp}/unsupported", "model_type 'olmo' is not supported by GPTQModel"),
    ("model.name_or_path={tmp}/remote-code", "the model ships its own Python code (auto_map in config.json)"),
    ("model.name_or_path=package:no-such-dist", "the package 'no-such-dist' is not installed"),
    ("data.source={tmp}/missing.jsonl", "missing.jsonl': no such file"),
    ("data.source={tmp}/empty.jsonl", "empty.jsonl': the file is empty"),
    ("data.source={tmp}/malformed.jsonl", "malformed.jsonl': malformed JSON on line 2"),
    ("data.source={tmp}/columns.jsonl", "columns.jsonl': row 2 has no 'instruction'/'output' text"),
    ("data.source={tmp}/unknown.jsonl", "unknown.jsonl': unknown row shape, columns ['question', 'answer']: expected"),
    ("data.format=sharegpt", "data.format='sharegpt' is not allowed: auto, chat, alpaca, text"),
    ("data.train_on=first_turn", "data.train_on='first_turn' is not allowed: all_turns or last_turn"),
    ("data.source={tmp}/unknown.jsonl data.sources=[{{path:builtin}}]",
     "data.source=('{tmp}/unknown.jsonl', None) is not allowed: left unset when data.sources lists the sources"),
    ("data.sources=[{{path:builtin,weight:0}}]", "data.sources[0].weight=0.0 is not allowed: a positive number"),
    ("data.sources=[{{path:builtin}},{{path:{tmp}/missing.jsonl}}]",
     "data.sources[1].path='{tmp}/missing.jsonl': no such file"),
    ("data.heldout_examples=0 train.eval_steps=5", "train.eval_steps=5 is not allowed: null when nothing is held out"),
    ("train.report_to=comet", "train.report_to='comet' is not allowed: a list of tensorboard, wandb, mlflow"),
    ("eval.lm_eval.tasks=[pipeline_text,no_such_task]", "eval.lm_eval.tasks: lm-eval knows no task 'no_such_task'"),
    ("eval.lm_eval.include_path={tmp}/no-tasks", "eval.lm_eval.include_path='{tmp}/no-tasks': no such directory"),
    ("eval.lm_eval.batch_size=0", "eval.lm_eval.batch_size=0 is not allowed: a positive integer"),
    ("eval.lm_eval.limit=0", "eval.lm_eval.limit=0 is not allowed: null (all) or a positive integer"),
    ("resources.train.gpus=-1", "resources.train.gpus=-1 is not allowed: 0 (a CPU-only job) or more"),
    ("output_dir=/proc/pipeline-outputs", "output_dir='/proc/pipeline-outputs': /proc is not writable"),
    ("stage=gptq gptq.calib_samples=100000", "gptq.calib_samples=100000: the pydoc text has only"),
]


def tree_hashes(root: Path) -> dict[str, str]:
    """Every artifact file (not logs, nor the empty lock files a stage takes before it checks its inputs)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "logs" not in p.parts and p.suffix != ".lock"}


@pytest.fixture(scope="module")
def bad_inputs(finished, tmp_path_factory):
    out, overrides, _ = finished
    tmp = tmp_path_factory.mktemp("bad")
    for name, files in BAD_MODELS.items():
        (tmp / name).mkdir()
        for filename, text in files.items():
            (tmp / name / filename).write_text(text)
    for name, text in BAD_DATA.items():
        (tmp / name).write_text(text)
    outputs = tmp / "outputs"
    shutil.copytree(out, outputs, symlinks=True)
    return tmp, outputs, overrides


REFUSED = [case for case in CASES if len(case) == 2]


@pytest.mark.parametrize("override, message", REFUSED, ids=[c[0] for c in REFUSED])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(bad_inputs, override, message):
    tmp, outputs, overrides = bad_inputs
    before = tree_hashes(outputs)
    with pytest.raises(ConfigError) as refused:
        run(compose_config(*overrides, f"output_dir={outputs}", *override.format(tmp=tmp).split()))
    said = str(refused.value)
    assert message.format(tmp=tmp) in said and "\n" not in said, said
    assert tree_hashes(outputs) == before


# Hydra's own refusals (its exit code is 1), and two of the runner's
EDGE = [case for case in CASES if len(case) == 3] + [
    (*case, 2) for case in REFUSED if case[0] in ("stage=deploy", "model.name_or_path={tmp}/remote-code")]


@pytest.mark.parametrize("override, message, code", EDGE, ids=[c[0] for c in EDGE])
def test_the_command_line_says_it_without_a_traceback(bad_inputs, override, message, code):
    tmp, outputs, overrides = bad_inputs
    before = tree_hashes(outputs)
    args = [a.format(tmp=tmp) for a in override.split()]
    result = subprocess.run([sys.executable, "-m", "pipeline", *overrides, f"output_dir={outputs}", *args],
                            capture_output=True, text=True, timeout=300)
    said = result.stdout + result.stderr
    assert result.returncode == code, said[-3000:]
    assert message.format(tmp=tmp) in said, said[-3000:]
    assert "Traceback" not in said
    if code == 2:  # the runner's refusal is one log line
        assert [line for line in said.splitlines() if "[ERROR]" in line] == [
            line for line in said.splitlines() if message.format(tmp=tmp) in line], said[-3000:]
    assert tree_hashes(outputs) == before


def test_debug_shows_the_traceback(bad_inputs):
    tmp, outputs, overrides = bad_inputs
    result = subprocess.run([sys.executable, "-m", "pipeline", *overrides, f"output_dir={outputs}", "gptq.bits=5",
                             "debug=true"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" in result.stdout + result.stderr
