"""Pairwise mutual information between hidden-state dimensions.

Histogram MI (the notebook's estimator): each dimension is cut into ``bins`` equal-width bins over its
own min..max exactly as ``np.histogram2d`` does, and MI = H(x) + H(y) - H(x, y) in bits. The vectorized
``histogram_mi_matrix`` gets the joint count tables of all pairs at once from one-hot matrix products
(``onehot.T @ onehot``), blocked over dimensions, in torch so it also runs on a GPU; on a CPU without a
fast int8 GEMM they come from ``np.bincount`` of combined codes instead (N increments a pair, not the
product's N * bins^2 multiply-adds). Counts are exact integers on every path (int8 GEMM -> int32 or
bincount on CPU, float32 on GPU), entropies are summed as c ln c in float64, so every entry equals the
per-pair numpy result to ~1e-14 bits.

KSG MI: ``sklearn.feature_selection.mutual_info_regression`` (k-nearest-neighbour estimator), in bits.
"""
import functools
import math
import operator
import time

import numpy as np
import torch

_LN2 = math.log(2.0)
_EXACT_F32 = 2**24  # float32 holds every integer count up to here exactly (GPU path)
# Block side in one-hot columns (dims * bins). CPU: a 1024^2 count block stays in cache, measured
# fastest of 512..4096 on 2 cores; GPU: big blocks keep the device busy (8192^2 float64 is 0.5 GB).
_CPU_BLOCK_ELEMS = 1024
_GPU_BLOCK_ELEMS = 8192
_ONEHOT_BYTES = 256 * 2**20  # most one-hot memory held at once; beyond it blocks are built per token chunk
# bincount path: a 32 x 32 block's counts (1024 pairs x 225 cells, int64) stay in L2 and its int64 keys
# for 4096 tokens are 32 MiB; measured faster than 16 or 68 dims on the AVX2 dev CPU.
_BINCOUNT_BLOCK_DIMS = 32
_BINCOUNT_KEY_BYTES = 32 * 2**20
_XLOGX_TABLE_MAX = 2**21  # tokens up to which c ln c is a lookup table (16 MiB of float64)


def notebook_pair_mi(x, y, bins: int = 15) -> float:
    """The notebook's reference MI in bits of two 1-D samples (n,), (n,) via ``np.histogram2d``."""
    c_xy, _, _ = np.histogram2d(x, y, bins=bins)
    p_xy = c_xy / c_xy.sum()
    p_x, p_y = p_xy.sum(axis=1), p_xy.sum(axis=0)
    return float(_entropy_bits(p_x) + _entropy_bits(p_y) - _entropy_bits(p_xy))


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]  # 0 log 0 = 0
    return float(-np.sum(p * np.log2(p)))


def histogram_mi_matrix(x, bins: int = 15, device=None, block_dims: int | None = None) -> np.ndarray:
    """All-pairs histogram MI in bits, equal to ``notebook_pair_mi`` on every pair of columns.

    x: (n_tokens, d) numpy array or torch tensor, finite. Returns (d, d) float64, symmetric; entry
    [i, j] is the MI of columns i and j, the diagonal is each column's binned entropy (MI with itself).
    float32/float64 data is binned in its own dtype like numpy; integer/bool data as float64, float16
    and bfloat16 as float32. ``device`` (e.g. "cuda") is where the counting runs (default: x's device
    for tensors, else CPU); ``block_dims`` dims per block bounds memory (default: by device).
    """
    xt = _as_tensor(x, device)
    bins = _check_bins(bins)
    n, d = xt.shape
    codes = _bin_codes(xt, bins)  # (d, n) int64 bin index per value
    log_n = math.log(n)
    marg = torch.zeros(d, bins, dtype=torch.int64, device=xt.device).scatter_add_(1, codes, torch.ones_like(codes))
    h_marg = (log_n - _sum_xlogx(marg.view(d, 1, 1, bins))[:, 0] / n) / _LN2  # (d,) entropies in bits
    out = torch.zeros(d, d, dtype=torch.float64, device=xt.device)
    for i0, j0, s_joint in _joint_block_sums(codes, bins, _block_dims(block_dims, bins, xt.device, n)):
        i1, j1 = i0 + s_joint.shape[0], j0 + s_joint.shape[1]
        mi = h_marg[i0:i1, None] + h_marg[None, j0:j1] - (log_n - s_joint / n) / _LN2
        out[i0:i1, j0:j1] = mi
    res = out.cpu().numpy()
    # mirror the upper triangle (rounding leaves diagonal blocks a hair asymmetric otherwise)
    return np.triu(res) + np.triu(res, 1).T


