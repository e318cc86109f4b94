"""A GPU check of the 4-bit path inside compiled regions (selora.quant.base_output): the torch-ops dequantization
against bitsandbytes' CUDA kernel, bit for bit, at the 1.3B and 7B projection shapes (nested block scales or
not); an adapted nf4 projection compiled (inductor) against eager bitsandbytes, output and gradients; and the
time of its forward + backward three ways: eager bitsandbytes, bitsandbytes' layer compiled as it is (its
library calls stay in the graph), and the recipe's compiled path.

    python bench/nf4_compiled_check.py       # GPU only; prints one line per check and a timing table

2026-12-06, one H100: equal bit for bit except weights quantized from float32 with nested scales (7 of 11.3M and
63 of 45.1M one bf16 step apart); compiled output within one bf16 step of eager, input gradient to 1.5e-8 of
4.0e-6; forward + backward 1.38 / 1.42 / 1.67 ms traced against 1.73 / 1.93 / 1.76 eager (q_proj, down_proj at
1.3B, up_proj at 7B). Recorded in docs/benchmarks/recipe_vs_peft_2026-12-06.md (call D).
"""
import torch

from common import ROOT, time_ms  # noqa: F401 - ROOT puts the project on sys.path
import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional

import selora
from selora import quant

SHAPES = {"1.3B q_proj": (2048, 2048), "1.3B down_proj": (2048, 5504), "7B up_proj": (11008, 4096)}
TOKENS = 2048


def nf4_layer(out_features: int, in_features: int, nested: bool, source_dtype=torch.float32):
    """A bnb nf4 Linear4bit on the GPU, quantized from a seeded random weight given in ``source_dtype``."""
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.02
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                              quant_type="nf4", compress_statistics=nested)
    layer.weight = bnb.nn.Params4bit(weight.to(source_dtype), requires_grad=False, quant_type="nf4",
                                     compress_statistics=nested, module=layer)
    return layer.cuda()


def check_dequantization() -> None:
    for name, (out_features, in_features) in SHAPES.items():
        for nested in (True, False):
            for source in (torch.float32, torch.bfloat16):
                layer = nf4_layer(out_features, in_features, nested, source)
                data, state = layer.weight.data, layer.weight.quant_state
                reference = bnb_functional.dequantize_4bit(data, state)
                torch.compiler.reset()  # a fresh graph per layer (else the recompile limit falls back to eager)
                traced = torch.compile(quant.dequantize_4bit_traced)(data, state, torch.bfloat16)
                equal = torch.equal(traced, reference.to(torch.bfloat16))
                differing = (traced != reference.to(torch.bfloat16)).sum().item()
                print(f"dequantize {name} nested={nested} from {str(source)[6:]}: equal to bitsandbytes {equal} "
                      f"({differing} of {traced.numel()} differ)")


def adapted(out_features: int, in_features: int) -> torch.nn.Module:
    model = torch.nn.Sequential(nf4_layer(out_features, in_features, nested=True))
    selora.apply(model, selora.LoRAConfig(r=16, target_modules=("0",)))
    layer = model[0].cuda()
    with torch.no_grad():
        layer.lora_B.param.normal_(0, 0.01)
    return layer


def forward_backward(layer, x):
    x.grad = None
    out = layer(x)
    out.float().square().mean().backward()
    return out.detach(), x.grad.clone()


def check_compiled_layer() -> None:
    torch.manual_seed(0)
    for name, (out_features, in_features) in SHAPES.items():
        layer = adapted(out_features, in_features)
        x = torch.randn(TOKENS, in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        eager_out, eager_grad = forward_backward(layer, x)
        compiled_out, compiled_grad = forward_backward(torch.compile(layer), x)
        print(f"compiled {name}: output max difference {(compiled_out - eager_out).abs().max().item():.3g} "
              f"(of max {eager_out.abs().max().item():.3g}), input gradient max difference "
              f"{(compiled_grad - eager_grad).abs().max().item():.3g} (of {eager_grad.abs().max().item():.3g})")


def time_paths() -> None:
    print("\n| projection, 2048 tokens | eager bitsandbytes (ms) | compiled, bitsandbytes calls (ms) | compiled, "
          "traced dequantization (ms) |\n|---|---|---|---|")
    for name, (out_features, in_features) in SHAPES.items():
        layer = adapted(out_features, in_features)
        x = torch.randn(TOKENS, in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        base = layer.base_layer

        def with_library_calls(inputs):  # what the adapter ran before: the bitsandbytes layer itself
            return base(inputs) + layer.scaling * ((inputs @ layer.lora_A.param.to(inputs.dtype).T)
                                                   @ layer.lora_B.param.to(inputs.dtype))

        paths = [layer, torch.compile(with_library_calls), torch.compile(layer)]
        times = [time_ms(lambda path=path: forward_backward(path, x), torch.device("cuda"), repeats=50, warmup=5)
                 for path in paths]
        print(f"| {name} | " + " | ".join(f"{t:.3f}" for t in times) + " |")


def main():
    check_dequantization()
    check_compiled_layer()
    time_paths()


if __name__ == "__main__":
    main()
