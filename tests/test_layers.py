"""selora.layers.AdapterLinear: merge/unmerge on float and bitsandbytes bases, and gradients of the spectral
coefficients (and DoRA's magnitude) against finite differences and the chain rule."""
import pytest
import torch
from torch import nn

import selora
from selora import quant
from selora.inject import layer_generator
from selora.layers import AdapterLinear

from conftest import relative_error

bnb = pytest.importorskip("bitsandbytes")

IN, OUT, RANK = 64, 48, 4
CONFIGS = {
    "lora": selora.LoRAConfig(r=RANK),
    "selora-haar": selora.SeLoRAConfig(r=RANK, basis="haar"),
    "selora-fft2": selora.SeLoRAConfig(r=RANK, basis="fft2"),
    "selora-dct_rows": selora.SeLoRAConfig(r=RANK, basis="dct_rows"),
    "selora-haar-dora": selora.SeLoRAConfig(r=RANK, basis="haar", use_dora=True),
    "lora-dora": selora.LoRAConfig(r=RANK, use_dora=True),
}
# Merged vs unmerged output, relative L2, measured with `adapter_layer` below over seeds 0-4 for every config
# (the adapter moves the output by 0.23-0.43 relative): nf4 0.076-0.091 (the merged weight is re-quantized to
# nf4), int8 0.0038-0.0047 (row-wise absmax int8). Bounds are about twice the largest measured value.
MERGE_BOUND = {"4bit": 0.18, "8bit": 0.01}
# After merge + unmerge the base has been re-quantized twice; output vs the original unmerged output, same runs:
# nf4 0.116-0.143, int8 0.0045-0.0056.
UNMERGE_BOUND = {"4bit": 0.29, "8bit": 0.012}


