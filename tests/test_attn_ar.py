"""Parity of the batched AR(2) fits with statsmodels OLS, and edge cases."""
import numpy as np
import polars as pl
import pytest
import statsmodels.api as sm
import torch

from probe_core.attn_ar import ar2_design, ar2_table, fit_ar2, fit_ar2_pooled, log_norms


def simulate_ar2(rng, n_series, n_tok, b0=0.3, b1=0.5, b2=-0.2, noise=0.3):
    """Stationary AR(2) series (n_series, n_tok), float64."""
    y = np.zeros((n_series, n_tok))
    eps = rng.normal(scale=noise, size=(n_series, n_tok))
    y[:, :2] = eps[:, :2] + b0 / (1 - b1 - b2)
    for t in range(2, n_tok):
        y[:, t] = b0 + b1 * y[:, t - 1] + b2 * y[:, t - 2] + eps[:, t]
    return y


def sm_fit(y_rows, start=3):
    """Reference: statsmodels OLS of y[t] on const, y[t-1], y[t-2], stacking the given 1-D series."""
    yt, y1, y2 = [], [], []
    for y in y_rows:
        idx = np.arange(start, y.size)
        yt.append(y[idx]), y1.append(y[idx - 1]), y2.append(y[idx - 2])
    yt, y1, y2 = map(np.concatenate, (yt, y1, y2))
    X = sm.add_constant(np.column_stack([y1, y2]), has_constant="add")
    return sm.OLS(yt, X, missing="drop").fit()


