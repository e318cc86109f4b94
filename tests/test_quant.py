"""selora.quant: 4-bit bases read and computed the same in train and eval mode (bitsandbytes' CPU eval layout
is kept off), dense reads of a layer bitsandbytes already rewrote, storage dtypes kept on re-quantization, and
4-bit parameter counts whatever the storage dtype."""
import pytest
import torch
from torch import nn

import selora
from selora import quant

from conftest import build_tiny_llama, quantize_projections

bnb = pytest.importorskip("bitsandbytes")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def linear_4bit(in_features: int, out_features: int, seed: int = 0, nested: bool = True,
                storage: torch.dtype = torch.uint8, device: str = "cpu") -> nn.Module:
    """A bnb nf4 Linear4bit (with bias) holding a seeded random weight, quantized on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=nested, quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features, generator=generator), requires_grad=False,
                                     quant_type="nf4", compress_statistics=nested, quant_storage=storage, module=layer)
    layer.bias = nn.Parameter(torch.randn(out_features, generator=generator), requires_grad=False)
    return layer.to(device)


def adapted_stack(widths: tuple[int, ...], use_dora: bool, device: str = "cpu") -> nn.Module:
    """Linear4bit layers of the given widths, every one wrapped by selora, with non-zero B (the adapter counts)."""
    model = nn.Sequential(*[linear_4bit(a, b, seed=i, device=device) for i, (a, b) in enumerate(zip(widths, widths[1:]))])
    selora.apply(model, selora.LoRAConfig(r=4, use_dora=use_dora, target_modules=tuple(str(i) for i in range(len(model)))))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in selora.adapter_layers(model).values():
            layer.lora_B.param.copy_(torch.randn(layer.lora_B.param.shape, generator=generator).to(device) * 0.1)
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("widths", [(64, 128, 64), (72, 100, 36)], ids=["64-wide", "odd-widths"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_4bit_adapter_outputs_survive_an_eval_forward(widths, use_dora, device):
    """Train-mode output, then an eval-mode no-grad forward (where bitsandbytes >= 0.49 on an AVX512-BF16 CPU
    rewrites the weight, computes in bf16, and crashes on widths like 100), then train mode again: all equal."""
    model = adapted_stack(widths, use_dora, device)
    x = torch.randn(5, widths[0], generator=torch.Generator().manual_seed(2)).to(device)
    dense = {name: quant.dense_weight(layer.base_layer) for name, layer in selora.adapter_layers(model).items()}
    before = model.train()(x.clone().requires_grad_())
    with torch.no_grad():
        evaluated = model.eval()(x)
    after = model.train()(x.clone().requires_grad_())
    torch.testing.assert_close(evaluated, before.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    after.sum().backward()  # the base still passes gradients to the adapters below it
    for name, layer in selora.adapter_layers(model).items():
        assert not quant._cpu_packed(layer.base_layer.weight), name
        assert torch.equal(quant.dense_weight(layer.base_layer), dense[name]), name
        assert layer.lora_A.param.grad is not None and layer.lora_A.param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("nested", [True, False], ids=["nested-absmax", "plain-absmax"])
def test_dense_weight_of_a_layer_bitsandbytes_already_rewrote(nested):
    """A layer rewritten to the CPU layout (e.g. an eval forward before selora.apply) reads as the same matrix
    up to the bf16 rounding of its block scales that the rewrite makes, and apply() puts it back."""
    layer = linear_4bit(128, 96, nested=nested)
    reference = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert torch.equal(quant.dense_weight(layer), reference)
    layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state)
    assert quant._cpu_packed(layer.weight)
    packed = layer.weight.data.clone()
    read = quant.dense_weight(layer)
    # bf16 keeps 8 significant bits of each block scale: at most 2^-8 relative per element (measured 0.0036);
    # nested scales are also re-quantized to 8 bits on the way back (measured up to 0.0061)
    bound = 2 ** -7 if nested else 2 ** -8
    assert ((read - reference).abs() <= reference.abs() * bound + 1e-6).all()
    assert (read - reference).abs().max() > 0  # it did read the rewritten buffer
    assert torch.equal(layer.weight.data, packed) and quant._cpu_packed(layer.weight)  # reading changed nothing
    model = nn.Sequential(layer)
    selora.apply(model, selora.LoRAConfig(r=4, target_modules=("0",)))
    assert not quant._cpu_packed(model[0].base_layer.weight)
    torch.testing.assert_close(quant.dense_weight(model[0].base_layer), read, rtol=0, atol=1e-6)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16"])
def test_write_dense_weight_keeps_the_4bit_settings(storage):
    layer = linear_4bit(128, 64, nested=False, storage=storage)
    target = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    quant.write_dense_weight(layer, target)
    weight = layer.weight
    assert weight.dtype == storage and weight.quant_storage == storage
    assert weight.quant_type == "nf4" and weight.blocksize == 64 and not weight.quant_state.nested
    assert layer.quant_state is weight.quant_state
    expected = linear_4bit(128, 64, nested=False)
    expected.weight = bnb.nn.Params4bit(target, requires_grad=False, quant_type="nf4", compress_statistics=False).to("cpu")
    assert torch.equal(quant.dense_weight(layer), quant.dense_weight(expected))


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16"])
def test_count_parameters_counts_4bit_weights_whatever_the_storage(storage):
    """transformers loads real 4-bit checkpoints with quant_storage = the compute dtype (bf16): two bytes hold
    four 4-bit weights."""
    model = nn.Sequential(linear_4bit(128, 96, storage=storage), nn.Linear(96, 10))
    assert selora.count_parameters(model)["total"] == 128 * 96 + 96 + 96 * 10 + 10


def test_quantized_llama_trains_the_same_with_evaluations_between_steps():
    """What the qlora recipe does with train.eval_every=1: a train step, an eval pass, a train step... gives the
    same losses as without the eval passes (intermediate_size 100: widths bitsandbytes' CPU layout cannot take)."""
    def losses(evaluate: bool) -> list[float]:
        model = quantize_projections(build_tiny_llama(intermediate_size=100), "4bit")
        selora.apply(model, selora.SeLoRAConfig(r=4, use_dora=True))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        curve = []
        for _ in range(3):
            loss = model.train()(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
            if evaluate:
                with torch.no_grad():
                    model.eval()(input_ids=ids, labels=ids)
        return curve

    assert losses(evaluate=True) == losses(evaluate=False)


def test_qlora_recipe_evaluates_after_every_step(tmp_path):
    """The issue's reproduction: qlora_selora on the tiny preset (intermediate_size 344) with an evaluation after
    every step crashed at its first evaluation on an AVX512-BF16 CPU."""
    from launch.config import resolve
    from recipes import finetune
    cfg = resolve("qlora_selora", ["model.preset=tiny_llama", "train.max_steps=2", "train.eval_every=1",
                                   "data.max_train_records=16", "data.max_eval_records=4", "train.micro_batch_size=4",
                                   "train.gradient_accumulation_steps=1", "train.tensorboard=false",
                                   f"train.output_dir={tmp_path}"])
    result = finetune.run(cfg)
    assert result["eval_loss"] is not None and result["eval_loss"] == result["eval_loss"]  # ran, and not NaN


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_traced_4bit_dequantization_gives_bitsandbytes_values(quant_type, nested, storage):
    """The torch-ops dequantization compiled regions use: bitsandbytes' values bit for bit, in float32 and bf16,
    for a weight whose size is not a whole number of blocks (344 x 130 = 698.75 blocks of 64)."""
    weight = torch.randn(344, 130, generator=torch.Generator().manual_seed(0))
    packed = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type, compress_statistics=nested,
                               quant_storage=storage).to("cpu")
    reference = bnb.functional.dequantize_4bit(packed.data, packed.quant_state)
    for dtype in (torch.float32, torch.bfloat16):
        traced = quant.dequantize_4bit_traced(packed.data, packed.quant_state, dtype)
        assert traced.dtype == dtype and torch.equal(traced, reference.to(dtype))


def graph_recorder(graphs: list):
    """A torch.compile backend that keeps the forward and backward graphs, split as inductor splits them (the
    min-cut partitioner: what the backward recomputes rather than keeps), and runs them as they are."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def keep(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    return aot_autograd(fw_compiler=keep, bw_compiler=keep, partition_fn=min_cut_rematerialization_partition)


def kept_for_backward(forward_graph) -> list[torch.Tensor]:
    """The example values of what a forward graph hands its backward (its outputs after the first)."""
    output = next(node for node in forward_graph.graph.nodes if node.op == "output")
    values = [node.meta.get("val") for node in output.args[0][1:] if hasattr(node, "meta")]
    return [value for value in values if isinstance(value, torch.Tensor)]  # (sizes of a dynamic shape are SymInts)


def test_a_compiled_4bit_adapter_dequantizes_in_its_graph_and_matches_eager():
    """Compiled, an adapted 4-bit projection (bias, DoRA, float32 compute) runs no bitsandbytes call in its
    forward or backward graph, keeps no dense copy of its base weight for the backward (a compiled run without
    gradient checkpointing would hold the whole model dense), and gives eager bitsandbytes' output and gradients
    (input and adapter)."""
    # in-features a multiple of bitsandbytes' block (64): its CPU kernel (0.50.2) dequantizes other widths wrongly
    model = adapted_stack((64, 40), use_dora=True)
    layer = model[0]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    trainable = [p for p in model.parameters() if p.requires_grad]

    def run(module):
        inputs = x.clone().requires_grad_(True)
        out = module(inputs)
        out.square().sum().backward()
        grads = [inputs.grad] + [p.grad.clone() for p in trainable]
        for p in trainable:
            p.grad = None
        return out.detach(), grads

    eager_out, eager_grads = run(layer)
    torch.compiler.reset()  # static shapes: earlier compiles of AdapterLinear.forward would make this one dynamic
    graphs = []
    compiled = torch.compile(layer, backend=graph_recorder(graphs), fullgraph=True)
    compiled_out, compiled_grads = run(compiled)
    assert len(graphs) == 2  # forward and backward
    called = {str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"}
    assert not [name for name in called if "bitsandbytes" in name], called
    weight_size = layer.base_layer.out_features * layer.base_layer.in_features
    assert not [kept.shape for kept in kept_for_backward(graphs[0]) if kept.numel() >= weight_size]
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-5)
