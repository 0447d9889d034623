"""Proper-noun neurons: per-neuron logistic regressions ``label ~ 1 + activation`` and their statistics.

Every neuron is fitted at once by a vectorized Newton (IRLS) solver whose 2x2 Hessians are inverted
in closed form. It reproduces ``statsmodels.api.Logit(y, add_constant(x[:, j])).fit()`` (params[1],
bse[1], pvalues[1]) and also reports the neurons statsmodels cannot fit (constant activation, perfect
or quasi-perfect separation) instead of warning about them.

Cost: each Newton step is ~7 elementwise passes over (samples x neurons), so the solver is memory
bound. Neurons go through in blocks sized to stay in cache (``_BLOCK_BYTES``), the first step is
closed form, and the early steps run in float32 before float64 steps converge to ``tol``.
"""
import warnings

import numpy as np
import polars as pl
import torch
from scipy.stats import norm, rankdata

STATUS_OK, STATUS_CONSTANT, STATUS_SEPARATION, STATUS_NOT_CONVERGED = "ok", "constant", "separation", "not_converged"
# Working set per block of neurons: ~6 float64 (block, samples) arrays. On CPU it stays in L3 so the
# elementwise passes of each Newton step run from cache, not DRAM (12 MiB measured best on 2 cores).
_BLOCK_BYTES = {"cpu": 12 << 20, "cuda": 1 << 30}
_MIN_BLOCK = 16  # fewer neurons per block and the Python overhead per op dominates
_COARSE_TOL, _MAX_COARSE = 1e-4, 12  # float32 phase: until steps are below this, at most this many steps