def assert_matches(ours, i, ref):
    assert ours["status"][i] == "ok"
    assert ours["n"][i] == ref.nobs
    np.testing.assert_allclose([ours[k][i] for k in ("b0", "b1", "b2")], ref.params, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose([ours["p1"][i], ours["p2"][i]], ref.pvalues[1:], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(ours["r2"][i], ref.rsquared, rtol=1e-8, atol=1e-10)


def test_log_norms_matches_numpy():
    x = torch.randn(2, 5, 7, 16, dtype=torch.float64)
    ours = log_norms(x)
    assert ours.dtype == torch.float32 and ours.shape == (2, 5, 7)
    ref = np.log(np.sqrt((x.numpy() ** 2).sum(-1)))
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6)


def test_design_columns_and_start():
    y = np.arange(10.0)
    X, target = ar2_design(y, start=3)
    np.testing.assert_array_equal(target, y[3:])
    np.testing.assert_array_equal(X[:, 1], y[2:9])
    np.testing.assert_array_equal(X[:, 2], y[1:8])  # position 0 never enters with start=3
    np.testing.assert_array_equal(X[:, 0], 1.0)
    with pytest.raises(ValueError, match="start"):
        ar2_design(y, start=1)


def test_fit_ar2_matches_statsmodels():
    rng = np.random.default_rng(0)
    y = simulate_ar2(rng, 4, 80)
    ours = fit_ar2(y)
    for i in range(4):
        assert_matches(ours, i, sm_fit([y[i]]))


@pytest.mark.parametrize("start", [2, 5])
def test_fit_ar2_other_start(start):
    y = simulate_ar2(np.random.default_rng(1), 2, 40)
    ours = fit_ar2(y, start=start)
    for i in range(2):
        assert_matches(ours, i, sm_fit([y[i]], start=start))


def test_fit_ar2_drops_nan_rows():
    rng = np.random.default_rng(2)
    y = simulate_ar2(rng, 3, 60)
    y[0, 40:] = np.nan  # right padding
    y[1, [10, 25, 26]] = np.nan  # holes: drop rows using them as target or lag
    ours = fit_ar2(y)
    for i in range(3):
        assert_matches(ours, i, sm_fit([y[i]]))
    assert ours["n"][1] == 57 - 7  # 57 rows; holes at 10, 25, 26 spoil rows 10-12 and 25-28


def test_pooled_matches_statsmodels_and_never_crosses_series():
    rng = np.random.default_rng(3)
    y = simulate_ar2(rng, 3, 50)
    y[2, 30:] = np.nan
    pooled = fit_ar2_pooled(y)
    assert all(v.shape == (1,) for v in pooled.values())
    assert_matches(pooled, 0, sm_fit(list(y)))
    # Lags spanning the join of two series would change the fit.
    joined = sm_fit([y.reshape(-1)])
    assert not np.isclose(pooled["b1"][0], joined.params[1], rtol=1e-6)


@pytest.mark.parametrize("value", [0.0, 2.3, -1e3])
def test_constant_series_is_singular(value):
    y = np.vstack([np.full(30, value), simulate_ar2(np.random.default_rng(4), 1, 30)[0]])
    out = fit_ar2(y)
    assert list(out["status"]) == ["singular", "ok"]
    assert out["n"][0] == 27
    for k in ("b0", "b1", "b2", "p1", "p2", "r2"):
        assert np.isnan(out[k][0])
    assert fit_ar2_pooled(y)["status"][0] == "ok"


def test_too_few_rows():
    y = simulate_ar2(np.random.default_rng(5), 3, 12)
    y[0, 6:] = np.nan  # 3 usable rows (t = 3, 4, 5): n <= 3
    y[1, 7:] = np.nan  # 4 rows: fits, with 1 residual degree of freedom
    out = fit_ar2(y)
    assert list(out["status"]) == ["too_few", "ok", "ok"]
    assert list(out["n"]) == [3, 4, 9]
    assert np.isnan(out["b1"][0]) and np.isnan(out["r2"][0])
    assert_matches(out, 1, sm_fit([y[1]]))
    for n_tok in (0, 2, 3, 6):
        short = fit_ar2(np.ones((2, n_tok)))
        assert list(short["status"]) == ["too_few", "too_few"]


def test_ar2_table_schema_and_rows():
    rng = np.random.default_rng(6)
    y = simulate_ar2(rng, 3, 40)
    y[2] = 0.5
    table = ar2_table(y, np.array([10, 11, 12]))
    assert table.schema == pl.Schema(
        {"chunk": pl.Int32, "n": pl.Int32, "b0": pl.Float64, "b1": pl.Float64, "b2": pl.Float64,
         "p1": pl.Float64, "p2": pl.Float64, "r2": pl.Float64, "status": pl.String,
         "significant1": pl.Boolean, "significant2": pl.Boolean}
    )
    assert table["chunk"].to_list() == [10, 11, 12, None]
    assert table["status"].to_list() == ["ok", "ok", "singular", "ok"]
    assert table["n"].to_list() == [37, 37, 37, 111]
    np.testing.assert_allclose(table["b1"][0], sm_fit([y[0]]).params[1], rtol=1e-8)
    np.testing.assert_allclose(table["b1"][3], sm_fit(list(y)).params[1], rtol=1e-8)


def test_significance_is_bonferroni_per_family():
    rng = np.random.default_rng(7)
    y = simulate_ar2(rng, 4, 60)
    alpha, n_layers = 0.2, 3
    table = ar2_table(y, np.arange(4), alpha=alpha, n_layers=n_layers)
    for i in (1, 2):
        p = table[f"p{i}"].to_numpy()
        threshold = np.array([alpha / (n_layers * 4)] * 4 + [alpha / n_layers])
        np.testing.assert_array_equal(table[f"significant{i}"].to_numpy(), p < threshold)
    assert table["significant1"][4]  # the pooled lag-1 effect is strong
    y[1] = 0.5  # singular: NaN p is never significant
    table = ar2_table(y, np.arange(4), alpha=alpha, n_layers=n_layers)
    assert not table["significant1"][1] and not table["significant2"][1]
    with pytest.raises(ValueError, match="alpha"):
        ar2_table(y, np.arange(4), alpha=1.5)


def test_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        fit_ar2(np.zeros(10))
    with pytest.raises(ValueError, match="chunks"):
        ar2_table(np.zeros((2, 10)), [1, 2, 3])
