"""selora: SeLoRA (spectral-encoding LoRA) and SRLoRA (subspace recomposition) for any PyTorch model.

    import selora
    model = selora.apply(model, selora.SeLoRAConfig(r=8, spectral_ratio=0.5))
    selora.enable_gradient_checkpointing(model)  # optional; recomputation reuses the forward's decoded factors
    ...train...
    selora.save_adapter(model, "out/adapter")
    selora.export_lora(model, "out/peft")      # loads with peft.PeftModel.from_pretrained
"""
from . import bases
from .activation_checkpointing import checkpoint_context_fn, enable_gradient_checkpointing
from .config import (ADAPTER_METHODS, LLAMA_PROJECTIONS, ConfigValueError, LoRAConfig, SeLoRAConfig, SRLoRAConfig,
                     method_config, register_method)
from .inject import (TargetModuleError, adapter_layers, apply, count_parameters, initialize_adapters, merge,
                     parameter_table, unmerge)
from .io import AdapterFileError, adapter_state_dict, export_lora, load_adapter, save_adapter
from .layers import AdapterLinear
from .srlora import SRLoRA

__all__ = [
    "ADAPTER_METHODS", "LLAMA_PROJECTIONS", "ConfigValueError", "LoRAConfig", "SeLoRAConfig", "SRLoRA", "SRLoRAConfig",
    "TargetModuleError", "method_config", "register_method",
    "AdapterFileError", "AdapterLinear", "adapter_layers", "adapter_state_dict", "bases", "apply", "checkpoint_context_fn",
    "count_parameters", "enable_gradient_checkpointing", "export_lora", "initialize_adapters", "load_adapter", "merge",
    "parameter_table", "save_adapter", "unmerge",
]