def fit_logit_per_neuron(x, y, *, max_iter: int = 100, tol: float = 1e-10, device=None) -> dict[str, np.ndarray]:
    """Logistic regression ``y ~ 1 + x[:, j]`` for every neuron j by Newton's method, exact in float64.

    x: (n_samples, n_neurons) activations, numpy or torch, any float dtype. Non-finite activations are
    dropped for that neuron only (its ``n`` counts the samples used). y: (n_samples,) 0/1 labels with
    both classes present. device: torch device for the solver (e.g. "cuda"); CPU when None.
    Convergence: both float64 Newton steps below ``tol * (1 + |param|)``; the SE comes from the
    Hessian at the start of that last step (statsmodels: at its final params; same to ~tol).

    Returns numpy arrays (n_neurons,): ``n`` (int64), ``beta0``, ``beta``, ``se`` (Wald SE of beta),
    ``z``, ``p`` (two-sided Wald p = 2 * norm.sf(|z|)), ``converged`` (bool), ``n_iter`` (int64) and
    ``status``: "ok", "constant" (no variation: NaN results), "separation" (perfect or quasi-perfect
    separation, so no finite MLE: NaN results) or "not_converged" (last iterate kept, as statsmodels does).
    """
    xt, yt = _check_inputs(x, y)
    if max_iter < 1 or not tol > 0:
        raise ValueError(f"need max_iter >= 1 and tol > 0, got max_iter={max_iter!r}, tol={tol!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    # Samples sorted positives-first: each class is then a contiguous slice for the separation check.
    order = torch.argsort(~yt, stable=True).to(xt.device)
    n_pos = int(yt.sum())
    n_samples, n_neurons = xt.shape
    budget = _BLOCK_BYTES["cuda" if dev.type == "cuda" else "cpu"]
    block = int(min(n_neurons, max(_MIN_BLOCK, budget // (6 * 8 * n_samples))))
    parts = [_fit_block(xt[:, j0:j0 + block], order, n_pos, dev, max_iter, tol) for j0 in range(0, n_neurons, block)]
    out = {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]}
    return _finish(out)


def _as_tensor(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach()
    with warnings.catch_warnings():
        # Read-only arrays (e.g. from Ray's object store) are fine: they are only ever copied from.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(np.asarray(a))


def _check_inputs(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    xt, yt = _as_tensor(x), _as_tensor(y).cpu()
    if xt.ndim != 2 or not (xt.is_floating_point() or xt.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"x must be a 2-D float array (n_samples, n_neurons), got shape {tuple(xt.shape)} {xt.dtype}")
    if yt.ndim != 1 or yt.shape[0] != xt.shape[0]:
        raise ValueError(f"y must have shape ({xt.shape[0]},) to match x {tuple(xt.shape)}, got {tuple(yt.shape)}")
    yf = yt.double()
    bad = ~((yf == 0) | (yf == 1))
    if bad.any():
        raise ValueError(f"y must hold only 0/1 labels, got {yf[bad][0].item()!r}")
    if yf.sum() in (0, yf.numel()):
        raise ValueError(f"y must contain both classes, got {int(yf.sum())} positives of {yf.numel()}")
    return xt, yf.bool()


def _fit_block(xs: torch.Tensor, order: torch.Tensor, n_pos: int, dev, max_iter: int, tol: float) -> dict:
    """Fit one block of neurons: xs (n_samples, B) in the caller's dtype -> dict of (B,) tensors."""
    # (B, n_samples) float64, contiguous: per-neuron sums then run along the fast axis.
    xb = torch.empty((xs.shape[1], xs.shape[0]), dtype=torch.float64, device=dev)
    xb.copy_(xs.to(dev).index_select(0, order.to(dev)).T)
    total = xb.sum(-1)
    mask = None
    if not bool(torch.isfinite(total).all()):  # a non-finite value poisons its row's sum: no extra pass
        mask = torch.isfinite(xb)
        xb.masked_fill_(~mask, 0.0)
        total = xb.sum(-1)
    n = xb.new_full((xb.shape[0],), xb.shape[1]) if mask is None else mask.sum(-1, dtype=torch.float64)
    status = _degenerate(xb, mask, n_pos)  # before centering, whose rounding could create ties
    mean = total / n
    # Centering is an affine reparametrisation (Newton's iterates are unchanged) that makes the 2x2
    # Hessian near-diagonal, so its closed-form determinant does not cancel for offset activations.
    xb.sub_(mean[:, None])
    if mask is not None:
        xb.masked_fill_(~mask, 0.0)
    fit = _newton(xb, mask, n_pos, n, status == 0, max_iter, tol)
    fit["beta0"] = fit["beta0"] - fit["beta"] * mean  # back to the uncentered intercept
    fit["n"], fit["status_code"] = n.round().long(), torch.where(status == 0, fit["status_code"], status)
    return fit


def _degenerate(xb: torch.Tensor, mask, n_pos: int) -> torch.Tensor:
    """Status code per neuron: 0 fit, 1 constant, 2 (quasi-)separated. xb rows are positives-first.

    With one predictor the MLE exists iff the classes overlap strictly: some negative lies above the
    lowest positive and some positive above the lowest negative. Ties at the boundary are
    quasi-complete separation (the slope still diverges). An empty class counts as separated.
    """
    lo, hi = xb, xb
    if mask is not None:
        lo, hi = xb.masked_fill(~mask, float("inf")), xb.masked_fill(~mask, float("-inf"))
    min1, max1 = lo[:, :n_pos].amin(-1), hi[:, :n_pos].amax(-1)
    min0, max0 = lo[:, n_pos:].amin(-1), hi[:, n_pos:].amax(-1)
    separated = (max0 <= min1) | (max1 <= min0)
    constant = torch.minimum(min0, min1) >= torch.maximum(max0, max1)
    code = torch.zeros(xb.shape[0], dtype=torch.int8, device=xb.device)
    return code.masked_fill_(separated, 2).masked_fill_(constant, 1)


def _newton(xb, mask, n_pos: int, n, active, max_iter: int, tol: float) -> dict:
    """Newton iterations on the active rows of centered xb (B, S), positives first.

    The first steps run in float32 (half the memory traffic) until every step is below
    ``_COARSE_TOL``; float64 steps then converge to ``tol`` from there, so the answer is float64 exact.
    Finished rows (converged or non-finite) keep taking their ~zero steps until a quarter of the rows
    are finished; those are then written out and dropped from the working copy.
    """
    rows = active.nonzero().squeeze(1)
    out = {"theta": torch.full((2, len(n)), float("nan"), dtype=n.dtype, device=n.device),
           "var1": torch.full_like(n, float("nan")), "n_iter": torch.zeros_like(n, dtype=torch.long),
           "conv": torch.zeros_like(active)}
    xa, ma = xb, mask
    if len(rows) < len(n):
        xa, ma = xb.index_select(0, rows), None if mask is None else mask.index_select(0, rows)
    st = _first_step(xa, ma, n_pos, n.index_select(0, rows), tol)
    it = _coarse_steps(xa, ma, st, min(max_iter, _MAX_COARSE))
    bufs = torch.empty((5, *xa.shape), dtype=xa.dtype, device=xa.device)
    for it in range(it + 1, max_iter + 1):
        n_done = int(st["done"].sum())
        if n_done == len(rows):
            break
        if 4 * n_done >= len(rows):
            _write_back(out, st, rows, st["done"])
            keep = ~st["done"]
            rows, xa, st = rows[keep], xa[keep], {k: v[..., keep] for k, v in st.items()}
            ma = None if ma is None else ma[keep]
            bufs = bufs[:, : len(rows)]
        d, st["var1"] = _step(xa, ma, st, bufs)  # var1: SE from the Hessian of the last step, as statsmodels
        st["theta"] += d
        st["n_iter"] += ~st["done"]
        newly = (d.abs() <= st["theta"].abs().mul_(tol).add_(tol)).all(0)
        st["conv"] |= newly & ~st["done"]
        st["done"] |= newly | ~torch.isfinite(d).all(0)  # a non-finite step cannot recover
    _write_back(out, st, rows, torch.ones_like(st["done"]))
    code = torch.where(out["conv"], 0, 3).to(torch.int8)
    return {"beta0": out["theta"][0], "beta": out["theta"][1], "var1": out["var1"], "converged": out["conv"],
            "n_iter": out["n_iter"], "status_code": code}


def _coarse_steps(xa, ma, st: dict, last_it: int) -> int:
    """Float32 Newton steps 2..last_it, until the steps of all but an eighth of the rows are below
    _COARSE_TOL (stragglers, e.g. near-separated neurons, finish in float64). Returns the last step."""
    x32 = xa.to(torch.float32)
    bufs = torch.empty((5, *xa.shape), dtype=torch.float32, device=xa.device)
    it = 1
    for it in range(2, last_it + 1):
        d, _ = _step(x32, ma, st, bufs)
        # float32 sums can lose a weight the float64 phase would see: skip such a step, do not fail it.
        finite = torch.isfinite(d).all(0)
        st["theta"] += d.nan_to_num_(0.0, 0.0, 0.0)
        st["n_iter"] += ~st["done"]
        pending = ~(d.abs() <= st["theta"].abs().mul_(_COARSE_TOL).add_(_COARSE_TOL)).all(0) & finite & ~st["done"]
        if 8 * int(pending.sum()) <= len(d[0]):
            break
    return it


def _first_step(xa, ma, n_pos: int, n, tol: float) -> dict:
    """Per-row state after Newton's first step from the intercept-only MLE (logit(ybar), 0), in closed form.

    There p = ybar for every sample, so the score is (0, sum(y x)) and the Hessian is
    ybar (1 - ybar) diag(n, sum(x^2)) on centered x: the step needs no elementwise sigmoid pass.
    """
    sy = n_pos * torch.ones_like(n) if ma is None else ma[:, :n_pos].sum(-1, dtype=torch.float64)
    syx, sxx = xa[:, :n_pos].sum(-1), torch.linalg.vecdot(xa, xa)
    ybar = sy / n
    w0 = ybar * (1 - ybar)
    theta = torch.stack((torch.log(ybar / (1 - ybar)), syx / (w0 * sxx)))
    conv = theta[1].abs() <= tol * (1 + theta[1].abs())
    return {"theta": theta, "var1": 1 / (w0 * sxx), "score_y": torch.stack((sy, syx)),
            "n_iter": torch.ones_like(n, dtype=torch.long), "conv": conv, "done": conv.clone()}


def _step(xa, ma, st: dict, bufs) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton step (2, R) from every row's ``st["theta"]``, and var(beta) from the Hessian there (R,).

    xa: (R, S) centered activations in the working precision; bufs: (5, R, S) scratch of that dtype.
    """
    b0, b1 = st["theta"].to(xa.dtype)[:, :, None]
    p = torch.mul(xa, b1, out=bufs[0]).add_(b0).sigmoid_()
    if ma is not None:
        p.mul_(ma)  # dropped samples weigh nothing: x is 0 there, so p is the only factor needed
    torch.addcmul(p, p, p, value=-1, out=bufs[1])  # w = p (1 - p)
    torch.mul(bufs[:2], xa, out=bufs[2:4])
    torch.mul(bufs[3], xa, out=bufs[4])
    # One reduction for all five sums: p, w, p x, w x, w x^2 (a single dispatch over the block).
    sums = bufs.sum(-1).to(torch.float64)
    h00, h01, h11 = sums[1], sums[3], sums[4]
    g = st["score_y"] - sums[0:3:2]  # score: (sum y - sum p, sum y x - sum p x)
    det = torch.addcmul(h00 * h11, h01, h01, value=-1)
    # Closed-form 2x2 solve: d0 = (h11 g0 - h01 g1) / det, d1 = (h00 g1 - h01 g0) / det.
    d = torch.stack((h11, h00)).mul_(g).addcmul_(h01, g.flip(0), value=-1).div_(det)
    return d, h00 / det


def _write_back(out: dict, st: dict, rows, sel) -> None:
    """Copy the state of the selected working rows into the block-wide results."""
    for k in ("theta", "var1", "n_iter", "conv"):
        out[k][..., rows[sel]] = st[k][..., sel]


def _finish(out: dict) -> dict[str, np.ndarray]:
    """Wald statistics from the fitted arrays; NaN for neurons without a fit."""
    code = out.pop("status_code")
    bad = (code == 1) | (code == 2)
    names = np.array([STATUS_OK, STATUS_CONSTANT, STATUS_SEPARATION, STATUS_NOT_CONVERGED])
    beta0, beta = np.where(bad, np.nan, out["beta0"]), np.where(bad, np.nan, out["beta"])
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.where(bad, np.nan, np.sqrt(out.pop("var1")))
        z = beta / se
    return {
        "n": out["n"], "beta0": beta0, "beta": beta, "se": se, "z": z, "p": 2 * norm.sf(np.abs(z)),
        "converged": out["converged"] & ~bad, "n_iter": np.where(bad, 0, out["n_iter"]), "status": names[code],
    }


def benjamini_hochberg(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q), as statsmodels ``multipletests(p, method="fdr_bh")[1]``.

    p: (n,) p-values. NaN entries stay NaN and do not count towards the number of tests.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p must be 1-D, got shape {p.shape}")
    q = np.full(p.shape, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    if finite.size == 0:
        return q
    order = finite[np.argsort(p[finite])]
    ranked = p[order] / (np.arange(1, order.size + 1) / order.size)
    q[order] = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
    return q


def bonferroni_significant(p, alpha: float = 0.05) -> np.ndarray:
    """(n,) bool: p < alpha / m, m the number of non-NaN p-values (NaN p is never significant)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    p = np.asarray(p, dtype=np.float64)
    m = int(np.count_nonzero(~np.isnan(p)))
    return p < alpha / max(m, 1)


def sample_allocation(proper, other, max_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """How many proper nouns and other tokens a class-balanced sample draws from each shard.

    proper, other: (S,) counts of each class per shard. k = min(proper.sum(), other.sum(), max_samples);
    the k of a class are spread over the shards by one multivariate hypergeometric draw on its counts,
    by ``default_rng([seed, 0x5A4D])``. Returns (k_proper (S,), k_other (S,)) int64. Each shard then
    draws its share uniformly (``draw_in_shard``): together a uniform random k-subset of each class,
    however the stream is cut into shards.
    """
    proper, other = np.asarray(proper, np.int64), np.asarray(other, np.int64)
    if proper.sum() == 0 or other.sum() == 0:
        raise ValueError(f"a balanced sample needs both classes, got {proper.sum()} proper nouns and {other.sum()} other tokens")
    k = int(min(proper.sum(), other.sum(), max_samples))
    rng = np.random.default_rng([seed, 0x5A4D])
    return rng.multivariate_hypergeometric(proper, k), rng.multivariate_hypergeometric(other, k)


def draw_in_shard(label, in_range, k_proper: int, k_other: int, seed: int, shard: int) -> np.ndarray:
    """One shard's share of the balanced sample: indices into its (n,) bool ``label`` and ``in_range``.

    Returns (k_proper + k_other,) int64: k_proper proper nouns, then k_other other tokens, each drawn
    uniformly without replacement from the shard's in-range tokens of its class by ``default_rng([seed, shard])``.
    """
    label, in_range = np.asarray(label, bool), np.asarray(in_range, bool)
    rng = np.random.default_rng([seed, shard])
    return np.concatenate([rng.choice(np.flatnonzero(label & in_range), k_proper, replace=False),
                           rng.choice(np.flatnonzero(~label & in_range), k_other, replace=False)])


def beta_confint(beta, se, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wald interval beta -/+ z_{(1 + level) / 2} se, as statsmodels ``Logit(...).fit().conf_int(1 - level)``."""
    half = norm.ppf(0.5 + level / 2) * np.asarray(se, dtype=np.float64)
    return beta - half, beta + half


def auroc_per_neuron(x, y) -> np.ndarray:
    """AUROC of each neuron's activation as a score for the label: (n, k), (n,) 0/1 -> (k,) float64.

    Rank-based Mann-Whitney U / (n1 n0) with average ranks for ties, as sklearn ``roc_auc_score(y,
    x[:, j])``: 1 when positives score highest, 0.5 for no separation (a constant neuron). Non-finite
    activations are left out for their neuron only (as in the fit); NaN where a class is then empty.
    """
    x = _as_tensor(x).cpu().numpy().astype(np.float64, copy=False)
    y = np.asarray(_as_tensor(y).cpu().numpy()).astype(bool)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"need x (n, k) and y (n,), got {x.shape} and {y.shape}")
    finite = np.isfinite(x)
    if finite.all():
        ranks = rankdata(x, axis=0)
        n1 = np.full(x.shape[1], y.sum(), dtype=np.float64)
        n0 = x.shape[0] - n1
    else:
        # Only the finite values are ranked (inf becomes NaN first, so "omit" leaves it out too).
        ranks = rankdata(np.where(finite, x, np.nan), axis=0, nan_policy="omit")
        n1 = (finite & y[:, None]).sum(0).astype(np.float64)
        n0 = finite.sum(0) - n1
    r1 = np.where(finite & y[:, None], ranks, 0.0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (r1 - n1 * (n1 + 1) / 2) / (n1 * n0)


def neuron_logit_table(x, y, alpha: float = 0.05, device=None) -> pl.DataFrame:
    """Per-neuron logistic fits of one block (e.g. one layer) as a table, one row per neuron.

    x: (n_samples, n_neurons), y: (n_samples,) 0/1, as ``fit_logit_per_neuron``. Multiple-testing
    corrections run over this block's "ok" neurons only (other rows: significant False, q_bh NaN):
    ``significant`` is Bonferroni at ``alpha``, ``q_bh`` Benjamini-Hochberg. ``beta_ci_low/high`` is
    the plain 95% Wald interval of beta (not multiplicity-adjusted; NaN without a fit); ``auroc`` the
    activation's AUROC for the label (``auroc_per_neuron``, defined for every neuron).
    Columns: neuron (int32), n (int32), beta, se, z, p, beta_ci_low, beta_ci_high, auroc (float64),
    significant (bool), q_bh (float64), status (str), converged (bool), n_iter (int16).
    """
    fit = fit_logit_per_neuron(x, y, device=device)
    fit["beta_ci_low"], fit["beta_ci_high"] = beta_confint(fit["beta"], fit["se"])
    fit["auroc"] = auroc_per_neuron(x, y)
    p_ok = np.where(fit["status"] == STATUS_OK, fit["p"], np.nan)
    return pl.DataFrame({
        "neuron": pl.Series(np.arange(len(fit["p"])), dtype=pl.Int32),
        "n": pl.Series(fit["n"], dtype=pl.Int32),
        **{k: pl.Series(fit[k], dtype=pl.Float64) for k in ("beta", "se", "z", "p", "beta_ci_low", "beta_ci_high", "auroc")},
        "significant": pl.Series(bonferroni_significant(p_ok, alpha), dtype=pl.Boolean),
        "q_bh": pl.Series(benjamini_hochberg(p_ok), dtype=pl.Float64),
        "status": pl.Series(fit["status"].tolist(), dtype=pl.String),
        "converged": pl.Series(fit["converged"], dtype=pl.Boolean),
        "n_iter": pl.Series(fit["n_iter"], dtype=pl.Int16),
    })
