"""selora: SeLoRA (spectral-encoding LoRA) and SRLoRA (subspace recomposition) for any PyTorch model.

    import selora
    model = selora.apply(model, selora.SeLoRAConfig(r=8, spectral_ratio=0.5))
    ...train...
    selora.save_adapter(model, "out/adapter")
    selora.export_lora(model, "out/peft")      # loads with peft.PeftModel.from_pretrained
"""
from .batched_decode import batch_decode_factors
from .config import LLAMA_PROJECTIONS, ConfigValueError, LoRAConfig, SeLoRAConfig, SRLoRAConfig
from .inject import (TargetModuleError, adapter_layers, apply, count_parameters, initialize_adapters, merge,
                     parameter_table, unmerge)
from .io import AdapterFileError, adapter_state_dict, export_lora, load_adapter, save_adapter
from .layers import AdapterLinear
from .spectral import cache_decoded_factors

__all__ = [
    "LLAMA_PROJECTIONS", "ConfigValueError", "LoRAConfig", "SeLoRAConfig", "SRLoRAConfig", "TargetModuleError",
    "AdapterFileError", "AdapterLinear", "adapter_layers", "batch_decode_factors", "cache_decoded_factors", "adapter_state_dict", "apply", "count_parameters",
    "export_lora", "initialize_adapters", "load_adapter", "merge", "parameter_table", "save_adapter", "unmerge",
]
