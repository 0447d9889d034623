"""Parity of the per-neuron logistic statistics with statsmodels, plus degenerate-input handling."""
import warnings

import numpy as np
import polars as pl
import pytest
import statsmodels.api as sm
import torch
from statsmodels.stats.multitest import multipletests
from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationWarning

from probe_core.neurons import (
    auroc_per_neuron,
    benjamini_hochberg,
    bonferroni_significant,
    draw_in_shard,
    fit_logit_per_neuron,
    neuron_logit_table,
    sample_allocation,
)

TEXT = (
    "Alice met Bob in Paris before the Olympic Games. Later, Marie Curie and Albert Einstein spoke in Brussels "
    "about the Solvay conference, while John visited London and Tokyo with Mary. The river Thames flows past "
    "Westminster; the Seine runs through Paris. In March, Google and Microsoft opened offices near Berlin, and "
    "Angela Merkel greeted Emmanuel Macron at the Elysee. We walked home slowly, talking about the weather."
)


def make_random(n=300, k=50, seed=0):
    """Activations with varied effects (including none) on a latent that drives 0/1 labels."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal(n)
    y = (rng.random(n) < 1 / (1 + np.exp(-1.5 * latent))).astype(np.float64)
    effect = np.linspace(-1.5, 1.5, k)
    x = effect * latent[:, None] + rng.standard_normal((n, k))
    x = x * rng.uniform(0.2, 4.0, k) + rng.normal(0.0, 3.0, k)  # arbitrary scale and offset per neuron
    return x, y


def statsmodels_fit(x_col, y, strict=False):
    """(beta, se, p, beta0) of statsmodels Logit on one neuron; strict turns its fit warnings into errors."""
    with warnings.catch_warnings():
        if strict:
            warnings.simplefilter("error", ConvergenceWarning)
            warnings.simplefilter("error", PerfectSeparationWarning)
        res = sm.Logit(y, sm.add_constant(np.asarray(x_col, dtype=np.float64), has_constant="add")).fit(disp=0)
    return res.params[1], res.bse[1], res.pvalues[1], res.params[0]


def assert_matches_statsmodels(fit, x, y, cols, strict=True):
    for j in cols:
        beta, se, p, beta0 = statsmodels_fit(x[:, j], y, strict=strict)
        np.testing.assert_allclose([fit["beta"][j], fit["se"][j], fit["p"][j]], [beta, se, p], rtol=1e-6)
        np.testing.assert_allclose(fit["beta0"][j], beta0, rtol=1e-6, atol=1e-9)


def test_random_data_matches_statsmodels():
    x, y = make_random()
    fit = fit_logit_per_neuron(x, y)
    assert (fit["status"] == "ok").all() and fit["converged"].all()
    assert (fit["n"] == len(y)).all() and (fit["n_iter"] >= 1).all()
    assert fit["p"].min() < 1e-6 and fit["p"].max() > 0.05  # the data spans strong and null effects
    assert_matches_statsmodels(fit, x, y, range(x.shape[1]))
    np.testing.assert_allclose(fit["z"], fit["beta"] / fit["se"], rtol=1e-12)


def test_input_types_and_blocks_agree():
    x, y = make_random(n=200, k=40, seed=1)
    ref = fit_logit_per_neuron(x, y)
    from_torch = fit_logit_per_neuron(torch.from_numpy(x), torch.from_numpy(y).bool(), device="cpu")
    for key in ("beta", "se", "p", "beta0"):
        np.testing.assert_array_equal(from_torch[key], ref[key])
    x16 = x.astype(np.float16)  # the job's storage dtype: fitted exactly on the rounded values
    x16.flags.writeable = False  # as arrays from Ray's object store: must not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit16 = fit_logit_per_neuron(x16, y.astype(np.int64))
    assert_matches_statsmodels(fit16, x16.astype(np.float64), y, range(0, 40, 7))


def test_block_splitting_gives_same_result(monkeypatch):
    import probe_core.neurons as neurons

    x, y = make_random(n=150, k=70, seed=2)
    ref = fit_logit_per_neuron(x, y)
    monkeypatch.setattr(neurons, "_BLOCK_BYTES", {"cpu": 1, "cuda": 1})  # minimum-size blocks
    split = fit_logit_per_neuron(x, y)
    assert split["converged"].all() and ref["converged"].all()
    # Step counts depend on the block (its float32 phase ends when most of its rows are close), and
    # converged rows may take extra ~1e-12 steps in a larger block: values agree to far below 1e-6.
    for key in ("beta", "se", "p", "beta0"):
        np.testing.assert_allclose(split[key], ref[key], rtol=1e-9)


def test_offset_activations_are_well_conditioned():
    rng = np.random.default_rng(3)
    y = (rng.random(400) < 0.4).astype(float)
    x = 40.0 + 0.5 * rng.standard_normal((400, 6)) + 0.3 * y[:, None] * np.arange(6)
    fit = fit_logit_per_neuron(x, y)
    assert_matches_statsmodels(fit, x, y, range(6))


def test_tiny_model_pre_gelu_activations_match_statsmodels(tiny_model, gpt2_tokenizer):
    ids = gpt2_tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :200]
    captured = {}
    hooks = [
        block.mlp.c_fc.register_forward_hook(lambda mod, inp, out, l=l: captured.__setitem__(l, out[0].detach()))
        for l, block in enumerate(tiny_model.transformer.h)
    ]
    try:
        with torch.no_grad():
            tiny_model(ids)
    finally:
        for h in hooks:
            h.remove()
    tokens = gpt2_tokenizer.convert_ids_to_tokens(ids[0].tolist())
    y = np.array([t.startswith("Ġ") and t[1:2].isupper() for t in tokens], dtype=np.float64)  # capitalized word
    assert 10 < y.sum() < len(y) - 10
    for layer, acts in sorted(captured.items()):
        x = acts.numpy()
        assert x.shape == (len(y), tiny_model.config.n_inner)
        fit = fit_logit_per_neuron(x, y)
        ok = np.flatnonzero(fit["status"] == "ok")
        assert len(ok) >= 0.9 * x.shape[1], f"layer {layer}: {np.unique(fit['status'], return_counts=True)}"
        assert_matches_statsmodels(fit, x.astype(np.float64), y, ok)


def test_constant_and_separated_neurons_are_flagged_with_nan():
    rng = np.random.default_rng(4)
    y = np.repeat([0.0, 1.0], 50)
    complete = y + rng.uniform(0.1, 0.9, 100)  # classes in disjoint ranges
    quasi = y.copy()
    quasi[0] = 1.0  # one negative tied with the positives: quasi-complete separation
    reverse = -complete
    x = np.column_stack([np.full(100, 3.0), complete, quasi, reverse])
    fit = fit_logit_per_neuron(x, y)
    assert fit["status"].tolist() == ["constant", "separation", "separation", "separation"]
    for key in ("beta", "beta0", "se", "z", "p"):
        assert np.isnan(fit[key]).all()
    assert not fit["converged"].any()
    for j in (1, 2):  # statsmodels itself cannot fit these and only warns
        with pytest.warns(Warning):
            statsmodels_fit(x[:, j], y)


def test_mixed_batch_keeps_good_neurons_exact():
    x, y = make_random(n=250, k=12, seed=5)
    alone = fit_logit_per_neuron(x, y)
    bad = np.column_stack([np.zeros(250), y * 2.0 - 1.0, x[:, 0]])
    bad[::10, 2] = np.nan  # a neuron with missing values: those samples are dropped for it only
    mixed = np.column_stack([x[:, :6], bad, x[:, 6:]])
    fit = fit_logit_per_neuron(mixed, y)
    good = np.r_[0:6, 9:15]
    for key in ("beta", "se", "p", "beta0"):
        np.testing.assert_allclose(fit[key][good], alone[key], rtol=1e-9)
    assert fit["status"][6:9].tolist() == ["constant", "separation", "ok"]
    keep = ~np.isnan(bad[:, 2])
    assert fit["n"][8] == keep.sum() and (fit["n"][good] == 250).all()
    beta, se, p, _ = statsmodels_fit(bad[keep, 2], y[keep], strict=True)
    np.testing.assert_allclose([fit["beta"][8], fit["se"][8], fit["p"][8]], [beta, se, p], rtol=1e-6)


def test_not_converged_is_reported():
    x, y = make_random(n=200, k=10, seed=6)
    fit = fit_logit_per_neuron(x, y, max_iter=2)
    assert (fit["status"] == "not_converged").any() and not fit["converged"][fit["status"] == "not_converged"].any()
    assert (fit["n_iter"] <= 2).all() and np.isfinite(fit["beta"]).all()


@pytest.mark.parametrize(
    "y, match",
    [
        (np.r_[np.zeros(10), np.ones(9), 2.0], "0/1"),
        (np.r_[np.zeros(10), np.ones(9), np.nan], "0/1"),
        (np.ones(20), "both classes"),
        (np.r_[np.zeros(10), np.ones(11)], "shape"),
        (np.zeros((20, 1)), "shape"),
    ],
)
def test_bad_labels_raise(y, match):
    x = np.random.default_rng(0).standard_normal((20, 3))
    with pytest.raises(ValueError, match=match):
        fit_logit_per_neuron(x, y)


def test_bad_x_and_options_raise():
    y = np.r_[np.zeros(5), np.ones(5)]
    with pytest.raises(ValueError, match="2-D"):
        fit_logit_per_neuron(np.zeros(10), y)
    with pytest.raises(ValueError, match="max_iter"):
        fit_logit_per_neuron(np.zeros((10, 2)), y, max_iter=0)


def test_benjamini_hochberg_matches_statsmodels():
    rng = np.random.default_rng(7)
    p = np.concatenate([rng.uniform(0, 1, 200), rng.uniform(0, 1e-4, 30), [0.5, 0.5, 0.5, 0.0, 1.0]])
    rng.shuffle(p)
    np.testing.assert_allclose(benjamini_hochberg(p), multipletests(p, method="fdr_bh")[1], rtol=1e-12)
    with_nan = p.copy()
    with_nan[::9] = np.nan
    q = benjamini_hochberg(with_nan)
    finite = ~np.isnan(with_nan)
    assert np.isnan(q[~finite]).all()
    np.testing.assert_allclose(q[finite], multipletests(with_nan[finite], method="fdr_bh")[1], rtol=1e-12)
    assert np.isnan(benjamini_hochberg(np.full(3, np.nan))).all()


def test_bonferroni_matches_statsmodels():
    rng = np.random.default_rng(8)
    p = np.concatenate([rng.uniform(0, 1, 300), rng.uniform(0, 1e-3, 40)])
    for alpha in (0.05, 0.01):
        np.testing.assert_array_equal(
            bonferroni_significant(p, alpha), multipletests(p, alpha=alpha, method="bonferroni")[0]
        )
    p = np.r_[p, 0.05 / 400]  # significant among 341 tests, not if the NaN below counted (441)
    with_nan = np.r_[p, np.full(100, np.nan)]  # NaN do not count towards m
    sig = bonferroni_significant(with_nan)
    np.testing.assert_array_equal(sig[: len(p)], multipletests(p, method="bonferroni")[0])
    assert sig[len(p) - 1] and not sig[len(p):].any()


def balanced_draw(labels, in_range, shards, max_samples, seed):
    """The job's sample over (n,) labels cut at ``shards`` (shard start indices): allocation, then each
    shard's draw; sorted global indices of the proper nouns, then of the other tokens."""
    bounds = np.r_[shards, len(labels)]
    parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    proper = [int((labels[p] & in_range[p]).sum()) for p in parts]
    other = [int((~labels[p] & in_range[p]).sum()) for p in parts]
    k_proper, k_other = sample_allocation(proper, other, max_samples, seed)
    picked = [p.start + draw_in_shard(labels[p], in_range[p], k_proper[s], k_other[s], seed, s) for s, p in enumerate(parts)]
    picked = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    return np.sort(picked[labels[picked]]), np.sort(picked[~labels[picked]])


