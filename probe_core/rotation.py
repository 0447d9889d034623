"""Rotation of a target token's hidden state across layers, against two baselines.

Convention (Hugging Face): ``hidden`` stacks ``hidden_states`` as (L + 1, B, T, d); index 0 is the
embedding output. Step ``l`` (1..L) is the angle between ``hidden[l - 1]`` and ``hidden[l]``.

For every occurrence (b, t) of the target token we compare its per-layer rotation with the rotation
of the token just before it, (b, t - 1) (paired t-test per layer), and report a "shuffled" baseline:
angles between hidden states at random layers and random real positions of the same sequence.
"""
import numpy as np
import polars as pl
import scipy.stats
import torch

from probe_core.path_length import angle_between


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_mask(attention_mask, shape: tuple[int, int]) -> np.ndarray:
    """(B, T) boolean mask; None means every position is real."""
    if attention_mask is None:
        return np.ones(shape, dtype=bool)
    mask = _as_numpy(attention_mask)
    if mask.shape != shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, expected {shape} (B, T)")
    return mask.astype(bool)


def target_occurrences(input_ids, target_id: int, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Positions (b, t) holding ``target_id`` whose previous token is real and in the same sequence.

    input_ids: (B, T) numpy array or torch tensor; attention_mask: (B, T) or None (all real).
    Kept: t >= 1, input_ids[b, t] == target_id, mask[b, t] and mask[b, t - 1] true.
    Returns (b_idx, t_idx): int64 arrays (n_occ,), sorted by b then t.
    """
    ids = _as_numpy(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be 2-D (B, T), got shape {ids.shape}")
    mask = _check_mask(attention_mask, ids.shape)
    hit = (ids[:, 1:] == target_id) & mask[:, 1:] & mask[:, :-1]
    b_idx, t_idx = np.nonzero(hit)
    return b_idx.astype(np.int64), (t_idx + 1).astype(np.int64)


def shuffle_draws(seed, n_occ: int, n_layers: int, real_pos: np.ndarray) -> tuple[np.ndarray, ...]:
    """Random draws of the shuffled baseline for one sequence.

    Uses ``np.random.default_rng(seed)`` and a single call, so the draws depend only on the seed,
    the number of occurrences in this sequence, n_layers and its real positions (never on batching).
    Returns (la, lb, pa, pb), each int64 (n_occ, n_layers): layers in 1..n_layers, positions taken
    from ``real_pos``. Row i belongs to the sequence's i-th occurrence in increasing t.
    """
    real_pos = np.asarray(real_pos, dtype=np.int64)
    if real_pos.size == 0:
        raise ValueError("shuffle_draws needs at least one real position, got none")
    rng = np.random.default_rng(seed)
    n_real = real_pos.size
    draws = rng.integers([1, 1, 0, 0], [n_layers + 1, n_layers + 1, n_real, n_real], size=(n_occ, n_layers, 4))
    la, lb = draws[..., 0], draws[..., 1]
    pa, pb = real_pos[draws[..., 2]], real_pos[draws[..., 3]]
    return la, lb, pa, pb


def _check_inputs(hidden, b_idx, t_idx, seeds, attention_mask) -> tuple[np.ndarray, ...]:
    """Validated (b_idx, t_idx, seeds, mask) for ``rotation_angles``."""
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 4:
        got = getattr(hidden, "shape", type(hidden))
        raise ValueError(f"hidden must be a torch tensor (L + 1, B, T, d), got {got}")
    n_stack, n_seq, n_tok, _ = hidden.shape
    mask = _check_mask(attention_mask, (n_seq, n_tok))
    if n_stack < 2:
        raise ValueError(f"hidden needs at least 2 stacked layers (L + 1 >= 2), got {n_stack}")
    b_idx = np.asarray(b_idx, dtype=np.int64)
    t_idx = np.asarray(t_idx, dtype=np.int64)
    seeds = _as_numpy(seeds)
    if b_idx.ndim != 1 or b_idx.shape != t_idx.shape:
        raise ValueError(f"b_idx and t_idx must be 1-D of equal length, got {b_idx.shape} and {t_idx.shape}")
    if seeds.shape != (n_seq,):
        raise ValueError(f"seeds has shape {seeds.shape}, expected ({n_seq},): one seed per sequence")
    if seeds.dtype.kind not in "iu" or (seeds.dtype.kind == "i" and (seeds < 0).any()):
        raise ValueError(f"seeds must be non-negative integers (np.random.default_rng), got {seeds}")
    if b_idx.size and (b_idx.min() < 0 or b_idx.max() >= n_seq):
        raise ValueError(f"b_idx out of range [0, {n_seq}): min {b_idx.min()}, max {b_idx.max()}")
    if t_idx.size and (t_idx.min() < 1 or t_idx.max() >= n_tok):
        raise ValueError(f"t_idx out of range [1, {n_tok}): min {t_idx.min()}, max {t_idx.max()}")
    if not np.all(mask[b_idx, t_idx] & mask[b_idx, t_idx - 1]):
        raise ValueError("some occurrences (b, t) have a padded position at t or t - 1")
    return b_idx, t_idx, seeds, mask


def rotation_angles(hidden: torch.Tensor, b_idx, t_idx, seeds, attention_mask=None) -> dict[str, np.ndarray]:
    """Per-layer rotation angles (radians) at target occurrences and their baselines.

    hidden: (L + 1, B, T, d) stacked hidden states; b_idx, t_idx: (n_occ,) occurrences (e.g. from
    ``target_occurrences``); seeds: (B,) ints, one per sequence; attention_mask: (B, T) or None.
    Returns float32 arrays (n_occ, L), column l - 1 for step l:
      "target":   angle(hidden[l - 1][b, t], hidden[l][b, t])
      "previous": same at (b, t - 1)
      "shuffled": angle(hidden[la][b, pa], hidden[lb][b, pb]) with la, lb uniform in 1..L and pa, pb
                  uniform over real positions of b, drawn by ``shuffle_draws(seeds[b], ...)``.
    """
    b_idx, t_idx, seeds, mask = _check_inputs(hidden, b_idx, t_idx, seeds, attention_mask)
    n_layers = hidden.shape[0] - 1
    dev = hidden.device
    bt = torch.as_tensor(b_idx, device=dev)
    tt = torch.as_tensor(t_idx, device=dev)
    target = angle_between(hidden[:-1, bt, tt], hidden[1:, bt, tt]).T
    previous = angle_between(hidden[:-1, bt, tt - 1], hidden[1:, bt, tt - 1]).T

    draws = np.zeros((4, b_idx.size, n_layers), dtype=np.int64)
    # Sequence-local draw order (increasing t) keeps the baseline independent of the caller's order.
    order = np.lexsort((t_idx, b_idx))
    for b in np.unique(b_idx):
        rows = order[b_idx[order] == b]
        draws[:, rows] = np.stack(shuffle_draws(int(seeds[b]), rows.size, n_layers, np.flatnonzero(mask[b])))
    la, lb, pa, pb = (torch.as_tensor(x, device=dev) for x in draws)
    bb = bt[:, None]
    shuffled = angle_between(hidden[la, bb, pa], hidden[lb, bb, pb])
    out = {"target": target, "previous": previous, "shuffled": shuffled}
    return {k: v.cpu().numpy().astype(np.float32).reshape(b_idx.size, n_layers) for k, v in out.items()}


def rotation_tests(
    target: np.ndarray, previous: np.ndarray, shuffled: np.ndarray, alpha: float = 0.05
) -> pl.DataFrame:
    """Per-layer paired t-test of target vs previous-token rotation.

    target, previous, shuffled: (n_occ, L) angles from ``rotation_angles``.
    One row per layer 1..L: layer (int16), n (int32), mean_target_rad, mean_previous_rad,
    mean_shuffled_rad, t, p (float64; ``scipy.stats.ttest_rel(target, previous)``), significant
    (p < alpha / L, Bonferroni over all L layers), d_z (Cohen's d_z: mean(diff) / sd(diff, ddof=1),
    diff = target - previous), diff_ci_low_rad, diff_ci_high_rad (the plain 95% t interval of
    mean(diff), as ``ttest_rel(...).confidence_interval()``; not Bonferroni-adjusted). With n < 2,
    t, p, d_z and the interval are NaN and significant False.
    """
    arrays = [np.asarray(x, dtype=np.float64) for x in (target, previous, shuffled)]
    if any(a.ndim != 2 for a in arrays) or len({a.shape for a in arrays}) != 1:
        shapes = [a.shape for a in arrays]
        raise ValueError(f"target, previous, shuffled must share one 2-D shape (n_occ, L), got {shapes}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    tgt, prev, _ = arrays
    n, n_layers = tgt.shape
    if n >= 2:
        res = scipy.stats.ttest_rel(tgt, prev, axis=0)
        t_stat, p_val = np.asarray(res.statistic, dtype=np.float64), np.asarray(res.pvalue, dtype=np.float64)
        diff = tgt - prev
        with np.errstate(invalid="ignore", divide="ignore"):
            d_z = diff.mean(axis=0) / diff.std(axis=0, ddof=1)
            ci = res.confidence_interval(0.95)
        ci_low, ci_high = np.asarray(ci.low, dtype=np.float64), np.asarray(ci.high, dtype=np.float64)
    else:
        t_stat = p_val = d_z = ci_low = ci_high = np.full(n_layers, np.nan)
    with np.errstate(invalid="ignore"):
        means = [a.mean(axis=0) if n else np.full(n_layers, np.nan) for a in arrays]
        significant = np.nan_to_num(p_val, nan=1.0) < alpha / max(n_layers, 1)
    return pl.DataFrame(
        {
            "layer": pl.Series(np.arange(1, n_layers + 1), dtype=pl.Int16),
            "n": pl.Series(np.full(n_layers, n), dtype=pl.Int32),
            "mean_target_rad": means[0],
            "mean_previous_rad": means[1],
            "mean_shuffled_rad": means[2],
            "t": t_stat,
            "p": p_val,
            "significant": pl.Series(significant, dtype=pl.Boolean),
            "d_z": d_z,
            "diff_ci_low_rad": ci_low,
            "diff_ci_high_rad": ci_high,
        }
    )
