"""Proper-noun neurons: per-neuron logistic regressions ``label ~ 1 + activation`` and their statistics.

Every neuron is fitted at once by a vectorized Newton (IRLS) solver in float64 whose 2x2 Hessians are
inverted in closed form. It reproduces ``statsmodels.api.Logit(y, add_constant(x[:, j])).fit()``
(params[1], bse[1], pvalues[1]) and also reports the neurons statsmodels cannot fit (constant
activation, perfect or quasi-perfect separation) instead of warning about them.
"""
import numpy as np
import polars as pl
import torch
from scipy.stats import norm

STATUS_OK, STATUS_CONSTANT, STATUS_SEPARATION, STATUS_NOT_CONVERGED = "ok", "constant", "separation", "not_converged"
# Working set per block of neurons (3 float64 (block, samples) arrays). On CPU it should stay inside L2/L3
# so the ~10 elementwise passes of each Newton step run from cache instead of DRAM.
_BLOCK_BYTES = {"cpu": 3 << 20, "cuda": 1 << 30}
_MIN_BLOCK = 16  # fewer neurons per block and Python overhead per op dominates


def fit_logit_per_neuron(x, y, *, max_iter: int = 100, tol: float = 1e-10, device=None) -> dict[str, np.ndarray]:
    """Logistic regression ``y ~ 1 + x[:, j]`` for every neuron j, fitted by Newton's method in float64.

    x: (n_samples, n_neurons) activations, numpy or torch, any float dtype. Non-finite activations are
    dropped for that neuron only (its ``n`` counts the samples used). y: (n_samples,) 0/1 labels with
    both classes present. device: torch device for the solver (e.g. "cuda"); CPU when None.
    Convergence: every Newton step below ``tol * (1 + |param|)``.

    Returns numpy arrays (n_neurons,): ``n`` (int64), ``beta0``, ``beta``, ``se`` (Wald SE of beta),
    ``z``, ``p`` (two-sided Wald p = 2 * norm.sf(|z|)), ``converged`` (bool), ``n_iter`` (int64) and
    ``status``: "ok", "constant" (no variation: NaN results), "separation" (perfect or quasi-perfect
    separation, so no finite MLE: NaN results) or "not_converged" (last iterate kept, as statsmodels does).
    """
    xt, yt = _check_inputs(x, y)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    # Samples sorted positives-first: each class is then a contiguous slice for the separation check.
    order = torch.argsort(~yt, stable=True).to(xt.device)
    n_pos = int(yt.sum())
    n_samples, n_neurons = xt.shape
    budget = _BLOCK_BYTES["cuda" if dev.type == "cuda" else "cpu"]
    block = int(min(n_neurons, max(_MIN_BLOCK, budget // (3 * 8 * n_samples))))
    parts = [_fit_block(xt[:, j0:j0 + block], order, n_pos, dev, max_iter, tol) for j0 in range(0, n_neurons, block)]
    out = {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]}
    return _finish(out)


def _check_inputs(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    xt = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    yt = (y if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y))).detach().cpu()
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
    return xt.detach(), yf.bool()


def _fit_block(xs: torch.Tensor, order: torch.Tensor, n_pos: int, dev, max_iter: int, tol: float) -> dict:
    """Fit one block of neurons: xs (n_samples, B) in the caller's dtype -> dict of (B,) tensors."""
    # (B, n_samples) float64, contiguous: per-neuron sums then run along the fast axis.
    xb = torch.empty((xs.shape[1], xs.shape[0]), dtype=torch.float64, device=dev)
    xb.copy_(xs.index_select(0, order).T)
    mask = torch.isfinite(xb)
    if bool(mask.all()):
        mask = None
    else:
        xb.masked_fill_(~mask, 0.0)
    n = xb.new_full((xb.shape[0],), xb.shape[1]) if mask is None else mask.sum(-1, dtype=torch.float64)
    mean = xb.sum(-1) / n
    # Centering is an affine reparametrisation (Newton's iterates are unchanged) that makes the 2x2
    # Hessian near-diagonal, so its closed-form determinant does not cancel for offset activations.
    xb.sub_(mean[:, None])
    if mask is not None:
        xb.masked_fill_(~mask, 0.0)
    status = _degenerate(xb, mask, n_pos)
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
    lo = xb if mask is None else xb.masked_fill(~mask, float("inf"))
    hi = xb if mask is None else xb.masked_fill(~mask, float("-inf"))
    min1, max1 = lo[:, :n_pos].amin(-1), hi[:, :n_pos].amax(-1)
    min0, max0 = lo[:, n_pos:].amin(-1), hi[:, n_pos:].amax(-1)
    separated = (max0 <= min1) | (max1 <= min0)
    constant = torch.minimum(min0, min1) >= torch.maximum(max0, max1)
    code = torch.zeros(xb.shape[0], dtype=torch.int8, device=xb.device)
    return code.masked_fill_(separated, 2).masked_fill_(constant, 1)


def _newton(xb, mask, n_pos: int, n, active, max_iter: int, tol: float) -> dict:
    """Newton iterations on the active rows of centered xb (B, S), positives first.

    Rows that have converged (or gone non-finite) stop being updated and, once a quarter of the rows
    iterated are finished, are dropped from the working copy so later steps skip them.
    """
    rows = active.nonzero().squeeze(1)
    nan = torch.full_like(n, float("nan"))
    out = {"b0": nan, "b1": nan.clone(), "var1": nan.clone(), "n_iter": torch.zeros_like(n, dtype=torch.long),
           "converged": torch.zeros_like(active)}
    xa = xb.index_select(0, rows)
    ma = None if mask is None else mask.index_select(0, rows)
    st = _first_step(xa, ma, n_pos, n.index_select(0, rows), tol)
    buf, tmp = torch.empty_like(xa), torch.empty_like(xa)
    for it in range(2, max_iter + 1):
        if bool(st["done"].all()):
            break
        if 4 * int(st["done"].sum()) >= len(rows):
            _write_back(out, st, rows, st["done"])
            keep = ~st["done"]
            rows, xa, st = rows[keep], xa[keep], {k: v[keep] for k, v in st.items()}
            ma = None if ma is None else ma[keep]
            buf, tmp = torch.empty_like(xa), torch.empty_like(xa)
        _step(xa, ma, st, buf, tmp, it, tol)
    _write_back(out, st, rows, torch.ones_like(st["done"]))
    code = torch.where(out["converged"], 0, 3).to(torch.int8)
    return {"beta0": out["b0"], "beta": out["b1"], "var1": out["var1"], "converged": out["converged"],
            "n_iter": out["n_iter"], "status_code": code}


def _first_step(xa, ma, n_pos: int, n, tol: float) -> dict:
    """State after Newton's first step from the intercept-only MLE (logit(ybar), 0), in closed form.

    There p = ybar for every sample, so the score is (0, sum(y x)) and the Hessian is
    ybar (1 - ybar) diag(n, sum(x^2)) on centered x: the step needs no elementwise sigmoid pass.
    """
    sy = n_pos * torch.ones_like(n) if ma is None else ma[:, :n_pos].sum(-1, dtype=torch.float64)
    syx, sxx = xa[:, :n_pos].sum(-1), torch.linalg.vecdot(xa, xa)
    ybar = sy / n
    w0 = ybar * (1 - ybar)
    b1 = syx / (w0 * sxx)
    conv = b1.abs() <= tol * (1 + b1.abs())
    return {"b0": torch.log(ybar / (1 - ybar)), "b1": b1, "var1": 1 / (w0 * sxx), "sy": sy, "syx": syx,
            "n_iter": torch.ones_like(n, dtype=torch.long), "converged": conv, "done": conv.clone()}


def _step(xa, ma, st: dict, buf, tmp, it: int, tol: float) -> None:
    """One Newton step for the unfinished rows of ``st``, in place; buf, tmp: scratch like xa."""
    p = torch.sigmoid_(torch.addcmul(st["b0"][:, None], xa, st["b1"][:, None], out=buf))
    if ma is not None:
        p.mul_(ma)  # dropped samples weigh nothing: x is 0 there, so p is the only factor needed
    g0, g1 = st["sy"] - p.sum(-1), st["syx"] - torch.linalg.vecdot(p, xa)
    w = p.addcmul_(p, p, value=-1)  # p (1 - p), in place
    h00, h01 = w.sum(-1), torch.mul(w, xa, out=tmp).sum(-1)
    h11 = torch.linalg.vecdot(tmp, xa)
    det = h00 * h11 - h01 * h01
    d0, d1 = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
    upd = ~st["done"]
    b0, b1 = torch.where(upd, st["b0"] + d0, st["b0"]), torch.where(upd, st["b1"] + d1, st["b1"])
    st["var1"] = torch.where(upd, h00 / det, st["var1"])  # SE from the Hessian of the last step, as statsmodels
    st["n_iter"] = torch.where(upd, it, st["n_iter"])
    newly = upd & (d0.abs() <= tol * (1 + b0.abs())) & (d1.abs() <= tol * (1 + b1.abs()))
    st["b0"], st["b1"], st["converged"] = b0, b1, st["converged"] | newly
    # A non-finite step cannot recover: stop iterating it (reported as not converged).
    st["done"] = st["done"] | newly | ~(torch.isfinite(b0) & torch.isfinite(b1))


def _write_back(out: dict, st: dict, rows, sel) -> None:
    """Copy the state of the selected working rows into the block-wide results."""
    for k in ("b0", "b1", "var1", "n_iter", "converged"):
        out[k][rows[sel]] = st[k][sel]


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
