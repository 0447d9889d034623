"""Parity of the vectorized MI estimators with numpy's histogram2d (per pair) and sklearn's KSG."""
import functools

import numpy as np
import pytest
import torch
from sklearn.feature_selection import mutual_info_regression

from probe_core import mutual_info as mi
from probe_core.mutual_info import (
    histogram_mi_matrix, ksg_mi_column, ksg_mi_matrix, mi_summary, notebook_pair_mi, upper_pairs,
)


def pairwise_reference(x, bins=15):
    d = x.shape[1]
    return np.array([[notebook_pair_mi(x[:, i], x[:, j], bins=bins) for j in range(d)] for i in range(d)])


def independent_reference(x, bins):
    """MI from first principles (no histogram2d): own equal-width bins, plug-in entropies in bits."""
    def codes(col):
        lo, hi = col.min(), col.max()
        if lo == hi:
            return np.zeros(col.shape, dtype=int)
        return np.clip(np.searchsorted(np.linspace(lo, hi, bins + 1), col, side="right") - 1, 0, bins - 1)

    def entropy(*cs):
        _, counts = np.unique(np.stack(cs), axis=1, return_counts=True)
        p = counts / counts.sum()
        return -np.sum(p * np.log2(p))

    c = [codes(x[:, k]) for k in range(x.shape[1])]
    d = x.shape[1]
    return np.array([[entropy(c[i]) + entropy(c[j]) - entropy(c[i], c[j]) for j in range(d)] for i in range(d)])


