"""Path length of the residual stream: how far each token's hidden state moves per layer.

Convention (Hugging Face): ``hidden_states`` has ``n_layer + 1`` entries; index 0 is the embedding
output (wte + wpe) and the last index has the final layer norm ``ln_f`` applied. Step ``l`` (1..n_layer)
compares ``hidden_states[l - 1]`` with ``hidden_states[l]``.
"""
import numpy as np
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


def path_logit_correlation(final_step: np.ndarray, next_logit: np.ndarray, pos: np.ndarray) -> tuple[float, int]:
    """Pearson r between the last layer's path_step and the true next token's logit.

    final_step, next_logit, pos: (n,) arrays over tokens. Tokens with no next token (NaN logit) and
    position 0 of each chunk are left out, as in the notebook. Returns (r, n_used); r is NaN when
    fewer than 3 tokens remain or either side is constant.
    """
    keep = (pos > 0) & np.isfinite(next_logit) & np.isfinite(final_step)
    x = np.asarray(final_step, dtype=np.float64)[keep]
    y = np.asarray(next_logit, dtype=np.float64)[keep]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), int(x.size)
    return float(np.corrcoef(x, y)[0, 1]), int(x.size)