def test_sample_allocation_is_multivariate_hypergeometric():
    """Shard shares of one class: sums to k, within each shard's count, and their mean over seeds is
    scipy's multivariate hypergeometric mean (k * count / total)."""
    from scipy.stats import multivariate_hypergeom

    proper, other = (5, 0, 20, 3), (30, 40, 1, 9)
    draws = np.array([sample_allocation(proper, other, 10, seed)[0] for seed in range(3000)])
    assert (draws.sum(1) == 10).all() and (draws <= np.array(proper)).all()
    mean, var = multivariate_hypergeom.mean(proper, 10), multivariate_hypergeom.var(proper, 10)
    se = np.sqrt(var / len(draws))
    assert (np.abs(draws.mean(0) - mean) <= 4 * se + 1e-12).all()
    k_proper, k_other = sample_allocation(proper, other, 1000, 0)
    assert k_proper.tolist() == list(proper)  # k = all 28 proper nouns; as many other tokens
    assert k_other.sum() == 28 and (k_other <= np.array(other)).all()
    rng = np.random.default_rng([4, 0x5A4D])  # the seeding the job's sample is pinned to
    expected = rng.multivariate_hypergeometric(proper, 10), rng.multivariate_hypergeometric(other, 10)
    assert all(np.array_equal(a, b) for a, b in zip(sample_allocation(proper, other, 10, 4), expected))