def awkward_data(n, d, seed, dtype=np.float32):
    """Gaussian, correlated, tied, constant, heavy-tailed, max-repeated and large-offset columns."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    x[:, 1] = x[:, 0] + 0.3 * rng.standard_normal(n)
    x[:, 2] = np.round(x[:, 2] * 2) / 2  # heavy ties, values land exactly on edges
    x[:, 3] = 7.25  # constant: numpy widens the range to (v-0.5, v+0.5)
    x[:, 4] = rng.standard_cauchy(n)  # heavy tails: most values in one or two bins
    x[:, 5] = rng.integers(0, 4, n)  # few distinct values
    x[: n // 4, 6] = x[:, 6].max()  # many values equal to the last edge
    x[:, 7] = 1e4 + rng.standard_normal(n) * 1e-3  # large offset, fine spacing
    x[:, 8] = np.exp(3 * rng.standard_normal(n))  # log-normal
    x[:, 9] = x[:, 8] ** 2 * np.sign(rng.standard_normal(n))
    return x.astype(dtype)


@pytest.mark.parametrize("n,d,seed,dtype,bins", [
    (50, 20, 0, np.float32, 15), (117, 21, 1, np.float32, 15), (200, 19, 2, np.float64, 15),
    (64, 12, 3, np.float32, 2), (150, 16, 4, np.float64, 7),
])
def test_histogram_matrix_matches_notebook_every_pair(n, d, seed, dtype, bins):
    x = awkward_data(n, d, seed, dtype)
    got = histogram_mi_matrix(x, bins=bins)
    ref = pairwise_reference(x, bins)
    assert got.shape == (d, d) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    assert np.abs(got[3]).max() < 1e-12  # a constant column carries no information
    np.testing.assert_array_equal(got, got.T)


def test_reference_agrees_with_first_principles():
    # guards the notebook function itself (and so every parity test above) against a shared mistake
    x = awkward_data(90, 10, 5, np.float64)
    np.testing.assert_allclose(pairwise_reference(x, 15), independent_reference(x, 15), atol=1e-9)


def test_blocking_token_chunks_and_torch_input_agree(monkeypatch):
    x = awkward_data(120, 17, 6)
    ref = pairwise_reference(x)
    np.testing.assert_allclose(histogram_mi_matrix(x, block_dims=4), ref, atol=1e-9)
    np.testing.assert_allclose(histogram_mi_matrix(torch.from_numpy(x), block_dims=1), ref, atol=1e-9)
    monkeypatch.setattr(mi, "_ONEHOT_BYTES", 7 * 15 * 13)  # int8 one-hots of 13 tokens: counts summed over chunks
    np.testing.assert_allclose(histogram_mi_matrix(x, block_dims=7), ref, atol=1e-9)


def test_gpu_code_path_and_int8_fallback_on_cpu(monkeypatch):
    x = awkward_data(120, 17, 12)
    ref = pairwise_reference(x)

    def no_int_mm(*args):
        raise RuntimeError("no int8 GEMM here")

    monkeypatch.setattr(torch, "_int_mm", no_int_mm)
    monkeypatch.setattr(mi, "_use_bincount", lambda device, n: False)  # the one-hot paths on any CPU
    monkeypatch.setattr(mi, "_onehot_dtype", lambda device, n: torch.int8)
    np.testing.assert_allclose(histogram_mi_matrix(x, block_dims=6), ref, atol=1e-9)
    # what a GPU runs: float32 one-hot products and the torch float64 entropy sums
    monkeypatch.setattr(mi, "_onehot_dtype", lambda device, n: torch.float32)
    monkeypatch.setattr(mi, "_sum_xlogx", functools.partial(mi._sum_xlogx, use_numpy=False))
    np.testing.assert_allclose(histogram_mi_matrix(x, block_dims=5), ref, atol=1e-9)


def test_integer_and_half_inputs():
    rng = np.random.default_rng(7)
    xi = rng.integers(-5, 40, size=(80, 9))
    np.testing.assert_allclose(histogram_mi_matrix(xi), pairwise_reference(xi), atol=1e-9)
    xh = torch.from_numpy(np.clip(awkward_data(80, 11, 8), -6e4, 6e4)).half()
    np.testing.assert_allclose(histogram_mi_matrix(xh), pairwise_reference(xh.float().numpy()), atol=1e-9)


def test_diagonal_is_binned_entropy():
    x = awkward_data(100, 10, 9)
    diag = np.diag(histogram_mi_matrix(x))
    np.testing.assert_allclose(diag, [notebook_pair_mi(x[:, k], x[:, k]) for k in range(10)], atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_edges_and_codes_bit_identical_to_numpy(dtype):
    x = awkward_data(150, 12, 10, dtype)
    x[:, 10] = np.linspace(-1, 1, 150) * np.finfo(dtype).tiny  # denormal-scale range
    x[:, 11] = np.arange(150) % 2 * np.finfo(dtype).smallest_subnormal  # step underflows: numpy's special path
    lo, hi = x.min(0), x.max(0)
    edges = mi._numpy_edges(lo, hi, 15)
    codes = mi._bin_codes(torch.from_numpy(x), 15).numpy()
    for k in range(12):
        _, ref_edges, _ = np.histogram2d(x[:, k], x[:, k], bins=15)
        np.testing.assert_array_equal(edges[k], ref_edges)
        assert edges.dtype == ref_edges.dtype
        hist, _, _ = np.histogram2d(x[:, k], x[:, k], bins=15)
        np.testing.assert_array_equal(np.bincount(codes[k], minlength=15), hist.sum(1))


def test_real_hidden_states_of_tiny_model(tiny_model, gpt2_tokenizer):
    text = "The quick brown fox jumps over the lazy dog while Alice reads a book in Paris."
    ids = gpt2_tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = tiny_model(ids, output_hidden_states=True).hidden_states
    assert len(hidden) == 4
    for layer in (0, 2, 3):
        h = hidden[layer][0]  # (n_tokens, 32) float32
        got = histogram_mi_matrix(h)
        np.testing.assert_allclose(got, pairwise_reference(h.numpy()), rtol=0, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_notebook():
    x = awkward_data(200, 20, 11)
    np.testing.assert_allclose(histogram_mi_matrix(x, device="cuda"), pairwise_reference(x), atol=1e-9)


@pytest.mark.parametrize("bad", [np.zeros(10), np.zeros((1, 4)), np.zeros((5, 0)), np.zeros((2, 3, 4))])
def test_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match="2-D"):
        histogram_mi_matrix(bad)


@pytest.mark.parametrize("bins", [1, 0, 2.5, True, "15"])
def test_rejects_bad_bins(bins):
    with pytest.raises(ValueError, match="bins"):
        histogram_mi_matrix(np.random.rand(10, 3), bins=bins)


def test_rejects_non_finite():
    x = np.random.rand(10, 3)
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        histogram_mi_matrix(x)


def test_upper_pairs_row_major():
    m = np.arange(16.0).reshape(4, 4)
    i, j, v = upper_pairs(m)
    expected = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    assert list(zip(i.tolist(), j.tolist())) == expected
    np.testing.assert_array_equal(v, [m[a, b] for a, b in expected])
    assert (i.dtype, j.dtype, v.dtype) == (np.int32, np.int32, np.float64)
    with pytest.raises(ValueError, match="square"):
        upper_pairs(np.zeros((2, 3)))


def ksg_data():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((150, 6))
    x[:, 1] += x[:, 0]
    x[:, 4] = x[:, 2] ** 2 + 0.1 * rng.standard_normal(150)
    return x


def test_ksg_column_is_one_sklearn_call_in_bits():
    x = ksg_data()
    for j in (0, 3, 5):
        expected = mutual_info_regression(x[:, j + 1:], x[:, j], n_neighbors=4, random_state=5) / np.log(2) \
            if j < 5 else np.zeros(0)
        np.testing.assert_array_equal(ksg_mi_column(x, j, seed=5, n_neighbors=4), expected)


def test_ksg_matrix_matches_direct_pairwise_sklearn():
    x = ksg_data()
    got = ksg_mi_matrix(torch.from_numpy(x), seed=0)
    d = x.shape[1]
    for i in range(d):
        assert np.isnan(got[i, i])
        for j in range(i + 1, d):
            direct = mutual_info_regression(x[:, [j]], x[:, i], n_neighbors=3, random_state=0)[0] / np.log(2)
            assert got[i, j] == pytest.approx(direct, abs=1e-9)
            assert got[j, i] == got[i, j]
    assert got[0, 1] > 0.3 and got[2, 4] > 1.0  # dependent pairs are found


def test_ksg_validation():
    with pytest.raises(ValueError, match="column j"):
        ksg_mi_column(ksg_data(), 6, seed=0)
    with pytest.raises(ValueError, match="n_neighbors"):
        ksg_mi_matrix(np.random.rand(3, 2), n_neighbors=3)
    with pytest.raises(ValueError, match="2-D"):
        ksg_mi_matrix(np.random.rand(5))


def test_mi_summary_nan_safe():
    rng = np.random.default_rng(13)
    v = rng.exponential(size=501)
    with_nan = np.concatenate([v, [np.nan] * 7])
    s = mi_summary(with_nan)
    assert s["mean"] == pytest.approx(v.mean(), rel=1e-12)
    assert s["median"] == pytest.approx(np.median(v), rel=1e-12)
    assert s["p05"] == pytest.approx(np.percentile(v, 5), rel=1e-12)
    assert s["p95"] == pytest.approx(np.percentile(v, 95), rel=1e-12)
    empty = mi_summary([np.nan])
    assert set(empty) == {"mean", "median", "p05", "p95"} and all(np.isnan(x) for x in empty.values())


# ---------------------------------------------------------------- Miller-Madow, blocked counts, null
def _mm_numpy(x, y, bins=15):
    """Independent Miller-Madow MI in bits on np.histogram2d counts: each entropy + (K - 1) / (2N) nats."""
    c, _, _ = np.histogram2d(x, y, bins=bins)
    n = c.sum()

    def h(counts):
        counts = counts[counts > 0]
        q = counts / n
        return -(q * np.log(q)).sum() + (counts.size - 1) / (2 * n)

    return (h(c.sum(1)) + h(c.sum(0)) - h(c.ravel())) / np.log(2)


def _dependent(n=400, d=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[:, 3] = x[:, 2] + 0.2 * x[:, 3]
    x[:, 5] = rng.standard_t(2, size=n)
    return x


def test_mi_bits_mm_matches_numpy_miller_madow_and_plugin_matches_notebook():
    from probe_core.mutual_info import bin_codes, bin_edges, histogram_mi_codes

    x = _dependent()
    plug, mm = histogram_mi_codes(bin_codes(x, bin_edges(x.min(0), x.max(0), 15)), 15)
    np.testing.assert_array_equal(plug, histogram_mi_matrix(x))
    for a, b in zip(*np.triu_indices(x.shape[1], 1)):
        assert mm[a, b] == pytest.approx(_mm_numpy(x[:, a], x[:, b]), abs=1e-12)
        assert plug[a, b] == pytest.approx(notebook_pair_mi(x[:, a], x[:, b]), abs=1e-12)


def test_blocked_accumulation_equals_one_shot(monkeypatch):
    from probe_core import mutual_info as mi

    x = _dependent(n=301)
    codes = np.concatenate([mi.bin_codes(x[a:a + 50], mi.bin_edges(x.min(0), x.max(0), 15)) for a in range(0, 301, 50)])
    one_plug, one_mm = mi.histogram_mi_codes(codes, 15)
    monkeypatch.setattr(mi, "_use_bincount", lambda device, n: False)  # the one-hot path on any CPU
    monkeypatch.setattr(mi, "_onehot_dtype", lambda device, n: torch.float32)
    for onehot_bytes in (15 * 3 * 40 * 4,  # token chunks of 40 tokens
                         301 * 15 * 3 * 4 * 2):  # one token chunk, but not all dims: block one-hots reused
        monkeypatch.setattr(mi, "_ONEHOT_BYTES", onehot_bytes)
        blk_plug, blk_mm = mi.histogram_mi_codes(codes, 15, block_dims=3)
        np.testing.assert_allclose(blk_plug, one_plug, atol=1e-12)
        np.testing.assert_allclose(blk_mm, one_mm, atol=1e-12)


@pytest.mark.parametrize("key_bytes", [None, 8 * 6 * 5 * 7])  # default, and token chunks of 7
def test_bincount_path_equals_notebook_and_onehot(monkeypatch, key_bytes):
    """The CPU path without a fast int8 GEMM (bincount of combined codes), whatever this CPU has."""
    x = _dependent(n=301, d=13)
    codes = mi.bin_codes(x, mi.bin_edges(x.min(0), x.max(0), 15))
    monkeypatch.setattr(mi, "_use_bincount", lambda device, n: False)
    one_plug, one_mm = mi.histogram_mi_codes(codes, 15)
    monkeypatch.setattr(mi, "_use_bincount", lambda device, n: True)
    if key_bytes:
        monkeypatch.setattr(mi, "_BINCOUNT_KEY_BYTES", key_bytes)
    for block in (None, 5, 6):
        plug, mm = mi.histogram_mi_codes(codes, 15, block_dims=block)
        np.testing.assert_allclose(plug, one_plug, atol=1e-12)
        np.testing.assert_allclose(mm, one_mm, atol=1e-12)
    np.testing.assert_allclose(histogram_mi_matrix(x, block_dims=4), pairwise_reference(x), atol=1e-9)


def test_pair_block_counts_equal_numpy_histogram2d():
    rng = np.random.default_rng(3)
    ci, cj = rng.integers(0, 4, size=(3, 50)), rng.integers(0, 4, size=(2, 50)).astype(np.uint8)
    counts = mi.pair_block_counts(ci, cj, 4)
    assert counts.shape == (3, 2, 16) and counts.dtype == np.int64
    for a in range(3):
        for b in range(2):
            ref, _, _ = np.histogram2d(ci[a], cj[b], bins=4, range=[[0, 4], [0, 4]])
            np.testing.assert_array_equal(counts[a, b].reshape(4, 4), ref)


@pytest.mark.parametrize("key_bytes", [None, 8 * 7 * 9])  # default, and token chunks of 9
def test_pair_bincount_equals_matrix(monkeypatch, key_bytes):
    from probe_core.mutual_info import bin_codes, bin_edges, histogram_mi_codes, pair_mi_codes

    if key_bytes:
        monkeypatch.setattr(mi, "_BINCOUNT_KEY_BYTES", key_bytes)
    x = _dependent()
    codes = bin_codes(x, bin_edges(x.min(0), x.max(0), 15))
    i, j = np.triu_indices(x.shape[1], 1)
    np.testing.assert_allclose(pair_mi_codes(codes, i, j, 15, pair_block=7), histogram_mi_codes(codes, 15)[0][i, j], atol=1e-12)


def test_null_is_seeded_and_keeps_marginals():
    from probe_core.mutual_info import null_codes, null_pairs

    codes = np.random.default_rng(0).integers(0, 15, (200, 8)).astype(np.uint8)
    a, b, c = null_codes(codes, 1), null_codes(codes, 1), null_codes(codes, 2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(np.sort(a, 0), np.sort(codes, 0))
    i, j = null_pairs(100, 50, seed=3)
    i2, j2 = null_pairs(100, 50, seed=3)
    np.testing.assert_array_equal(i, i2) and np.testing.assert_array_equal(j, j2)
    assert (i < j).all() and len(set(zip(i, j))) == 50
    assert len(null_pairs(5, 50)[0]) == 10


def test_null_mean_tracks_theoretical_bias():
    from probe_core.mutual_info import bin_codes, bin_edges, null_codes, null_pairs, pair_mi_codes, plugin_bias_bits

    x = _dependent(n=2048, d=12)
    codes = bin_codes(x, bin_edges(x.min(0), x.max(0), 15))
    i, j = null_pairs(12, 66)
    null = pair_mi_codes(null_codes(codes, 0), i, j, 15)
    # Gaussian tails leave outer bins sparse, so the bias is below (B-1)^2/(2N ln 2) but of its order
    assert 0.2 * plugin_bias_bits(2048) < null.mean() < 1.5 * plugin_bias_bits(2048)


def test_read_only_codes_as_from_the_object_store_give_no_warning_and_same_values():
    """A Ray task gets its codes as a read-only array; torch warned on every MI run."""
    import warnings

    from probe_core.mutual_info import bin_codes, bin_edges, histogram_mi_codes

    x = _dependent()
    codes = bin_codes(x, bin_edges(x.min(0), x.max(0), 15))
    expected = histogram_mi_codes(codes.copy(), 15)
    codes.flags.writeable = False
    x.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = histogram_mi_codes(codes, 15)
        np.testing.assert_array_equal(bin_codes(x, bin_edges(x.min(0), x.max(0), 15)), codes)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
