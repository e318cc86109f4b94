"""selora.bases: every basis is an exact linear map with its adjoint, checked against independent references
(pywavelets, numpy/scipy FFTs, float64 least squares), plus counts, index sets and the calibrated init."""
import math

import numpy as np
import pytest
import torch

import selora
from selora import bases
from selora.bases.wavelet import FILTERS
from selora.decode import IndexSet, SpectralDecode
from selora.layers import SpectralFactor

try:  # the independent wavelet reference (the test extra installs it); the other checks do not need it
    import pywt
except ImportError:
    pywt = None
needs_pywt = pytest.mark.skipif(pywt is None, reason="pywavelets is not installed (pip install -e .[test])")

ALL = bases.names()
WAVELETS = tuple(FILTERS)
# (rows, length): even 2-D, a non-power-of-two width, an odd rank (identity along rows), an odd width
SHAPES = [(4, 12), (8, 18), (3, 10), (4, 9)]


def dense_matrix(basis, rows, length) -> torch.Tensor:
    """The synthesis as an explicit (rows * length, spectral entries) float64 matrix."""
    n_rows, n_cols = basis.spectral_shape(rows, length)
    eye = torch.eye(n_rows * n_cols, dtype=torch.float64).view(-1, n_rows, n_cols)
    return basis.synthesize(eye, length).reshape(n_rows * n_cols, -1).T


