"""Path length of the residual stream: how far each token's hidden state moves per layer.

Convention (Hugging Face): ``hidden_states`` has ``n_layer + 1`` entries; index 0 is the embedding
output (wte + wpe) and the last index has the final layer norm ``ln_f`` applied. Step ``l`` (1..n_layer)
compares ``hidden_states[l - 1]`` with ``hidden_states[l]``.
"""
import numpy as np
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


def path_token_mask(pos: np.ndarray, next_logit: np.ndarray) -> np.ndarray:
    """(n,) bool: the tokens of the path-logit correlations, i.e. pos > 0 and a finite next-token logit."""
    return (np.asarray(pos) > 0) & np.isfinite(np.asarray(next_logit, dtype=np.float64))


def fisher_ci(r, n, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Fisher-z interval of Pearson r from n pairs, elementwise: tanh(atanh(r) -/+ z_{(1+level)/2} / sqrt(n - 3)),
    as scipy's ``pearsonr(x, y).confidence_interval(level)``. NaN where n <= 3, |r| = 1 or r is NaN."""
    r, n = np.asarray(r, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = scipy.stats.norm.ppf(0.5 + level / 2) / np.sqrt(np.where(n > 3, n - 3, np.nan))
        z = np.where(np.abs(r) < 1, np.arctanh(np.clip(r, -1, 1)), np.nan)
        return np.tanh(z - half), np.tanh(z + half)


def pearson_with_ci(x: np.ndarray, y: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(r, ci_low, ci_high): Pearson r of (n,) x, y (``np.corrcoef``) and its ``fisher_ci``.

    NaN r (and interval) when n < 3 or either side is constant.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan"), float("nan")
    r = float(np.corrcoef(x, y)[0, 1])
    lo, hi = fisher_ci(r, x.size, level)
    return r, float(lo), float(hi)


def path_layer_correlations(path_step: np.ndarray, next_logit: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
    """Pearson r of every layer's path_step with the next-token logit, and its 95% Fisher-z interval.

    path_step: (n, L) float, column l - 1 for layer l; next_logit, pos: (n,). Tokens as
    ``path_logit_correlation`` (pos > 0, finite logit; per layer also a finite step). Returns (L,)
    arrays: n_tokens (int64), r, r_ci_low, r_ci_high (float64; see ``pearson_with_ci``).
    """
    steps = np.asarray(path_step, dtype=np.float64)
    if steps.ndim != 2 or steps.shape[0] != len(pos) or len(pos) != len(next_logit):
        raise ValueError(f"need path_step (n, L), next_logit (n,), pos (n,), got {steps.shape}, {np.shape(next_logit)}, {np.shape(pos)}")
    base = path_token_mask(pos, next_logit)
    y = np.asarray(next_logit, dtype=np.float64)
    out = {"n_tokens": [], "r": [], "r_ci_low": [], "r_ci_high": []}
    for layer in range(steps.shape[1]):  # L (at most 48) correlations, each vectorized over tokens
        keep = base & np.isfinite(steps[:, layer])
        r, lo, hi = pearson_with_ci(steps[keep, layer], y[keep])
        for k, v in zip(out, (int(keep.sum()), r, lo, hi)):
            out[k].append(v)
    return {k: np.asarray(v, dtype=np.int64 if k == "n_tokens" else np.float64) for k, v in out.items()}


def path_logit_correlation(final_step: np.ndarray, next_logit: np.ndarray, pos: np.ndarray) -> tuple[float, int]:
    """Pearson r between the last layer's path_step and the true next token's logit.

    final_step, next_logit, pos: (n,) arrays over tokens. Tokens with no next token (NaN logit) and
    position 0 of each chunk are left out, as in the notebook. Returns (r, n_used); r is NaN when
    fewer than 3 tokens remain or either side is constant.
    """
    keep = path_token_mask(pos, next_logit) & np.isfinite(final_step)
    x = np.asarray(final_step, dtype=np.float64)[keep]
    y = np.asarray(next_logit, dtype=np.float64)[keep]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), int(x.size)
    return float(np.corrcoef(x, y)[0, 1]), int(x.size)