def _block_dims(block_dims: int | None, bins: int, device: torch.device, n: int = 0) -> int:
    if block_dims is None:
        if _use_bincount(device, n):
            return _BINCOUNT_BLOCK_DIMS
        return max(1, (_CPU_BLOCK_ELEMS if device.type == "cpu" else _GPU_BLOCK_ELEMS) // bins)
    if isinstance(block_dims, bool) or not isinstance(block_dims, (int, np.integer)) or block_dims < 1:
        raise ValueError(f"block_dims must be an integer >= 1, got {block_dims!r}")
    return int(block_dims)


def _joint_block_sums(codes: torch.Tensor, bins: int, block_dims: int, occupied: bool = False):
    """Yield (i0, j0, S) over upper-triangle dimension blocks; S (bi, bj) float64 holds, for dims
    (i0 + a, j0 + b), sum_cells C ln C of their joint count table. codes: (d, n) bin indices.
    ``occupied``: yield (i0, j0, S, K) with K (bi, bj) float64 the number of nonzero cells.

    All joint tables of a block come from one one-hot product. The one-hot of all dims is built once
    when it fits ``_ONEHOT_BYTES``; otherwise per block and token chunk, summing the chunks' counts.
    A Python loop over a handful of dimension blocks only, never over pairs.
    """
    d, n = codes.shape
    if _use_bincount(codes.device, n):
        yield from _bincount_block_sums(codes.numpy(), bins, block_dims, occupied)
        return
    dtype = _onehot_dtype(codes.device, n)
    item = torch.empty(0, dtype=dtype).element_size()
    full = _onehot(codes, bins, dtype) if n * d * bins * item <= _ONEHOT_BYTES else None
    chunk = max(1, _ONEHOT_BYTES // (min(d, block_dims) * bins * item))
    starts = range(0, d, block_dims)
    for i0 in starts:
        # one token chunk: block i's one-hot is built once for its whole row of blocks (rebuilding it per
        # block pair was a quarter of a layer's time at 65,536 tokens)
        oi = _onehot(codes[i0:i0 + block_dims], bins, dtype) if full is None and n <= chunk else None
        for j0 in starts[i0 // block_dims:]:
            bi, bj = min(block_dims, d - i0), min(block_dims, d - j0)
            if full is not None:
                counts = _count_product(full[:, i0 * bins:(i0 + bi) * bins], full[:, j0 * bins:(j0 + bj) * bins])
            elif oi is not None:
                counts = _count_product(oi, oi if j0 == i0 else _onehot(codes[j0:j0 + bj], bins, dtype))
            else:
                counts = sum(
                    _count_product(_onehot(codes[i0:i0 + bi, t0:t0 + chunk], bins, dtype),
                                   _onehot(codes[j0:j0 + bj, t0:t0 + chunk], bins, dtype))
                    for t0 in range(0, n, chunk))
            view = counts.view(bi, bins, bj, bins)
            if occupied:
                yield i0, j0, _sum_xlogx(view), (view > 0).sum(dim=(1, 3)).to(torch.float64)
            else:
                yield i0, j0, _sum_xlogx(view)


def _use_bincount(device: torch.device, n: int) -> bool:
    """CPU without a fast int8 GEMM: count with bincount (float32 one-hot products were ~5x slower there)."""
    return device.type == "cpu" and not (n < 2**31 and _cpu_int8_gemm_is_fast())


def _bincount_block_sums(codes: np.ndarray, bins: int, block_dims: int, occupied: bool):
    """``_joint_block_sums`` by bincount: codes (d, n) integer bin indices, same yields."""
    d, n = codes.shape
    # c ln c of every count 0..n looked up, not recomputed per cell: the same float64 values (so the
    # same sums), one gather instead of a log per cell, which dominated at a few hundred tokens
    xlogx = _xlogx_np(np.arange(n + 1)) if n <= _XLOGX_TABLE_MAX else None
    starts = range(0, d, block_dims)
    for i0 in starts:
        for j0 in starts[i0 // block_dims:]:
            counts = pair_block_counts(codes[i0:i0 + block_dims], codes[j0:j0 + block_dims], bins)
            cells = xlogx[counts] if xlogx is not None else _xlogx_np(counts)
            s_joint = torch.from_numpy(cells.sum(-1))
            if occupied:
                yield i0, j0, s_joint, torch.from_numpy((counts > 0).sum(-1).astype(np.float64))
            else:
                yield i0, j0, s_joint


def pair_block_counts(codes_i: np.ndarray, codes_j: np.ndarray, bins: int) -> np.ndarray:
    """Joint count tables of every pair of a block: (a, n), (b, n) bin codes -> (a, b, bins * bins) int64;
    cell p * bins + q counts the tokens with codes_i[x] == p and codes_j[y] == q.

    One ``np.bincount`` over keys (x * b + y) * bins^2 + p * bins + q per chunk of tokens: a key array
    bounded by ``_BINCOUNT_KEY_BYTES``, consecutive keys in one pair's cells (cache-local), N
    increments a pair. Written by hand because no library offers a batched 2-D bincount; torch's
    scatter_add_ and bincount were measured 2-4x slower than numpy's. (Keys of triples (i, j, j+1),
    one increment for two pairs, measured no faster on real-looking codes: the increments of
    repeated cells are latency-bound.)"""
    a, n = codes_i.shape
    b = codes_j.shape[0]
    b2 = bins * bins
    counts = np.zeros(a * b * b2, np.int64)
    if a == 0 or b == 0:
        return counts.reshape(a, b, b2)
    chunk = max(1, _BINCOUNT_KEY_BYTES // (8 * a * b))
    keys = np.empty(a * b * min(chunk, n), np.intp)
    row_i = (np.arange(a, dtype=np.intp) * (b * b2))[:, None]
    row_j = (np.arange(b, dtype=np.intp) * b2)[:, None]
    for t0 in range(0, n, chunk):
        ci = codes_i[:, t0:t0 + chunk].astype(np.intp) * bins + row_i  # (a, t)
        cj = codes_j[:, t0:t0 + chunk].astype(np.intp) + row_j  # (b, t)
        k = keys[: a * b * ci.shape[1]].reshape(a, b, ci.shape[1])
        np.add(ci[:, None, :], cj[None, :, :], out=k)  # one pass writes the keys, no temporaries
        if n <= chunk:
            return np.bincount(k.ravel(), minlength=counts.size).reshape(a, b, b2)
        counts += np.bincount(k.ravel(), minlength=counts.size)
    return counts.reshape(a, b, b2)


def _onehot_dtype(device: torch.device, n: int) -> torch.dtype:
    if device.type == "cpu" and n < 2**31 and _cpu_int8_gemm_is_fast():
        return torch.int8  # int8 GEMM (VNNI) -> int32: exact counts at several times float32 speed on CPU
    return torch.float32 if n <= _EXACT_F32 else torch.float64


@functools.cache
def _cpu_int8_gemm_is_fast() -> bool:
    """Whether this CPU's int8 GEMM (``torch._int_mm``) beats float32 on a one-hot-sized product.

    With VNNI it runs several times faster than float32; without (e.g. AVX2-only CPUs) it was measured
    ~100x slower (9-12 s against 0.08 s for a 1024 x 1020 block), so it is timed once per process.
    """
    if not hasattr(torch, "_int_mm"):
        return False
    a = torch.randint(0, 2, (1024, 128), dtype=torch.int8)
    fa = a.float()
    try:
        torch._int_mm(a.T, a)
    except (RuntimeError, NotImplementedError):  # a build without a CPU int8 GEMM
        return False

    def best(fn) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(lambda: torch._int_mm(a.T, a)) < best(lambda: fa.T @ fa)


def _count_product(oi: torch.Tensor, oj: torch.Tensor) -> torch.Tensor:
    """oi.T @ oj of 0/1 one-hot matrices (n, a), (n, b) -> (a, b) exact integer counts."""
    if oi.dtype == torch.int8:
        try:
            return torch._int_mm(oi.T, oj)
        except (RuntimeError, NotImplementedError):  # a build without a CPU int8 GEMM
            return (oi.T.to(torch.float64) @ oj.to(torch.float64)).to(torch.int64)
    return oi.T @ oj


def _onehot(codes: torch.Tensor, bins: int, dtype) -> torch.Tensor:
    """(b, n) bin codes -> (n, b*bins) one-hot; column k*bins + a is 'dim k falls in bin a'."""
    b, n = codes.shape
    offset = torch.arange(b, device=codes.device)[:, None] * bins
    onehot = torch.zeros(n, b * bins, dtype=dtype, device=codes.device)
    return onehot.scatter_(1, (codes + offset).T, 1.0)


def _sum_xlogx(counts: torch.Tensor, use_numpy: bool | None = None) -> torch.Tensor:
    """(a, p, b, q) exact integer counts -> (a, b) float64 sums over axes 1, 3 of c ln c (0 ln 0 = 0)."""
    # float64 logs: float32 ones would cost ~1e-7 bits, above the 1e-9 parity we promise.
    if use_numpy is None:
        use_numpy = counts.device.type == "cpu"
    if use_numpy:
        # numpy's SIMD float64 log is ~2x faster than torch's on CPU, and its single-threaded
        # reductions do not stall when the cores are shared; this step rivals the matmul there.
        c = counts.numpy()
        logs = np.maximum(c, c.dtype.type(1)).astype(np.float64)
        np.log(logs, out=logs)
        logs *= c
        a, p, b, q = logs.shape
        # sum over axis 1 first: long contiguous rows add fast; reducing the short last axis first is 5x slower
        return torch.from_numpy(logs.reshape(a, p, b * q).sum(1).reshape(a, b, q).sum(-1))
    c = counts.to(torch.float64)
    return c.clamp_min(1.0).log_().mul_(c).sum(-1).sum(1)


def _bin_codes(xt: torch.Tensor, bins: int) -> torch.Tensor:
    """(n, d) values -> (d, n) int64 bin indices in [0, bins), numpy's histogramdd rule."""
    lo, hi = torch.aminmax(xt, dim=0)
    edges = _numpy_edges(lo.cpu().numpy(), hi.cpu().numpy(), bins)  # (d, bins + 1)
    edges_t = torch.from_numpy(edges).to(xt.device)
    cols = xt.T.to(edges_t.dtype).contiguous()  # numpy compares values and edges in their common dtype
    idx = torch.searchsorted(edges_t, cols, right=True)  # numpy: searchsorted(edges, v, side='right')
    idx -= (cols == edges_t[:, -1:]).long()  # values on the last edge belong to the last bin
    return idx - 1


def _numpy_edges(lo: np.ndarray, hi: np.ndarray, bins: int) -> np.ndarray:
    """Per-column ``np.linspace(min, max, bins + 1)`` as histogramdd builds it, vectorized: (d,), (d,) -> (d, bins+1).

    Same dtype and the same float operations in the same order as numpy's scalar code path, so the
    edges are bit-identical (checked against per-column numpy in the tests).
    """
    dt = np.linspace(lo[0], hi[0], 2).dtype  # the dtype numpy's linspace gives these endpoints
    const = lo == hi
    # numpy widens an empty range by 0.5 on each side (in the data's dtype)
    lo = np.where(const, lo - lo.dtype.type(0.5), lo).astype(dt)
    hi = np.where(const, hi + hi.dtype.type(0.5), hi).astype(dt)
    delta = np.subtract(hi, lo, dtype=dt)
    step = delta / bins
    ramp = np.arange(0, bins + 1, dtype=dt)[:, None]
    edges = ramp * step
    tiny = step == 0  # numpy's denormal path: (ramp / div) * delta
    if tiny.any():
        edges[:, tiny] = (ramp / bins) * delta[tiny]
    edges += lo
    edges[-1] = hi
    return np.ascontiguousarray(edges.T)


def _writable(x) -> np.ndarray:
    """``x`` as a contiguous array torch may wrap: copied only when read-only (an object-store array),
    since torch warns on read-only memory; the values are unchanged."""
    arr = np.ascontiguousarray(x)
    return arr if arr.flags.writeable else arr.copy()


def _as_tensor(x, device) -> torch.Tensor:
    """Validated (n >= 2, d >= 1) finite float32/float64 tensor on ``device``."""
    if isinstance(x, torch.Tensor):
        xt = x.detach()
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"x must be numeric, got dtype {arr.dtype}")
        xt = torch.from_numpy(_writable(arr))
    _check_shape(tuple(xt.shape))
    if xt.dtype in (torch.float16, torch.bfloat16):
        xt = xt.float()
    elif xt.dtype not in (torch.float32, torch.float64):
        xt = xt.double()
    if device is not None:
        xt = xt.to(device)
    if not bool(torch.isfinite(xt).all()):
        raise ValueError("x must be finite (numpy's histogram rejects NaN/inf ranges)")
    return xt


def _check_shape(shape: tuple) -> None:
    if len(shape) != 2 or shape[0] < 2 or shape[1] < 1:
        raise ValueError(f"x must be 2-D (n_tokens >= 2, d >= 1), got shape {shape}")


def _check_bins(bins) -> int:
    if isinstance(bins, bool):
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    try:
        bins = operator.index(bins)
    except TypeError:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}") from None
    if bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins}")
    return bins


def upper_pairs(matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d, d) matrix -> (dim_i int32, dim_j int32, values float64) for all i < j, row-major order."""
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"matrix must be square 2-D, got shape {m.shape}")
    i, j = np.triu_indices(m.shape[0], k=1)
    return i.astype(np.int32), j.astype(np.int32), m[i, j].astype(np.float64)


def ksg_mi_column(x, j: int, seed: int = 0, n_neighbors: int = 3) -> np.ndarray:
    """KSG MI in bits of column j against columns j+1..d-1: (n, d) -> (d - j - 1,) float64.

    One ``mutual_info_regression(x[:, j+1:], x[:, j], n_neighbors, random_state=seed)`` call, so each
    unordered pair is estimated once; sklearn adds seeded 1e-10-scale jitter, hence the seed.
    """
    from sklearn.feature_selection import mutual_info_regression

    arr = _ksg_input(x, n_neighbors)
    d = arr.shape[1]
    if not 0 <= j < d:
        raise ValueError(f"column j must be in [0, {d}), got {j}")
    if j == d - 1:
        return np.zeros(0, dtype=np.float64)
    nats = mutual_info_regression(arr[:, j + 1:], arr[:, j], n_neighbors=n_neighbors, random_state=seed)
    return np.asarray(nats, dtype=np.float64) / _LN2


def ksg_mi_matrix(x, seed: int = 0, n_neighbors: int = 3) -> np.ndarray:
    """(n, d) -> (d, d) float64 symmetric KSG MI in bits from ``ksg_mi_column``; diagonal NaN (undefined)."""
    arr = _ksg_input(x, n_neighbors)
    d = arr.shape[1]
    out = np.full((d, d), np.nan)
    for j in range(d - 1):  # one sklearn call per column; sklearn itself loops over features
        out[j, j + 1:] = ksg_mi_column(arr, j, seed=seed, n_neighbors=n_neighbors)
        out[j + 1:, j] = out[j, j + 1:]
    return out


def _ksg_input(x, n_neighbors: int) -> np.ndarray:
    arr = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    _check_shape(arr.shape)
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, (int, np.integer)) or n_neighbors < 1:
        raise ValueError(f"n_neighbors must be an integer >= 1, got {n_neighbors!r}")
    if arr.shape[0] <= n_neighbors:
        raise ValueError(f"need more tokens than n_neighbors={n_neighbors}, got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise ValueError("x must be finite for KSG MI")
    return arr


def mi_summary(values) -> dict:
    """mean, median, p05, p95 (numpy percentile, linear) of MI values, ignoring NaN; NaN when none remain."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": math.nan, "median": math.nan, "p05": math.nan, "p95": math.nan}
    p05, p50, p95 = np.percentile(v, [5, 50, 95])
    return {"mean": float(v.mean()), "median": float(p50), "p05": float(p05), "p95": float(p95)}


# ---------------------------------------------------------------- bias correction, null, bin codes
def bin_edges(lo, hi, bins: int = 15) -> np.ndarray:
    """Per-dimension equal-width edges as np.histogram2d builds them: lo, hi (d,) -> (d, bins + 1)."""
    return _numpy_edges(np.asarray(lo), np.asarray(hi), _check_bins(bins))


def bin_codes(x, edges: np.ndarray) -> np.ndarray:
    """(n, d) values, (d, bins + 1) edges from ``bin_edges`` -> (n, d) uint8 bin indices (numpy's rule).

    Applied block by block of tokens with edges from the min/max over all tokens, the codes equal
    those of one call on all tokens, so MI from them equals the notebook's function exactly."""
    xt = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(_writable(x))
    e = torch.from_numpy(_writable(edges)).to(xt.device)
    if e.shape[1] - 1 > 256:
        raise ValueError("uint8 codes hold at most 256 bins")
    cols = xt.T.to(e.dtype).contiguous()
    idx = torch.searchsorted(e, cols, right=True)
    idx -= (cols == e[:, -1:]).long()
    return (idx - 1).T.to(torch.uint8).cpu().numpy()


def histogram_mi_codes(codes, bins: int = 15, block_dims: int | None = None, device=None) -> tuple[np.ndarray, np.ndarray]:
    """All-pairs MI in bits from (n, d) bin codes: (plug-in, Miller-Madow), each (d, d) float64.

    The plug-in matrix equals ``histogram_mi_matrix`` on the values the codes came from. Miller-Madow
    corrects each entropy by (K - 1) / (2N) nats, K its occupied bins, so
    MI_mm = MI - (K_xy - K_x - K_y + 1) / (2N ln 2): the plug-in estimate is biased upwards by about
    (B - 1)^2 / (2N ln 2) for independent dimensions, and the correction subtracts it (the issue's
    '+' has the sign of the entropy correction, not of the MI one). Joint counts are accumulated over
    blocks of tokens when the one-hot would exceed ``_ONEHOT_BYTES``, so memory stays bounded in N.
    """
    bins = _check_bins(bins)
    c = torch.from_numpy(_writable(codes)) if not isinstance(codes, torch.Tensor) else codes
    if device is not None:
        c = c.to(device)
    _check_shape(tuple(c.shape))
    n, d = c.shape
    ct = c.T.long().contiguous()  # (d, n)
    if int(ct.min()) < 0 or int(ct.max()) >= bins:
        raise ValueError(f"codes must lie in [0, {bins})")
    log_n = math.log(n)
    marg = torch.zeros(d, bins, dtype=torch.int64, device=ct.device).scatter_add_(1, ct, torch.ones_like(ct))
    h_marg = (log_n - _sum_xlogx(marg.view(d, 1, 1, bins))[:, 0] / n) / _LN2
    k_marg = (marg > 0).sum(1).double()
    out = torch.zeros(d, d, dtype=torch.float64, device=ct.device)
    occ = torch.zeros(d, d, dtype=torch.float64, device=ct.device)
    for i0, j0, s_joint, k_joint in _joint_block_sums(ct, bins, _block_dims(block_dims, bins, ct.device, n), occupied=True):
        i1, j1 = i0 + s_joint.shape[0], j0 + s_joint.shape[1]
        out[i0:i1, j0:j1] = h_marg[i0:i1, None] + h_marg[None, j0:j1] - (log_n - s_joint / n) / _LN2
        occ[i0:i1, j0:j1] = k_joint
    res = out.cpu().numpy()
    res = np.triu(res) + np.triu(res, 1).T
    k = occ.cpu().numpy()
    k = np.triu(k) + np.triu(k, 1).T
    km = k_marg.cpu().numpy()
    mm = res - (k - km[:, None] - km[None, :] + 1) / (2 * n * _LN2)
    return res, mm


def plugin_bias_bits(n: int, bins: int = 15) -> float:
    """The plug-in MI's leading bias for two independent dimensions, (B - 1)^2 / (2 N ln 2) bits."""
    return (bins - 1) ** 2 / (2 * n * _LN2)


def null_pairs(d: int, n_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded sample of ``n_pairs`` distinct pairs i < j of d dims (all pairs when fewer), sorted row-major."""
    total = d * (d - 1) // 2
    if n_pairs >= total:
        i, j = np.triu_indices(d, 1)
        return i.astype(np.int64), j.astype(np.int64)
    flat = np.sort(np.random.default_rng(seed).choice(total, size=n_pairs, replace=False))
    i, j = np.triu_indices(d, 1)
    return i[flat].astype(np.int64), j[flat].astype(np.int64)


def null_codes(codes, seed: int = 0) -> np.ndarray:
    """Each dimension's tokens permuted independently (seeded): (n, d) -> (n, d), marginals kept, dependence gone."""
    return np.random.default_rng(seed).permuted(np.asarray(codes), axis=0)


def pair_mi_codes(codes, dim_i, dim_j, bins: int = 15, pair_block: int = 256) -> np.ndarray:
    """Plug-in MI in bits of the listed pairs from (n, d) codes via np.bincount: (p,), (p,) -> (p,).

    Bincount over combined codes pair * B^2 + code_i * B + code_j per block of pairs and chunk of
    tokens: N increments a pair, used for the null's sample of pairs."""
    bins = _check_bins(bins)
    c = np.asarray(codes)
    n = c.shape[0]
    dim_i, dim_j = np.asarray(dim_i, np.int64), np.asarray(dim_j, np.int64)
    ct = np.ascontiguousarray(c.T)  # (d, n)
    d = ct.shape[0]
    marg = np.bincount((ct.astype(np.intp) + (np.arange(d) * bins)[:, None]).ravel(), minlength=d * bins).reshape(d, bins)
    h = (math.log(n) - _xlogx_np(marg).sum(1) / n) / _LN2
    b2 = bins * bins
    # the cell index code_i * B + code_j in the smallest dtype that holds it: the gathers and the
    # multiply-add run on 1-byte values, and one pass widens to the bincount key
    small = np.uint8 if b2 <= 2**8 else np.uint16 if b2 <= 2**16 else np.intp
    ct = ct.astype(small, copy=False)
    chunk = max(1, _BINCOUNT_KEY_BYTES // (8 * pair_block))
    out = np.empty(len(dim_i), np.float64)
    keys = np.empty(min(pair_block, len(dim_i)) * min(chunk, n), np.intp)
    for p0 in range(0, len(dim_i), pair_block):
        a, b = dim_i[p0:p0 + pair_block], dim_j[p0:p0 + pair_block]
        offs = (np.arange(len(a), dtype=np.intp) * b2)[:, None]
        joint = np.zeros(len(a) * b2, np.int64)
        for t0 in range(0, n, chunk):
            cell = ct[a, t0:t0 + chunk] * small(bins)
            cell += ct[b, t0:t0 + chunk]
            key = keys[: cell.size].reshape(cell.shape)
            np.add(cell, offs, out=key)
            joint += np.bincount(key.ravel(), minlength=joint.size)
        out[p0:p0 + len(a)] = h[a] + h[b] - (math.log(n) - _xlogx_np(joint.reshape(len(a), b2)).sum(1) / n) / _LN2
    return out


def _xlogx_np(c: np.ndarray) -> np.ndarray:
    f = np.maximum(c, 1).astype(np.float64)
    return np.log(f) * c


def null_summary(values) -> dict:
    """mean, p95, p99 (numpy percentile, linear) of a layer's null MI values; NaN when empty."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": math.nan, "p95": math.nan, "p99": math.nan}
    p95, p99 = np.percentile(v, [95, 99])
    return {"mean": float(v.mean()), "p95": float(p95), "p99": float(p99)}