@pytest.mark.parametrize("proper,other", [((0, 0), (3, 4)), ((3, 4), (0, 0))])
def test_sample_allocation_needs_both_classes(proper, other):
    with pytest.raises(ValueError, match="needs both classes"):
        sample_allocation(proper, other, 5, 0)


def test_draw_in_shard():
    rng = np.random.default_rng(9)
    labels, in_range = rng.random(500) < 0.1, np.arange(500) < 450
    idx = draw_in_shard(labels, in_range, 20, 30, seed=3, shard=5)
    assert idx.dtype == np.int64 and len(np.unique(idx)) == 50 and (idx < 450).all()
    assert labels[idx[:20]].all() and not labels[idx[20:]].any()
    draw = np.random.default_rng([3, 5])
    expected = np.r_[draw.choice(np.flatnonzero(labels & in_range), 20, replace=False),
                     draw.choice(np.flatnonzero(~labels & in_range), 30, replace=False)]
    np.testing.assert_array_equal(idx, expected)
    assert not np.array_equal(idx, draw_in_shard(labels, in_range, 20, 30, seed=3, shard=6))


def test_sample_is_uniform_and_balanced_whatever_the_shards():
    """One shard or several: each class's sample is a uniform k-subset of its in-range tokens, so every
    token is drawn with probability k / (its class's size), the same for both cuts."""
    rng = np.random.default_rng(2)
    labels, in_range = rng.random(300) < 0.2, np.arange(300) < 280
    n_proper, n_other = int((labels & in_range).sum()), int((~labels & in_range).sum())
    k, seeds = 12, 2000
    for shards in ([0], [0, 40, 41, 170, 250]):
        counts = np.zeros(300)
        for seed in range(seeds):
            proper, other = balanced_draw(labels, in_range, shards, k, seed)
            assert len(proper) == len(other) == k and labels[proper].all() and not labels[other].any()
            assert (np.r_[proper, other] < 280).all()
            counts[proper] += 1
            counts[other] += 1
        p = np.where(labels, k / n_proper, k / n_other) * in_range
        se = np.sqrt(p * (1 - p) / seeds)
        assert (np.abs(counts / seeds - p) <= 5 * se + 1e-12).all()
    assert balanced_draw(labels, in_range, [0], 10**6, 0)[0].tolist() == np.flatnonzero(labels & in_range).tolist()


