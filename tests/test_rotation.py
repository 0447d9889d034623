"""Rotation angles at target occurrences: parity with numpy/scipy, padding, baseline draws."""
import numpy as np
import polars as pl
import pytest
import scipy.stats
import torch

from probe_core.rotation import rotation_angles, rotation_tests, shuffle_draws, target_occurrences

HER = 607
EOS = 50256
TEXT_A = "She gave her the book and then her friend took her coat."
TEXT_B = "I met her today."


def np_angle(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.arccos(np.clip(cos, -1.0, 1.0))


def assert_angles_close(ours, ref):
    """Angles agree to 1e-5 rad; near 0, float32 arccos is ill-conditioned (~3e-4 rad for equal
    vectors), so there the cosines must agree instead."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    np.testing.assert_allclose(np.cos(ours), np.cos(ref), atol=1e-6)
    wide = ref > 0.05
    np.testing.assert_allclose(ours[wide], ref[wide], atol=1e-5)


def forward(model, ids, mask=None):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return torch.stack(out.hidden_states)


def padded_batch(tokenizer, texts):
    rows = [tokenizer(t)["input_ids"] for t in texts]
    n_tok = max(map(len, rows))
    ids = torch.full((len(rows), n_tok), EOS, dtype=torch.long)
    mask = torch.zeros((len(rows), n_tok), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def test_target_occurrences_rules():
    ids = np.array([[HER, 5, HER, HER, 9], [3, HER, EOS, HER, HER]])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 1, 1]])
    b, t = target_occurrences(ids, HER, mask)
    # (0, 0): no previous token; (1, 3): previous is padding.
    assert list(zip(b.tolist(), t.tolist())) == [(0, 2), (0, 3), (1, 1), (1, 4)]
    assert b.dtype == np.int64 and t.dtype == np.int64
    b2, t2 = target_occurrences(torch.as_tensor(ids), HER)
    assert list(zip(b2.tolist(), t2.tolist())) == [(0, 2), (0, 3), (1, 1), (1, 3), (1, 4)]


def test_eos_padding_is_not_an_occurrence(gpt2_tokenizer):
    ids, mask = padded_batch(gpt2_tokenizer, ["a<|endoftext|>b c d e", "x<|endoftext|>"])
    b, t = target_occurrences(ids, EOS, mask)
    assert list(zip(b.tolist(), t.tolist())) == [(0, 1), (1, 1)]


def test_angles_match_numpy_on_tiny_model(tiny_model, gpt2_tokenizer):
    ids = torch.tensor([gpt2_tokenizer(TEXT_A)["input_ids"]])
    hidden = forward(tiny_model, ids)
    b, t = target_occurrences(ids, HER)
    assert len(t) == 3
    out = rotation_angles(hidden, b, t, seeds=np.array([7]))
    h = hidden.numpy()
    n_layers = h.shape[0] - 1
    for key in ("target", "previous", "shuffled"):
        assert out[key].shape == (3, n_layers) and out[key].dtype == np.float32
    ref_target = np_angle(h[:-1, b, t], h[1:, b, t]).T
    ref_prev = np_angle(h[:-1, b, t - 1], h[1:, b, t - 1]).T
    np.testing.assert_allclose(out["target"], ref_target, atol=1e-5)
    np.testing.assert_allclose(out["previous"], ref_prev, atol=1e-5)
    la, lb, pa, pb = shuffle_draws(7, 3, n_layers, np.arange(ids.shape[1]))
    assert_angles_close(out["shuffled"], np_angle(h[la, 0, pa], h[lb, 0, pb]))


def test_padding_does_not_change_real_angles(tiny_model, gpt2_tokenizer):
    ids, mask = padded_batch(gpt2_tokenizer, [TEXT_A, TEXT_B])
    assert (mask[1] == 0).any()
    b, t = target_occurrences(ids, HER, mask)
    assert mask.numpy()[b, t].all() and mask.numpy()[b, t - 1].all()
    assert np.bincount(b).tolist() == [3, 1]
    seeds = np.array([11, 12])
    batched = rotation_angles(forward(tiny_model, ids, mask), b, t, seeds, attention_mask=mask)
    for i, text in enumerate([TEXT_A, TEXT_B]):
        alone_ids = torch.tensor([gpt2_tokenizer(text)["input_ids"]])
        ab, at = target_occurrences(alone_ids, HER)
        np.testing.assert_array_equal(at, t[b == i])
        alone = rotation_angles(forward(tiny_model, alone_ids), ab, at, seeds[i : i + 1])
        for key in ("target", "previous", "shuffled"):
            assert_angles_close(batched[key][b == i], alone[key])


def test_shuffled_reproducible_batch_independent_real_only():
    g = torch.Generator().manual_seed(0)
    n_stack, n_tok, d = 5, 9, 8
    seq = torch.randn(n_stack, 1, n_tok, d, generator=g)
    other = torch.randn(n_stack, 1, n_tok + 4, d, generator=g)
    # The same sequence, right-padded with garbage inside a batch of 2 (at index 1).
    garbage = torch.randn(n_stack, 1, 4, d, generator=g) * 100
    batch = torch.cat([other, torch.cat([seq, garbage], dim=2)], dim=1)
    mask = np.ones((2, n_tok + 4), dtype=bool)
    mask[1, n_tok:] = False
    t_alone = np.array([2, 5, 8])
    alone = rotation_angles(seq, np.zeros(3, np.int64), t_alone, np.array([42]))
    again = rotation_angles(seq, np.zeros(3, np.int64), t_alone, np.array([42]))
    np.testing.assert_array_equal(alone["shuffled"], again["shuffled"])
    # Occurrences given out of order and interleaved with another sequence's.
    b_idx, t_idx = np.array([1, 0, 1, 0, 1]), np.array([8, 3, 2, 7, 5])
    inb = rotation_angles(batch, b_idx, t_idx, np.array([5, 42]), attention_mask=mask)
    np.testing.assert_array_equal(inb["shuffled"][b_idx == 1], alone["shuffled"][[2, 0, 1]])
    other_seed = rotation_angles(seq, np.zeros(3, np.int64), t_alone, np.array([43]))
    assert not np.array_equal(other_seed["shuffled"], alone["shuffled"])


def test_shuffle_draws_ranges():
    real = np.array([0, 1, 2, 5, 6])
    la, lb, pa, pb = shuffle_draws(3, 200, 4, real)
    assert la.shape == (200, 4) and la.min() == 1 and lb.max() == 4
    assert set(np.unique(pa)) == set(real) and set(np.unique(pb)) == set(real)


def test_rotation_tests_matches_scipy_loop():
    rng = np.random.default_rng(0)
    n, n_layers = 40, 6
    target = rng.normal(1.0, 0.2, (n, n_layers)) + np.linspace(0, 0.3, n_layers)
    previous = rng.normal(1.0, 0.2, (n, n_layers))
    shuffled = rng.normal(1.5, 0.1, (n, n_layers))
    table = rotation_tests(target, previous, shuffled, alpha=0.05)
    assert table.schema == pl.Schema(
        {"layer": pl.Int16, "n": pl.Int32, "mean_target_rad": pl.Float64, "mean_previous_rad": pl.Float64,
         "mean_shuffled_rad": pl.Float64, "t": pl.Float64, "p": pl.Float64, "significant": pl.Boolean,
         "d_z": pl.Float64, "diff_ci_low_rad": pl.Float64, "diff_ci_high_rad": pl.Float64}
    )
    assert table["layer"].to_list() == list(range(1, n_layers + 1))
    for l in range(n_layers):
        ref = scipy.stats.ttest_rel(target[:, l], previous[:, l])
        row = table.row(l, named=True)
        assert row["n"] == n
        np.testing.assert_allclose([row["t"], row["p"]], [ref.statistic, ref.pvalue], rtol=1e-10)
        np.testing.assert_allclose(row["mean_target_rad"], target[:, l].mean(), rtol=1e-12)
        np.testing.assert_allclose(row["mean_previous_rad"], previous[:, l].mean(), rtol=1e-12)
        np.testing.assert_allclose(row["mean_shuffled_rad"], shuffled[:, l].mean(), rtol=1e-12)
        assert row["significant"] == (ref.pvalue < 0.05 / n_layers)
        ci = ref.confidence_interval(0.95)
        np.testing.assert_allclose([row["diff_ci_low_rad"], row["diff_ci_high_rad"]], [ci.low, ci.high], rtol=1e-10)
        diff = target[:, l] - previous[:, l]
        np.testing.assert_allclose(row["d_z"], diff.mean() / np.std(diff, ddof=1), rtol=1e-10)
        np.testing.assert_allclose(row["d_z"], ref.statistic / np.sqrt(n), rtol=1e-10)  # d_z = t / sqrt(n)
    assert table["significant"].any() and not table["significant"].all()


@pytest.mark.parametrize("n", [0, 1])
def test_rotation_tests_too_few(n):
    x = np.ones((n, 3))
    table = rotation_tests(x, x, x)
    assert table.height == 3 and table["n"].to_list() == [n] * 3
    assert table["t"].is_nan().all() and table["p"].is_nan().all()
    assert table["d_z"].is_nan().all() and table["diff_ci_low_rad"].is_nan().all()
    assert not table["significant"].any()


def test_bad_input():
    hidden = torch.zeros(4, 2, 6, 8)
    ok_b, ok_t, seeds = np.array([0, 1]), np.array([1, 2]), np.array([1, 2])
    with pytest.raises(ValueError, match="hidden"):
        rotation_angles(hidden[0], ok_b, ok_t, seeds)
    with pytest.raises(ValueError, match="seeds"):
        rotation_angles(hidden, ok_b, ok_t, np.array([1]))
    with pytest.raises(ValueError, match="seeds"):
        rotation_angles(hidden, ok_b, ok_t, np.array([1, -2]))
    with pytest.raises(ValueError, match="b_idx and t_idx"):
        rotation_angles(hidden, ok_b, np.array([1]), seeds)
    with pytest.raises(ValueError, match="attention_mask"):
        rotation_angles(hidden, ok_b, ok_t, seeds, attention_mask=np.ones((2, 5)))
    with pytest.raises(ValueError, match="t_idx out of range"):
        rotation_angles(hidden, ok_b, np.array([0, 2]), seeds)
    with pytest.raises(ValueError, match="b_idx out of range"):
        rotation_angles(hidden, np.array([0, 2]), ok_t, seeds)
    mask = np.ones((2, 6), dtype=bool)
    mask[1, 1] = False
    with pytest.raises(ValueError, match="padded"):
        rotation_angles(hidden, ok_b, ok_t, seeds, attention_mask=mask)
    with pytest.raises(ValueError, match="input_ids"):
        target_occurrences(np.zeros(5, dtype=int), HER)
    with pytest.raises(ValueError, match="attention_mask"):
        target_occurrences(np.zeros((2, 5), dtype=int), HER, np.ones((2, 4)))
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="shape"):
        rotation_tests(x, x, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="shape"):
        rotation_tests(x[:, 0], x[:, 0], x[:, 0])
