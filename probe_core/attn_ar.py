"""Attention-output norm dynamics: AR(2) fits of log ||attn_out|| along the sequence.

For each series y (log norms of one layer's attention output over positions) we regress
y[t] on 1, y[t - 1], y[t - 2] for t >= start (0-based). The notebook leaves position 0 out
entirely (its attention output is degenerate: a token attending only to itself), hence the
default start=3, where no regressor touches position 0.

Fits are ordinary least squares, batched over series via SVD of the stacked (B, n, 3) designs;
statistics follow statsmodels' OLS (t-test p-values with n - 3 residual degrees of freedom,
R^2 centred because the model has a constant).
"""
import numpy as np
import polars as pl
import scipy.stats
import torch

N_PARAMS = 3
RESULT_KEYS = ("n", "b0", "b1", "b2", "p1", "p2", "r2", "status")


def log_norms(attn_out) -> torch.Tensor:
    """Natural log of the L2 norm over the last dim, in float32: (..., d) -> (...). Zero vectors give -inf."""
    x = torch.as_tensor(attn_out)
    return torch.log(torch.linalg.vector_norm(x.float(), dim=-1))


def ar2_design(y, start: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """AR(2) regression of y[t] on 1, y[t - 1], y[t - 2] for t = start..T-1.

    y: (..., T) series (float64). Returns (X, target): X (..., T - start, 3) with columns
    [1, y[t - 1], y[t - 2]], target (..., T - start). NaN rows are kept (callers drop them).
    """
    y = np.asarray(y, dtype=np.float64)
    if y.ndim < 1:
        raise ValueError(f"y must have a time axis (..., T), got shape {y.shape}")
    if start < 2:
        raise ValueError(f"start must be >= 2 so that y[t - 2] exists, got {start}")
    n_tok = y.shape[-1]
    t0 = min(start, n_tok)
    target = y[..., t0:]
    lag1, lag2 = y[..., t0 - 1 : n_tok - 1], y[..., t0 - 2 : n_tok - 2]
    X = np.stack([np.ones_like(target), lag1, lag2], axis=-1)
    return X, target


def _drop_invalid(X: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero the rows with a non-finite value: (Xz, yz, valid), with at least 3 rows per batch entry.

    Zeroed rows add nothing to X'X or X'y, so padding/NaN rows drop out of a dense batched solve.
    """
    valid = np.isfinite(target) & np.isfinite(X).all(axis=-1)
    Xz = np.where(valid[..., None], X, 0.0)
    yz = np.where(valid, target, 0.0)
    short = max(N_PARAMS - X.shape[1], 0)
    if short:  # LAPACK rejects empty matrices; extra zero rows change nothing.
        Xz = np.pad(Xz, ((0, 0), (0, short), (0, 0)))
        yz = np.pad(yz, ((0, 0), (0, short)))
        valid = np.pad(valid, ((0, 0), (0, short)))
    return Xz, yz, valid


def _ols_batched(X: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """OLS per batch entry of X (B, n, 3), target (B, n); rows with a NaN or inf are dropped."""
    Xz, yz, valid = _drop_invalid(X, target)
    n = valid.sum(axis=-1)
    U, s, Vt = np.linalg.svd(Xz, full_matrices=False)
    # numpy.linalg.matrix_rank's default tolerance, with the number of rows actually used.
    full_rank = (s > s[:, :1] * np.maximum(n, N_PARAMS)[:, None] * np.finfo(np.float64).eps).all(axis=-1)
    too_few = n <= N_PARAMS
    ok = full_rank & ~too_few
    with np.errstate(divide="ignore", invalid="ignore"):
        s_inv = np.where(ok[:, None], 1.0 / s, np.nan)
        beta = np.einsum("bji,bj->bi", Vt, s_inv * np.einsum("bni,bn->bi", U, yz))
        resid = yz - np.einsum("bni,bi->bn", Xz, beta)
        df = (n - N_PARAMS).astype(np.float64)
        ssr = (resid**2).sum(axis=-1)
        # diag((X'X)^-1) = sum_k V[i, k]^2 / s_k^2
        var_diag = np.einsum("bki,bk->bi", Vt**2, s_inv**2)
        tvals = beta / np.sqrt(ssr[:, None] / df[:, None] * var_diag)
        pvals = 2.0 * scipy.stats.t.sf(np.abs(tvals), df[:, None])
        ybar = yz.sum(axis=-1) / n
        r2 = 1.0 - ssr / (np.where(valid, yz - ybar[:, None], 0.0) ** 2).sum(axis=-1)
    stats = {"b0": beta[:, 0], "b1": beta[:, 1], "b2": beta[:, 2], "p1": pvals[:, 1], "p2": pvals[:, 2], "r2": r2}
    return {
        "n": n.astype(np.int64),
        **{k: np.where(ok, v, np.nan) for k, v in stats.items()},
        "status": np.where(too_few, "too_few", np.where(full_rank, "ok", "singular")).astype(object),
    }


def _check_y(y) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"y must be 2-D (B, T) log norms, got shape {y.shape}")
    return y


def fit_ar2(y, start: int = 3) -> dict[str, np.ndarray]:
    """One AR(2) OLS per row of y.

    y: (B, T) float64 log norms, NaN = missing (e.g. padding); regression rows whose target or lags
    are NaN (or inf: log of a zero norm) are dropped. Returns (B,) arrays: n (int64, rows used),
    b0, b1, b2 (constant, lag-1, lag-2 coefficients), p1, p2 (two-sided t-test p-values of b1, b2),
    r2 (centred R^2), and status (object): "ok", "singular" (rank-deficient design) or "too_few"
    (n <= 3); the statistics are NaN unless status is "ok".
    """
    X, target = ar2_design(_check_y(y), start)
    return _ols_batched(X, target)


def fit_ar2_pooled(y, start: int = 3) -> dict[str, np.ndarray]:
    """One AR(2) OLS pooling the regression rows of every series in y (B, T); same keys, B = 1.

    Lags never cross series boundaries: the design is built per series, then stacked.
    """
    X, target = ar2_design(_check_y(y), start)
    return _ols_batched(X.reshape(1, -1, N_PARAMS), target.reshape(1, -1))


def ar2_table(y, chunks, start: int = 3, alpha: float = 0.05, n_layers: int = 1) -> pl.DataFrame:
    """Per-series AR(2) fits, then the pooled fit, as one table (one layer of a model).

    y: (B, T) log norms; chunks: (B,) chunk ids. Columns: chunk (Int32, null on the pooled last row),
    n (Int32), b0, b1, b2, p1, p2, r2 (Float64), status (String), significant1, significant2 (Boolean:
    p1, p2 below a Bonferroni threshold; NaN p is never significant). Each coefficient is its own
    family: the pooled row tests at alpha / n_layers (one pooled regression per layer of the model),
    a per-chunk row at alpha / (n_layers * B) (every per-chunk regression of the model).
    """
    y = _check_y(y)
    chunks = np.asarray(chunks)
    if chunks.shape != (y.shape[0],):
        raise ValueError(f"chunks has shape {chunks.shape}, expected ({y.shape[0]},): one id per series")
    if not 0 < alpha < 1 or int(n_layers) < 1:
        raise ValueError(f"need alpha in (0, 1) and n_layers >= 1, got alpha={alpha!r}, n_layers={n_layers!r}")
    per, pooled = fit_ar2(y, start), fit_ar2_pooled(y, start)
    cols = {k: np.concatenate([per[k], pooled[k]]) for k in RESULT_KEYS}
    threshold = np.append(np.full(y.shape[0], alpha / (n_layers * max(y.shape[0], 1))), alpha / n_layers)
    significant = {f"significant{i}": np.nan_to_num(cols[f"p{i}"], nan=1.0) < threshold for i in (1, 2)}
    float_cols = {k: pl.Series(k, cols[k], dtype=pl.Float64) for k in ("b0", "b1", "b2", "p1", "p2", "r2")}
    return pl.DataFrame(
        [
            pl.Series("chunk", [*chunks.tolist(), None], dtype=pl.Int32),
            pl.Series("n", cols["n"], dtype=pl.Int32),
            *float_cols.values(),
            pl.Series("status", cols["status"].tolist(), dtype=pl.String),
            *(pl.Series(k, v, dtype=pl.Boolean) for k, v in significant.items()),
        ]
    )