def base_layer(kind: str, seed: int = 0) -> nn.Module:
    """A (IN -> OUT) layer with bias: nn.Linear, or the same weight quantized to nf4 / int8 on the CPU."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        linear = nn.Linear(IN, OUT)
    if kind == "linear":
        return linear
    weight, bias = linear.weight.data.clone(), nn.Parameter(linear.bias.data.clone())
    if kind == "4bit":
        layer = bnb.nn.Linear4bit(IN, OUT, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(IN, OUT, bias=True, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    layer.bias = bias
    return layer.to("cpu")  # quantizes


def adapter_layer(kind: str, config, seed: int = 0) -> AdapterLinear:
    """An adapter with random non-zero factors (B too) and, with DoRA, a magnitude off the row norms."""
    layer = AdapterLinear(base_layer(kind, seed), config, layer_generator(seed, "layer"))
    layer.base_layer.requires_grad_(False)
    layer.initialize_magnitude()
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        B = layer.lora_B.param
        B.copy_(torch.randn(B.shape, generator=generator) * 0.05)
        if layer.magnitude is not None:
            layer.magnitude.mul_(1 + 0.2 * torch.randn(OUT, generator=generator))
    return layer


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(16, IN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_merge_unmerge_float_base_is_exact(name):
    layer = adapter_layer("linear", CONFIGS[name])
    x = inputs()
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        base_only = layer.base_layer(x)
        assert relative_error(unmerged, base_only) > 0.05  # the adapter really changes the output
        layer.merge()
        assert layer.merged
        merged = layer(x)
        assert relative_error(merged, unmerged) < 1e-5
        assert not torch.equal(layer.base_layer.weight, original)
        layer.unmerge()
        assert not layer.merged
        assert (layer.base_layer.weight - original).abs().max() < 1e-6
        assert relative_error(layer(x), unmerged) < 1e-5


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
@pytest.mark.parametrize("name", CONFIGS)
def test_merge_unmerge_quantized_base_is_bounded(kind, name):
    layer = adapter_layer(kind, CONFIGS[name])
    assert layer.kind == kind
    x = inputs()
    with torch.no_grad():
        unmerged = layer(x)
        assert relative_error(unmerged, layer.base_layer(x)) > 0.05
        layer.merge()
        merged = layer(x)
        # a merge that dropped the update would be off by > 0.05 (asserted above), beyond the 8-bit bound
        assert relative_error(merged, unmerged) < MERGE_BOUND[kind]
        assert quant.base_kind(layer.base_layer) == kind  # still quantized after the merge
        # tight check: the merged base is exactly bitsandbytes' quantization of (dequantized W + update)
        expected = quant.dense_weight(base_layer(kind)) + layer.delta_weight()
        merge_norm = expected.norm(dim=1)
        if layer.use_dora:
            expected = (layer.magnitude / merge_norm).unsqueeze(1) * expected
        assert (quant.dense_weight(layer.base_layer) - requantized(kind, expected)).abs().max() < 1e-6
        merged_base = quant.dense_weight(layer.base_layer)
        layer.unmerge()
        assert relative_error(layer(x), unmerged) < UNMERGE_BOUND[kind]
        # tight check: the unmerged base is exactly the quantization of (merged base, DoRA scale undone) - update;
        # an unmerge that kept the update would be off by a whole update (> 0.05 of the output, asserted above)
        if layer.use_dora:
            merged_base = (merge_norm / layer.magnitude).unsqueeze(1) * merged_base
        assert (quant.dense_weight(layer.base_layer) - requantized(kind, merged_base - layer.delta_weight())).abs().max() < 1e-6


def requantized(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """What bitsandbytes makes of ``weight`` (out, in) as an nf4 / int8 base, read back as a dense float32 matrix."""
    layer = base_layer(kind)
    layer.weight = (bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4") if kind == "4bit" else
                    bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)).to("cpu")
    return quant.dense_weight(layer)


# ----- gradients ---------------------------------------------------------------------------------------------
def float64_layer(basis: str, use_dora: bool) -> AdapterLinear:
    torch.manual_seed(0)
    base = nn.Linear(24, 20, dtype=torch.float64)
    base.requires_grad_(False)
    config = selora.SeLoRAConfig(r=4, basis=basis, use_dora=use_dora, spectral_ratio=0.4)
    layer = AdapterLinear(base, config, layer_generator(0, "layer")).double()
    layer.initialize_magnitude()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_B.coefficients.copy_(torch.randn(layer.lora_B.coefficients.shape, generator=generator,
                                                    dtype=torch.float64))
        if use_dora:
            layer.magnitude.mul_(1 + 0.2 * torch.randn(20, generator=generator, dtype=torch.float64))
    return layer


def decode(factor, entries: torch.Tensor) -> torch.Tensor:
    """The factor's basis applied directly (not through the layer's autograd Function)."""
    return factor.basis.decode(entries, factor.index_set.indices, factor.rows, factor.length)


def explicit_output(layer: AdapterLinear, x: torch.Tensor, coefficients_A, coefficients_B, magnitude, norm):
    """The layer's function written out in float64: W x + b + s B A x, DoRA-rescaled by magnitude / norm
    (``norm`` held fixed, as the layer detaches it)."""
    A = decode(layer.lora_A, coefficients_A)
    B = decode(layer.lora_B, coefficients_B).T
    W, b = layer.base_layer.weight, layer.base_layer.bias
    out = x @ W.T + layer.scaling * (x @ A.T) @ B.T
    if magnitude is not None:
        out = (magnitude / norm) * out
    return out + b


def central_differences(function, values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    grad = torch.zeros_like(values)
    for index in range(values.numel()):
        step = torch.zeros_like(values).view(-1)
        step[index] = eps
        step = step.view_as(values)
        grad.view(-1)[index] = (function(values + step) - function(values - step)) / (2 * eps)
    return grad


@pytest.mark.parametrize("use_dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize("basis", selora.bases.names())
def test_coefficient_gradients_match_finite_differences(basis, use_dora):
    layer = float64_layer(basis, use_dora)
    x = torch.randn(5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weights = torch.randn(5, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (layer(x) * weights).sum().backward()

    cA = layer.lora_A.coefficients.detach().clone()
    cB = layer.lora_B.coefficients.detach().clone()
    magnitude = layer.magnitude.detach().clone() if use_dora else None
    norm = None
    if use_dora:  # the same detached norm the layer uses (float32; checked against the dense sum's row norms below)
        norm = layer.dora_row_norms(decode(layer.lora_A, cA), decode(layer.lora_B, cB).T)
    with torch.no_grad():
        torch.testing.assert_close(explicit_output(layer, x, cA, cB, magnitude, norm), layer(x), rtol=1e-12, atol=1e-12)

    def loss(cA_, cB_, m_):
        return (explicit_output(layer, x, cA_, cB_, m_, norm) * weights).sum()

    references = {
        "lora_A.coefficients": central_differences(lambda c: loss(c, cB, magnitude), cA),
        "lora_B.coefficients": central_differences(lambda c: loss(cA, c, magnitude), cB),
    }
    if use_dora:
        references["magnitude"] = central_differences(lambda m: loss(cA, cB, m), magnitude)
    trainable = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    assert set(trainable) == set(references)
    for name, reference in references.items():
        grad = trainable[name].grad
        assert grad is not None and grad.dtype == torch.float64
        assert reference.abs().max() > 1e-3, name  # not a vacuous comparison
        assert relative_error(grad, reference) < 1e-6, name


@pytest.mark.parametrize("basis", selora.bases.names())
def test_coefficient_gradients_are_the_adjoint_of_decoded_factor_gradients(basis):
    """decode is linear, so d loss / d entries = adjoint(d loss / d decoded factor), the basis' own adjoint."""
    layer = float64_layer(basis, use_dora=False)
    x = torch.randn(5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weights = torch.randn(5, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (layer(x) * weights).sum().backward()

    A = layer.lora_A().detach().requires_grad_(True)   # (r, in)
    Bt = layer.lora_B().detach().requires_grad_(True)  # (r, out)
    out = layer.base_layer(x) + layer.scaling * (x @ A.T) @ Bt
    grad_A, grad_Bt = torch.autograd.grad((out * weights).sum(), [A, Bt])
    for factor, grad in ((layer.lora_A, grad_A), (layer.lora_B, grad_Bt)):
        expected = factor.basis.adjoint(grad, factor.index_set.indices)
        torch.testing.assert_close(factor.coefficients.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "bf16", "4bit", "8bit"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_dora_row_norms_equal_the_norms_of_the_dense_sum(kind, residual):
    # DoRA's norm is computed from the base and the low-rank parts without forming W + residual + s B A; it must
    # equal the row norms of that dense sum (what PEFT computes), on every base the layer takes.
    layer = adapter_layer("linear" if kind == "bf16" else kind, CONFIGS["lora-dora"])
    if kind == "bf16":
        layer.base_layer.to(torch.bfloat16)
    if residual:  # an exact fusion kept beside the base, as SRLoRA records it on quantized bases
        generator = torch.Generator().manual_seed(7)
        layer.record_base_change(torch.randn(OUT, 3, generator=generator) * 0.1,
                                 torch.randn(3, IN, generator=generator) * 0.1, into="residual")
    A, B = layer.factor_matrices()
    dense = (layer.base_weight() + layer.scaling * (B @ A)).norm(dim=1)
    norms = layer.dora_row_norms(A, B)
    assert norms.dtype == torch.float32 and norms.shape == (OUT,)
    assert relative_error(norms, dense) < 1e-6


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_forward_with_a_residual_adds_it_undropped_and_follows_each_change(dropout):
    # SRLoRA's exact fusions beside a quantized base ride in the adapter's matmuls (one matrix with A when there
    # is no dropout, a second product when there is: dropout never touches the residual). The forward must equal
    # base(x) + residual_B residual_A x + scaling B A dropout(x), with its compute-dtype copy of the residual
    # remade after each change (a second fusion, a load) and kept between changes.
    config = selora.LoRAConfig(r=RANK, alpha=3 * RANK, dropout=dropout)  # scaling 3: not a power of two
    layer = adapter_layer("4bit", config).train()
    x, generator = inputs(), torch.Generator().manual_seed(7)
    A, B = layer.factor_matrices()

    def expected(seed):
        torch.manual_seed(seed)
        dropped = layer.dropout(x)
        return (layer.base_layer(x) + x @ (layer.residual_B @ layer.residual_A).T
                + layer.scaling * dropped @ (B @ A).T)

    def forward(seed):
        torch.manual_seed(seed)
        return layer(x)

    for change in range(2):
        layer.record_base_change(torch.randn(OUT, 3, generator=generator) * 0.1,
                                 torch.randn(3, IN, generator=generator) * 0.1, into="residual")
        assert relative_error(forward(change), expected(change)) < 1e-6, change
        cached = layer._residual_in(x.dtype)
        assert all(a is b for a, b in zip(cached, layer._residual_in(x.dtype)))  # kept while nothing changes
    assert layer._residual_in(x.dtype)[0].shape == (6, IN)
    loaded = {"residual_A": layer.residual_A.clone(), "residual_B": 2 * layer.residual_B.clone()}
    layer.residual_A, layer.residual_B = loaded["residual_A"], loaded["residual_B"]  # what a load assigns
    assert relative_error(forward(5), expected(5)) < 1e-6