def reference_synthesis(name, spectrum: np.ndarray, length: int) -> np.ndarray:
    """The same transforms from independent implementations."""
    rows = spectrum.shape[0]
    if name in WAVELETS:
        if rows % 2 == 0 and length % 2 == 0:
            h, w = rows // 2, length // 2
            return pywt.idwt2((spectrum[:h, :w], (spectrum[h:, :w], spectrum[:h, w:], spectrum[h:, w:])), name,
                              mode="periodization")
        if rows % 2:  # identity along the odd axis
            return pywt.idwt(spectrum[:, :length // 2], spectrum[:, length // 2:], name, mode="periodization", axis=1) \
                if length % 2 == 0 else spectrum
        return pywt.idwt(spectrum[:rows // 2], spectrum[rows // 2:], name, mode="periodization", axis=0)
    if name == "fft2":
        return np.fft.ifft2(spectrum, norm="ortho").real
    if name == "dct_rows":  # the orthonormal DCT-II matrix, written out: row k is s_k cos(pi k (2j + 1) / 2L)
        k, j = np.arange(length), np.arange(length)
        cosines = np.cos(np.pi * np.outer(k, 2 * j + 1) / (2 * length)) * math.sqrt(2 / length)
        cosines[0] /= math.sqrt(2)
        return spectrum @ cosines
    if name == "dft_rows":  # unit-norm cosines: sqrt(2/L) cos(2 pi u j / L), sqrt(1/L) at u = 0 and L/2
        u, j = np.arange(spectrum.shape[1]), np.arange(length)
        cosines = np.cos(2 * np.pi * np.outer(u, j) / length) * math.sqrt(2 / length)
        cosines[0] /= math.sqrt(2)
        if length % 2 == 0:
            cosines[-1] /= math.sqrt(2)
        return spectrum @ cosines
    raise AssertionError(name)


@needs_pywt
def test_filter_banks_are_pywavelets():
    for name, (low, high) in FILTERS.items():
        wavelet = pywt.Wavelet(name)
        np.testing.assert_allclose(low, wavelet.rec_lo, rtol=0, atol=1e-15)
        np.testing.assert_allclose(high, wavelet.rec_hi, rtol=0, atol=1e-15)


@pytest.mark.parametrize("rows, length", SHAPES)
@pytest.mark.parametrize("name", ALL)
def test_synthesis_matches_an_independent_implementation(name, rows, length):
    if name in WAVELETS and pywt is None:
        pytest.skip("pywavelets is not installed")
    basis = bases.get(name)
    spectrum = torch.randn(basis.spectral_shape(rows, length), dtype=torch.float64,
                           generator=torch.Generator().manual_seed(rows * length))
    np.testing.assert_allclose(basis.synthesize(spectrum, length).numpy(),
                               reference_synthesis(name, spectrum.numpy(), length), rtol=0, atol=1e-12)


@needs_pywt
def test_haar_decode_is_pywavelets_idwt2_at_a_7b_width():
    """The default basis on a LLaMA-shaped factor (r 16 x 1536, a non-power-of-two width), through decode."""
    basis = bases.get("haar")
    index_set = IndexSet.draw("haar", 16, 1536, 12000, seed=0)
    entries = torch.randn(index_set.count, dtype=torch.float64)
    dense = basis.decode(entries, index_set.indices, 16, 1536)
    spectrum = basis.scatter(entries, index_set.indices, 16, 1536).numpy()
    np.testing.assert_allclose(dense.numpy(), reference_synthesis("haar", spectrum, 1536), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rows, length", SHAPES)
@pytest.mark.parametrize("name", ALL)
def test_adjoint_is_the_transpose_and_backward_uses_it(name, rows, length):
    basis = bases.get(name)
    count = basis.count(rows, length, 0.5)
    index_set = IndexSet.draw(name, rows, length, count, seed=1)
    matrix = dense_matrix(basis, rows, length)[:, index_set.indices]  # (rows * length, count)
    generator = torch.Generator().manual_seed(2)
    entries = torch.randn(count, dtype=torch.float64, generator=generator)
    grad = torch.randn(rows, length, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(basis.decode(entries, index_set.indices, rows, length).reshape(-1), matrix @ entries,
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(basis.adjoint(grad, index_set.indices), matrix.T @ grad.reshape(-1), rtol=0, atol=1e-12)
    # backward of the autograd Function is that adjoint (gradcheck compares with finite differences)
    entries.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: SpectralDecode.apply(c, index_set.indices, basis, rows, length),
                                    (entries,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ALL)
def test_fit_is_least_squares_and_round_trips(name):
    rows, length = 4, 18
    basis = bases.get(name)
    count = basis.count(rows, length, 0.4)
    index_set = IndexSet.draw(name, rows, length, count, seed=3)
    matrix = dense_matrix(basis, rows, length)[:, index_set.indices]
    target = torch.randn(rows, length, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    fitted = basis.fit(target, index_set.indices)
    best = torch.linalg.lstsq(matrix, target.reshape(-1, 1), driver="gelsd").solution.squeeze(1)
    # the same residual as the float64 least-squares solution (the solution itself is unique up to fft2's
    # conjugate pairs, which decode to the same factor)
    torch.testing.assert_close(matrix @ fitted, matrix @ best, rtol=0, atol=1e-9)
    # decode -> fit -> decode is the identity on decodable factors
    entries = torch.randn(count, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    dense = basis.decode(entries, index_set.indices, rows, length)
    again = basis.decode(basis.fit(dense, index_set.indices), index_set.indices, rows, length)
    torch.testing.assert_close(again, dense, rtol=0, atol=1e-9)
    if name != "fft2":  # independent columns: the entries themselves come back
        torch.testing.assert_close(basis.fit(dense, index_set.indices), entries, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", [n for n in ALL if bases.get(n).orthonormal])
def test_orthonormal_bases_are_orthogonal_maps(name):
    basis = bases.get(name)
    matrix = dense_matrix(basis, 6, 20)
    gram = matrix.T @ matrix
    torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_column_energy_is_exact(name):
    basis = bases.get(name)
    index_set = IndexSet.draw(name, 8, 14, basis.count(8, 14, 0.5), seed=6)
    matrix = dense_matrix(basis, 8, 14)[:, index_set.indices]
    assert basis.column_energy(8, 14, index_set.indices) == pytest.approx(matrix.pow(2).sum().item(), rel=1e-12)


def test_counts_follow_the_ratio():
    haar, rows = bases.get("haar"), bases.get("dct_rows")
    assert haar.count(32, 4096, 0.5) == 65536
    assert haar.count(32, 11008, 0.6) == math.floor(0.6 * 32 * 11008)
    assert haar.count(10, 10, 0.29) == 29  # no binary-rounding loss
    assert haar.count(4, 8, 1e-6) == 1
    assert haar.count(4, 8, 0.5, per_row=3) == 12
    assert rows.count(4, 40, 0.25) == 4 * 10
    with pytest.raises(ValueError, match=r"40 spectral entries asked for a 4x8 factor, but basis 'haar' has only 32"):
        haar.count(4, 8, 0.5, per_row=10)


def test_index_sets_are_seeded_sorted_and_stored_as_masks():
    first = IndexSet.draw("haar", 8, 40, 100, seed=0)
    assert torch.equal(first.indices, IndexSet.draw("haar", 8, 40, 100, seed=0).indices)
    assert not torch.equal(first.indices, IndexSet.draw("haar", 8, 40, 100, seed=1).indices)
    assert not torch.equal(first.indices, IndexSet.draw("haar", 8, 42, 100, seed=0).indices)
    assert torch.all(first.indices[1:] > first.indices[:-1]) and first.indices.max() < 320
    mask = first.mask()
    assert mask.dtype == torch.uint8 and mask.numel() == 320 // 8
    assert torch.equal(IndexSet.from_mask("haar", 8, 40, mask).indices, first.indices)
    per_row = IndexSet.draw("dct_rows", 4, 10, 12, seed=0, shared_rows=True).indices.view(4, 3)
    assert torch.equal(per_row % 10, (per_row % 10)[:1].expand(4, 3))  # the same 3 columns in every row


@pytest.mark.parametrize("name", ALL)
def test_decoded_factor_at_init_has_loras_variance(name):
    """Kaiming on the spectral entries, then calibrated: the decoded (32 x 4096) factor's variance is within 10%
    of LoRA's kaiming-uniform A (bound 1/sqrt(4096): variance 1 / (3 * 4096)), at ratios 0.5 and 0.2."""
    lora_variance = 1.0 / (3 * 4096)
    basis = bases.get(name)
    for ratio in (0.5, 0.2):
        index_set = IndexSet.draw(name, 32, 4096, basis.count(32, 4096, ratio), seed=0)
        factor = SpectralFactor(32, 4096, name, index_set, zero=False, generator=torch.Generator().manual_seed(0),
                                device=torch.device("cpu"))
        variance = factor().detach().double().var().item()
        assert abs(variance / lora_variance - 1) < 0.10, (name, ratio, variance / lora_variance)


def test_config_validates_basis_names_against_the_registry():
    with pytest.raises(selora.ConfigValueError, match=r"basis='db5': choose one of \('haar', 'db4'"):
        selora.SeLoRAConfig(basis="db5")
    assert selora.SeLoRAConfig().basis == "haar"
    assert selora.SeLoRAConfig(basis="dct").basis == "dct_rows"  # the pre-0.2 name still loads
    with pytest.raises(selora.ConfigValueError, match="shared_locations=False applies to the row-wise bases only"):
        selora.SeLoRAConfig(shared_locations=False)


def test_decode_is_exact_under_bf16_autocast():
    """The recipes run the model under bf16 autocast; the transforms' matmuls must still run in float32."""
    basis = bases.get("db4")
    index_set = IndexSet.draw("db4", 8, 64, 256, seed=0)
    entries = torch.randn(256, generator=torch.Generator().manual_seed(0))
    plain = basis.decode(entries, index_set.indices, 8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = basis.decode(entries, index_set.indices, 8, 64)
        grad = basis.adjoint(plain, index_set.indices)
    assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)
    assert grad.dtype == torch.float32 and torch.equal(grad, basis.adjoint(plain, index_set.indices))


def test_basis_caches_are_bounded_and_clear_caches_frees_them():
    spectra = {name: torch.randn(6, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
               for name in ("haar", "db4", "dct_rows", "dft_rows")}

    def synthesize_all():
        return {name: bases.get(name).synthesize(spectrum if name != "dft_rows" else spectrum[:, :21], 40)
                for name, spectrum in spectra.items()}

    before = synthesize_all()
    assert all(cache.cache_info().currsize > 0 for cache in bases.CACHES)
    for length in range(2, 2 * bases.basis.CACHE_SIZE + 10, 2):  # more sizes than any cache may hold
        for name in ("haar", "dct_rows", "dft_rows"):
            rows = length if name == "haar" else 2
            n = bases.get(name).spectral_shape(rows, length)[1]
            bases.get(name).synthesize(torch.zeros(rows, n), length)
    assert all(cache.cache_info().currsize <= bases.basis.CACHE_SIZE for cache in bases.CACHES)
    bases.clear_caches()
    assert all(cache.cache_info().currsize == 0 for cache in bases.CACHES)
    after = synthesize_all()
    for name in spectra:
        assert torch.equal(before[name], after[name]), name
