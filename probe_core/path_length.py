"""Path length of the residual stream: how far each token's hidden state moves per layer.

Convention (Hugging Face): ``hidden_states`` has ``n_layer + 1`` entries; index 0 is the embedding
output (wte + wpe) and the last index has the final layer norm ``ln_f`` applied. Step ``l`` (1..n_layer)
compares ``hidden_states[l - 1]`` with ``hidden_states[l]``.
"""
import numpy as np
import polars as pl
import scipy.stats
import torch


def consecutive_steps(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer step metrics of a stacked hidden-state tensor.

    hidden: (L + 1, ..., d) stacked hidden states (any leading batch/position dims after the first).
    Returns (path_step, path_cum, angle_rad), each (L, ...) in float32:
    path_step[l - 1] = ||h[l] - h[l - 1]||_2, path_cum its cumulative sum over layers, and
    angle_rad[l - 1] the angle between h[l - 1] and h[l] (0 when either vector is zero).
    Norms and dot products are taken in float32 whatever the input dtype.
    """
    # One layer at a time: the temporaries of a step are (..., d) instead of (L, ..., d). For 156 MiB of
    # hidden states, peak memory above them fell from 442 to 262 MiB and time by half on CPU
    # (bench/path_steps.py, bench/RESULTS.md).
    steps, angles = [], []
    for layer in range(1, hidden.shape[0]):
        prev, cur = hidden[layer - 1].float(), hidden[layer].float()
        steps.append(torch.linalg.vector_norm(cur - prev, dim=-1))
        angles.append(angle_between(prev, cur))
    path_step = torch.stack(steps)
    return path_step, torch.cumsum(path_step, dim=0), torch.stack(angles)


def angle_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in radians between vectors along the last dim: (..., d), (..., d) -> (...).

    Kahan's form 2·atan2(|u − v|, |u + v|) on the unit vectors u, v: unlike arccos of the cosine it
    stays accurate for nearly parallel vectors in float32. A zero vector gives angle 0.
    """
    a, b = a.float(), b.float()
    tiny = torch.finfo(torch.float32).tiny
    u = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min(tiny)
    v = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp_min(tiny)
    angle = 2 * torch.atan2(torch.linalg.vector_norm(u - v, dim=-1), torch.linalg.vector_norm(u + v, dim=-1))
    zero = (a == 0).all(-1) | (b == 0).all(-1)
    return torch.where(zero, torch.zeros_like(angle), angle)


def fisher_ci(r, n, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Fisher-z interval of Pearson r from n pairs, elementwise: tanh(atanh(r) -/+ z_{(1+level)/2} / sqrt(n - 3)),
    as scipy's ``pearsonr(x, y).confidence_interval(level)``. NaN where n <= 3, |r| = 1 or r is NaN."""
    r, n = np.asarray(r, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = scipy.stats.norm.ppf(0.5 + level / 2) / np.sqrt(np.where(n > 3, n - 3, np.nan))
        z = np.where(np.abs(r) < 1, np.arctanh(np.clip(r, -1, 1)), np.nan)
        return np.tanh(z - half), np.tanh(z + half)


def path_layer_correlations(frame: pl.LazyFrame | pl.DataFrame, level: float = 0.95) -> pl.DataFrame:
    """Pearson r of path_step with the true next token's logit per layer, and its Fisher-z interval.

    frame: one row per (token, layer) with columns layer, pos, path_step and next_token_logit (null or
    NaN where the token has no next token). Tokens used: pos > 0 (as the notebook), a finite logit and
    a finite step. A LazyFrame is reduced per layer without being collected, so a corpus-scale join
    need not fit in memory. Returns one row per layer with a used token, sorted by layer: layer,
    n_tokens (Int64), r, r_ci_low, r_ci_high (Float64; ``fisher_ci`` at ``level``). r and its
    interval are NaN with fewer than 3 tokens or a constant side.
    """
    x, y = pl.col("path_step").cast(pl.Float64), pl.col("next_token_logit").cast(pl.Float64)
    per_layer = (
        frame.lazy().filter((pl.col("pos") > 0) & y.is_finite() & x.is_finite())  # null logits drop out here too
        .group_by("layer").agg(pl.len().cast(pl.Int64).alias("n_tokens"), pl.corr(x, y).alias("r"),
                               (x.max() > x.min()).alias("x_varies"), (y.max() > y.min()).alias("y_varies"))
        .sort("layer").collect()
    )
    ok = ((per_layer["n_tokens"] >= 3) & per_layer["x_varies"] & per_layer["y_varies"]).to_numpy()
    r = np.where(ok, per_layer["r"].fill_null(np.nan).to_numpy(), np.nan)
    lo, hi = fisher_ci(r, per_layer["n_tokens"].to_numpy(), level)
    return pl.DataFrame({"layer": per_layer["layer"], "n_tokens": per_layer["n_tokens"], "r": r, "r_ci_low": lo, "r_ci_high": hi})


def path_logit_correlation(final_step: np.ndarray, next_logit: np.ndarray, pos: np.ndarray) -> tuple[float, int]:
    """``path_layer_correlations`` of one layer given as (n,) arrays over tokens: (r, n_used), (NaN, 0) when no token is used."""
    one = path_layer_correlations(pl.DataFrame({"layer": np.zeros(len(pos), np.int16), "pos": pos,
                                                "path_step": final_step, "next_token_logit": next_logit}))
    return (float(one["r"][0]), int(one["n_tokens"][0])) if one.height else (float("nan"), 0)
