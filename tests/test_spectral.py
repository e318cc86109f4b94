"""selora.spectral: the DCT against scipy, decode/fit round trips, fit as least squares against an explicit basis
matrix, the dft coefficient cap, and seeded frequency locations."""
import numpy as np
import pytest
import scipy.fft
import torch

from selora import spectral

LENGTHS = (1, 2, 3, 7, 8, 16, 33, 64)


@pytest.mark.parametrize("length", LENGTHS)
def test_dct_matches_scipy_and_idct_inverts(length):
    x = torch.randn(5, length, dtype=torch.float64, generator=torch.Generator().manual_seed(length))
    reference = scipy.fft.dct(x.numpy(), type=2, norm="ortho", axis=-1)
    coefficients = spectral.dct(x)
    assert coefficients.dtype == torch.float64
    np.testing.assert_allclose(coefficients.numpy(), reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(spectral.idct(coefficients), x, rtol=0, atol=1e-12)
    # idct is the orthonormal DCT-III, i.e. scipy's idct of type 2
    np.testing.assert_allclose(spectral.idct(x).numpy(), scipy.fft.idct(x.numpy(), type=2, norm="ortho", axis=-1),
                               rtol=0, atol=1e-12)
    # float32 in, float32 out, to float32 accuracy
    x32 = x.float()
    np.testing.assert_allclose(spectral.dct(x32).numpy(), reference, rtol=0, atol=1e-5)


def draw(length, count, rows, shared, basis, seed=0):
    return spectral.draw_locations(length, count, rows, shared, basis, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("basis", ["dct", "dft"])
@pytest.mark.parametrize("length", [15, 16])
@pytest.mark.parametrize("shared", [True, False])
def test_decode_fit_round_trip(basis, length, shared):
    count = spectral.max_locations(length, basis) - 2
    locations = draw(length, count, 6, shared, basis)
    coefficients = torch.randn(6, count, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rows = spectral.decode(coefficients, locations, length, basis)
    assert rows.shape == (6, length) and rows.dtype == torch.float64
    torch.testing.assert_close(spectral.fit(rows, locations, basis), coefficients, rtol=0, atol=1e-12)
    # orthonormal: decoding keeps the norm of the coefficients
    torch.testing.assert_close(rows.norm(dim=1), coefficients.norm(dim=1), rtol=1e-12, atol=0)


def test_full_dct_basis_is_complete():
    """With every location the DCT basis spans everything: fit then decode gives the rows back."""
    rows = torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    locations = torch.arange(12).expand(4, 12).clone()
    again = spectral.decode(spectral.fit(rows, locations, "dct"), locations, 12, "dct")
    torch.testing.assert_close(again, rows, rtol=0, atol=1e-12)


def basis_matrix(locations_row: torch.Tensor, length: int, basis: str) -> torch.Tensor:
    """(length, K): column j is the decode of the j-th unit coefficient vector."""
    count = locations_row.numel()
    columns = [spectral.decode(torch.eye(count, dtype=torch.float64)[j:j + 1], locations_row.unsqueeze(0), length, basis)[0]
               for j in range(count)]
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("basis", ["dct", "dft"])
@pytest.mark.parametrize("length", [15, 16])
def test_fit_is_the_least_squares_projection(basis, length):
    count = spectral.max_locations(length, basis) // 2 + 1
    locations = draw(length, count, 5, shared=False, basis=basis, seed=3)
    rows = torch.randn(5, length, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    fitted = spectral.fit(rows, locations, basis)
    for i in range(5):
        matrix = basis_matrix(locations[i], length, basis)
        torch.testing.assert_close(matrix.T @ matrix, torch.eye(count, dtype=torch.float64), rtol=0, atol=1e-12)
        reference = torch.linalg.lstsq(matrix, rows[i].unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(fitted[i], reference, rtol=0, atol=1e-10)
        # the reference is not trivially the row itself: the projection leaves a residual
        assert (matrix @ reference - rows[i]).norm() > 1e-3


def test_dft_basis_vectors_are_cosines():
    """dft location u decodes to the unit-norm cosine cos(2 pi u t / L) (the real part of the inverse DFT)."""
    length = 10
    t = torch.arange(length, dtype=torch.float64)
    for u in range(length // 2 + 1):
        decoded = spectral.decode(torch.ones(1, 1, dtype=torch.float64), torch.tensor([[u]]), length, "dft")[0]
        cosine = torch.cos(2 * torch.pi * u * t / length)
        torch.testing.assert_close(decoded, cosine / cosine.norm(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("length", [64, 65])
def test_coefficient_count_and_dft_cap(length):
    assert spectral.coefficient_count(length, 0.25, None, "dct") == round(0.25 * length)
    assert spectral.coefficient_count(length, 0.001, None, "dct") == 1  # at least one coefficient per row
    assert spectral.coefficient_count(length, 0.5, 7, "dft") == 7  # n_coefficients wins over the ratio
    cap = length // 2 + 1
    assert spectral.coefficient_count(length, 0.5, cap, "dft") == cap
    assert spectral.coefficient_count(length, 1.0, None, "dct") == length
    with pytest.raises(ValueError, match=rf"{cap + 1} spectral coefficients .* length {length}.* 'dft' has only {cap}"):
        spectral.coefficient_count(length, 0.5, cap + 1, "dft")
    with pytest.raises(ValueError, match="length // 2 \\+ 1"):
        spectral.coefficient_count(length, 0.9, None, "dft")


def test_locations_deterministic_sorted_shared_and_per_row():
    for basis, length in (("dct", 40), ("dft", 40)):
        limit = spectral.max_locations(length, basis)
        shared = draw(length, 9, 6, True, basis, seed=5)
        per_row = draw(length, 9, 6, False, basis, seed=5)
        for locations in (shared, per_row):
            assert locations.dtype == torch.int64 and locations.shape == (6, 9)
            assert torch.all(locations[:, 1:] > locations[:, :-1])  # sorted, no repeats
            assert locations.min() >= 0 and locations.max() < limit
        assert torch.equal(shared, shared[:1].expand(6, 9))
        assert len({tuple(row.tolist()) for row in per_row}) > 1
        # same seed -> same draw; another seed -> another draw
        assert torch.equal(shared, draw(length, 9, 6, True, basis, seed=5))
        assert torch.equal(per_row, draw(length, 9, 6, False, basis, seed=5))
        assert not torch.equal(shared, draw(length, 9, 6, True, basis, seed=6))
        assert not torch.equal(per_row, draw(length, 9, 6, False, basis, seed=6))


def test_decoded_factor_cache_changes_nothing_numerically(input_ids):
    """With the cache on, a factor is decoded once per optimizer step; losses and gradients over steps with
    gradient accumulation must be bit-identical to the uncached run, and an in-place edit must be seen."""
    import selora
    from conftest import build_tiny_llama, relative_error

    def run(cached: bool):
        selora.cache_decoded_factors(cached)
        selora.batch_decode_factors(False)  # the cache serves factors that decode one by one (ZeRO-3)
        try:
            model = selora.apply(build_tiny_llama(), selora.SeLoRAConfig(r=4, use_dora=True)).train()
            with torch.no_grad():
                for layer in selora.adapter_layers(model).values():
                    layer.lora_B.param.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
            history = []
            for _ in range(3):
                for micro_batch in (input_ids[:1], input_ids[1:]):
                    loss = model(micro_batch, labels=micro_batch).loss
                    loss.backward()
                    history.append(loss.detach())
                history += [p.grad.clone() for p in optimizer.param_groups[0]["params"]]
                optimizer.step()
                optimizer.zero_grad()
            q_proj = model.model.layers[0].self_attn.q_proj
            assert hasattr(q_proj.lora_A, "_cached_key") == cached
            with torch.no_grad():
                before = model(input_ids).logits
                q_proj.lora_B.coefficients.mul_(2)  # an in-place edit bumps the version: the cache must see it
                after = model(input_ids).logits
            assert not torch.equal(before, after)
            return history + [after]
        finally:
            selora.cache_decoded_factors(False)
            selora.batch_decode_factors(True)

    uncached, cached = run(False), run(True)
    assert len(uncached) == len(cached)
    assert torch.equal(uncached[0], cached[0])  # the first loss: the cached forward decodes the same values
    # Not bit-identical afterwards: the uncached decode returns a strided slice of a length-2L irfft, the cache a
    # contiguous copy, and autograd's mm backward picks its BLAS layout from the strides (measured < 1e-6 relative).
    for a, b in zip(uncached, cached):
        assert relative_error(b, a) < 1e-5


def test_cache_keeps_rows_in_the_compute_dtype(input_ids):
    """In a bf16 model the cache holds the decoded rows in bf16 (half the memory, no cast per forward), and the
    loss and coefficient gradients match the uncached path up to bf16 rounding."""
    import selora
    from conftest import build_tiny_llama, relative_error

    def loss_and_grads(cached: bool):
        selora.cache_decoded_factors(cached)
        selora.batch_decode_factors(False)
        try:
            model = selora.apply(build_tiny_llama().to(torch.bfloat16), selora.SeLoRAConfig(r=4))
            layers = selora.adapter_layers(model).values()
            with torch.no_grad():
                for layer in layers:
                    layer.lora_A.param.data = layer.lora_A.param.data.float()
                    layer.lora_B.param.data = layer.lora_B.param.normal_(0, 0.02, generator=torch.Generator().manual_seed(0)).float()
            loss = model(input_ids, labels=input_ids).loss
            loss.backward()
            first = next(iter(layers))
            if cached:
                assert first.lora_A._cached_dense.dtype == torch.bfloat16
            assert first.lora_A.param.grad.dtype == torch.float32
            return loss.detach().float(), [layer.lora_B.param.grad.clone() for layer in layers]
        finally:
            selora.cache_decoded_factors(False)
            selora.batch_decode_factors(True)

    (plain_loss, plain_grads), (cached_loss, cached_grads) = loss_and_grads(False), loss_and_grads(True)
    assert relative_error(cached_loss, plain_loss) < 1e-2
    for a, b in zip(plain_grads, cached_grads):
        assert relative_error(b, a) < 5e-2


def test_batched_decode_matches_factor_by_factor_and_decodes_once_per_length(input_ids, monkeypatch):
    """The model-wide decode (one transform per factor length per forward) computes the same losses and
    coefficient gradients as decoding factor by factor, with activation checkpointing and gradient accumulation;
    stores each factor's locations once; and a factor called after an optimizer step decodes afresh."""
    import selora
    from conftest import build_tiny_llama, relative_error

    calls = []
    original = spectral.decode
    monkeypatch.setattr(spectral, "decode", lambda c, *a: calls.append(c.shape[0]) or original(c, *a))

    def train(batched: bool):
        selora.batch_decode_factors(batched)
        try:
            model = selora.apply(build_tiny_llama(), selora.SeLoRAConfig(r=4, use_dora=True, spectral_ratio=0.5))
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            layers = list(selora.adapter_layers(model).values())
            with torch.no_grad():
                for layer in layers:
                    layer.lora_B.param.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            history = []
            for _ in range(2):
                calls.clear()
                for micro_batch in (input_ids[:1], input_ids[1:]):
                    loss = model(micro_batch, labels=micro_batch).loss
                    loss.backward()
                    history.append(loss.detach())
                decodes = list(calls)
                history += [p.grad.clone() for p in optimizer.param_groups[0]["params"]]
                optimizer.step()
                optimizer.zero_grad()
            # after the step the forward-time rows are stale: a direct call must decode the new coefficients
            A = layers[0].lora_A
            expected = spectral.decode(A.coefficients.detach(), A.locations, A.length, A.basis)
            assert relative_error(A().detach(), expected) < 1e-6
            return history, decodes, layers
        finally:
            selora.batch_decode_factors(True)

    (plain, plain_decodes, _), (batched, batched_decodes, layers) = train(False), train(True)
    for a, b in zip(plain, batched):
        assert relative_error(b, a) < 1e-5
    lengths = {f.length for layer in layers for f in (layer.lora_A, layer.lora_B)}
    assert len(batched_decodes) == 2 * len(lengths)           # one transform per length per micro-batch
    assert len(plain_decodes) > 4 * len(batched_decodes)     # against one per factor (and per recomputation)
    group = [f for layer in layers for f in (layer.lora_A, layer.lora_B) if f.length == layers[0].lora_A.length]
    assert len({f.locations.untyped_storage().data_ptr() for f in group}) == 1  # stored once, as views


def test_batched_rows_come_in_the_compute_dtype_and_locations_as_int32(input_ids):
    """In a bf16 model the batched decode hands out bf16 rows (cast once per group, no float32 copy kept) and
    matches factor-by-factor decoding up to bf16 rounding; locations are held as int32."""
    import selora
    from conftest import build_tiny_llama, relative_error

    def loss(batched: bool):
        selora.batch_decode_factors(batched)
        try:
            model = selora.apply(build_tiny_llama().to(torch.bfloat16), selora.SeLoRAConfig(r=4))
            layer = next(iter(selora.adapter_layers(model).values()))
            assert layer.lora_A.locations.dtype == torch.int32
            with torch.no_grad():
                for l in selora.adapter_layers(model).values():
                    l.lora_A.param.data = l.lora_A.param.data.float()
                    l.lora_B.param.data = l.lora_B.param.normal_(0, 0.02, generator=torch.Generator().manual_seed(0)).float()
            model(input_ids)                       # the first forward learns the compute dtype
            value = model(input_ids, labels=input_ids).loss.float()
            if batched:
                assert layer.lora_A.batched_rows.dtype == torch.bfloat16
            return value
        finally:
            selora.batch_decode_factors(True)

    assert relative_error(loss(True), loss(False)) < 1e-2
