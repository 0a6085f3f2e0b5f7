"""FSDP-QLoRA as far as a CPU machine allows: the base stage's NF4 checkpoint with bfloat16 storage
(base.quant_storage=bfloat16), read into host memory as models.device_map() has it read under FSDP, LoRA on top, sharded
by PyTorch's FSDP over two CPU processes (gloo). Each rank keeps half the weights, the sharded model computes the
unsharded loss, and it trains.

accelerate 1.15's FSDP plugin (what the train stage runs under `accelerate launch`) refuses a machine without an
accelerator, and FSDP1 refuses CPU modules with sync_module_states: so this runs PyTorch's FSDP2 (fully_shard) directly,
which is what bitsandbytes' 4-bit parameters need to shard (the packed weights flatten with the rest in bfloat16)."""
from __future__ import annotations

import os
import subprocess
import sys

from pipeline.stages import base

from .conftest import compose_config

# What `accelerate launch --config_file conf/accelerate/fsdp_qlora.yaml` sets in each process: models.device_map()
# and transformers' loader read them.
ACCELERATE_FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}

FSDP_ON_CPU = """
import sys, torch, torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard
from pipeline.models import device_map, load_causal_lm, nf4_layers
from pipeline.config import ModelConfig

dist.init_process_group("gloo")
assert device_map() == {"": "cpu"}  # under FSDP
model = load_causal_lm(sys.argv[1], ModelConfig(name_or_path=sys.argv[1]), "bfloat16")
for layer in nf4_layers(model):
    layer.support_avx512bf16_for_cpu = False  # the packed CPU kernel has no backward
model.enable_input_require_grads()
model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
total = sum(p.numel() for p in model.parameters())
ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    unsharded = model(input_ids=ids, labels=ids).loss.item()
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
local = sum(p.to_local().numel() for p in model.parameters())
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
losses = []
for _ in range(3):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
with open(f"{sys.argv[2]}/result-{dist.get_rank()}.txt", "w") as out:  # a file each: the ranks share one stdout
    print(dist.get_rank(), total, local, unsharded, *losses, file=out)
dist.destroy_process_group()
"""


def test_nf4_checkpoint_shards_and_trains_under_fsdp_on_two_cpu_processes(tiny_model_dir, tmp_path):
    cfg = compose_config(f"model.name_or_path={tiny_model_dir}", "base.quant_storage=bfloat16")
    base.quantize(tiny_model_dir, cfg, tmp_path / "nf4")
    script = tmp_path / "fsdp_on_cpu.py"
    script.write_text(FSDP_ON_CPU)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           str(tmp_path / "nf4"), str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **ACCELERATE_FSDP})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = [path.read_text().split() for path in sorted(tmp_path.glob("result-*.txt"))]
    assert [int(r[0]) for r in results] == [0, 1], done.stdout[-2000:]
    for _, total, local, unsharded, *losses in results:
        assert int(local) <= int(total) / 2 + 4096, (total, local)  # half, and FSDP's padding
        losses = [float(x) for x in losses]
        assert abs(losses[0] - float(unsharded)) < 1e-4, (unsharded, losses)  # sharded computes the same model
        assert losses[-1] < losses[0] - 0.1, losses