def test_neuron_logit_table():
    x, y = make_random(n=200, k=20, seed=10)
    x[:, 3] = 1.0
    table = neuron_logit_table(x, y, alpha=0.01)
    assert table.schema == pl.Schema({
        "neuron": pl.Int32, "n": pl.Int32, "beta": pl.Float64, "se": pl.Float64, "z": pl.Float64,
        "p": pl.Float64, "beta_ci_low": pl.Float64, "beta_ci_high": pl.Float64, "auroc": pl.Float64,
        "significant": pl.Boolean, "q_bh": pl.Float64, "status": pl.String,
        "converged": pl.Boolean, "n_iter": pl.Int16,
    })
    assert table["neuron"].to_list() == list(range(20)) and table["status"][3] == "constant"
    fit = fit_logit_per_neuron(x, y)
    np.testing.assert_array_equal(table["beta"].to_numpy(), fit["beta"])
    ok = fit["status"] == "ok"
    np.testing.assert_array_equal(table["significant"].to_numpy()[ok],
                                  multipletests(fit["p"][ok], alpha=0.01, method="bonferroni")[0])
    np.testing.assert_allclose(table["q_bh"].to_numpy()[ok], multipletests(fit["p"][ok], method="fdr_bh")[1])
    assert not table["significant"][3] and table["q_bh"].is_nan()[3]


def test_beta_interval_and_auroc_match_statsmodels_and_sklearn():
    from sklearn.metrics import roc_auc_score

    x, y = make_random(n=250, k=12, seed=4)
    x[:, 5] = np.round(x[:, 5])  # many ties: average ranks
    x[:, 7] = 2.0  # constant: no fit, AUROC 0.5
    table = neuron_logit_table(x, y)
    for j in (0, 3, 5, 11):
        res = sm.Logit(y, sm.add_constant(x[:, j])).fit(disp=0)
        np.testing.assert_allclose([table["beta_ci_low"][j], table["beta_ci_high"][j]], res.conf_int()[1], rtol=1e-6)
    np.testing.assert_allclose(table["auroc"].to_numpy(), [roc_auc_score(y, x[:, j]) for j in range(12)], rtol=1e-12)
    assert table["auroc"][7] == 0.5 and np.isnan(table["beta_ci_low"][7])


def test_auroc_leaves_out_non_finite_values_per_neuron():
    from sklearn.metrics import roc_auc_score

    x, y = make_random(n=120, k=4, seed=8)
    x[[0, 5, 9], 1], x[3, 2] = np.nan, np.inf
    got = auroc_per_neuron(x, y)
    for j in range(4):
        keep = np.isfinite(x[:, j])
        assert got[j] == pytest.approx(roc_auc_score(y[keep], x[keep, j]), rel=1e-12)
