"""Corpus-wide neuron pages: a mergeable per-(layer, neuron) summary of MLP ``c_fc`` pre-activations,
streamed batch by batch with memory independent of the corpus, and each neuron's direct logit effect.

One ``LayerState`` per layer (N = d_mlp neurons, k examples, W context tokens on each side):

- moments: ``n`` tokens, ``mean``, ``m2`` (float64, Chan's parallel update), ``min``, ``max`` (float32),
  ``n_active`` (tokens with x > 0);
- ``hist`` (N, len(HIST_EDGES) + 1) int64 over the fixed ``HIST_EDGES``: bin 0 counts x < edges[0],
  bin i counts edges[i-1] <= x < edges[i], the last bin x >= edges[-1] (``np.searchsorted(edges, x, "right")``);
- three ``Examples`` sets of k tokens per neuron: ``top`` (largest x), ``bottom`` (smallest x), both with
  ties broken by (chunk, pos) ascending, and ``sample`` (x > 0 with the smallest ``priority``, ties by
  (chunk, pos)), each with its context: x at pos-W..pos+W within the chunk, NaN outside it.

A token is keyed by ``chunk * T + pos`` (T: tokens per chunk). Every update and merge is exact and
independent of batching and order (the moments up to float64 rounding), so replicas' states merge.
Batches hold whole chunks; a state records which chunks it has seen (``PagesState.chunks``).
"""
import contextlib
import hashlib
import threading
from dataclasses import dataclass, fields, replace

import numpy as np
import pyarrow as pa
import torch

HIST_LO, HIST_PER_UNIT, HIST_BINS = -8, 4, 64  # edges -8, -7.75, ..., 8: width 1/4, every edge exact in float32
HIST_EDGES = (HIST_LO + np.arange(HIST_BINS + 1) / HIST_PER_UNIT).astype(np.float32)
EMPTY_KEY = torch.iinfo(torch.int64).max  # an unfilled example slot (fewer tokens than k so far)
NO_PRIORITY = torch.iinfo(torch.int64).max  # an unfilled slot or inactive token: sorts after (almost) every priority
KINDS = ("top", "bottom", "random_active")
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's finalizer constants
_U64 = (1 << 64) - 1


# ---------------------------------------------------------------- the documented sampling priority
def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors holding uint64 bits (multiplication wraps mod 2**64)."""
    z = (z ^ _shr(z, 30)) * _signed(_M1)
    z = (z ^ _shr(z, 27)) * _signed(_M2)
    return z ^ _shr(z, 31)


def model_salt(name: str) -> int:
    """The model's 64-bit salt: the first 8 bytes of sha256(name), little-endian (as int64 bits)."""
    return _signed(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))


def neuron_hash(seed: int, salt: int, layer: int, n_neurons: int, device=None) -> torch.Tensor:
    """h_neuron = mix(mix(mix(mix(seed) ^ salt) ^ layer) ^ neuron) for neurons 0..n-1: (n,) int64."""
    h = mix(torch.tensor(_signed(seed & _U64), dtype=torch.int64, device=device))
    h = mix(mix(h ^ salt) ^ int(layer))
    return mix(h ^ torch.arange(n_neurons, dtype=torch.int64, device=device))


def token_hash(chunk: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """h_token = mix(mix(chunk) ^ pos), elementwise int64."""
    return mix(mix(chunk.long()) ^ pos.long())


def priority(h_neuron: torch.Tensor, h_token: torch.Tensor) -> torch.Tensor:
    """priority = h_token * (h_neuron | 1) mod 2**64, compared as signed int64: (N,), (M,) -> (M, N).

    One multiply per (token, neuron): for a neuron, an odd factor permutes the (already mixed) token
    hashes, so its k smallest are a uniform draw; a full mix per element cost the capture 2x on CPU."""
    return h_token[:, None] * (h_neuron | 1)[None, :]


# ---------------------------------------------------------------- state
@dataclass(frozen=True)
class PagesConfig:
    """k examples per kind, W context tokens each side, T tokens per chunk, the sample's seed and salt."""

    k: int
    window: int
    chunk_tokens: int
    seed: int
    salt: int


@dataclass(frozen=True)
class Examples:
    """k examples per neuron: value (N, k) float32, key (N, k) int64 (chunk * T + pos; EMPTY_KEY unfilled),
    prio (N, k) int64 (the sample's priority; None for top/bottom), context (N, k, 2W + 1) float32."""

    value: torch.Tensor
    key: torch.Tensor
    context: torch.Tensor
    prio: torch.Tensor | None = None


@dataclass(frozen=True)
class LayerState:
    """One layer's running summary; every tensor has the neurons as its first dimension (N,)."""

    n: torch.Tensor  # (N,) int64
    mean: torch.Tensor  # (N,) float64
    m2: torch.Tensor  # (N,) float64: sum of squared deviations from the mean
    min: torch.Tensor  # (N,) float32
    max: torch.Tensor  # (N,) float32
    n_active: torch.Tensor  # (N,) int64
    hist: torch.Tensor  # (N, len(HIST_EDGES) + 1) int64
    top: Examples
    bottom: Examples
    sample: Examples

    def to(self, device) -> "LayerState":
        return _map(self, lambda t: t.to(device))


@dataclass(frozen=True)
class PagesState:
    """A model's state: one ``LayerState`` per block (layer 1..n_layer) and the chunks it has seen (sorted int64)."""

    cfg: PagesConfig
    layers: tuple[LayerState, ...]
    chunks: np.ndarray

    def to(self, device) -> "PagesState":
        return replace(self, layers=tuple(s.to(device) for s in self.layers))


def _map(obj, fn):
    """Apply ``fn`` to every tensor of a LayerState or Examples (recursively)."""
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = _map(v, fn) if isinstance(v, Examples) else (fn(v) if isinstance(v, torch.Tensor) else v)
    return type(obj)(**out)


def state_bytes(n_layer: int, d_mlp: int, k: int, window: int) -> int:
    """Bytes of a model's state: per neuron 3 example sets (value, key, context; prio for one) + moments + hist."""
    per_neuron = 3 * k * (4 + 8 + 4 * (2 * window + 1)) + k * 8 + 8 * 3 + 4 * 2 + 8 + 8 * (len(HIST_EDGES) + 1)
    return n_layer * d_mlp * per_neuron


def _empty_examples(n: int, cfg: PagesConfig, fill: float, with_prio: bool, device) -> Examples:
    return Examples(
        value=torch.full((n, cfg.k), fill, dtype=torch.float32, device=device),
        key=torch.full((n, cfg.k), EMPTY_KEY, dtype=torch.int64, device=device),
        context=torch.full((n, cfg.k, 2 * cfg.window + 1), float("nan"), dtype=torch.float32, device=device),
        prio=torch.full((n, cfg.k), NO_PRIORITY, dtype=torch.int64, device=device) if with_prio else None,
    )


def empty_layer(n: int, cfg: PagesConfig, device=None) -> LayerState:
    """The state of a layer with n neurons before any token."""
    zeros = lambda dtype: torch.zeros(n, dtype=dtype, device=device)  # noqa: E731
    return LayerState(
        n=zeros(torch.int64), mean=zeros(torch.float64), m2=zeros(torch.float64),
        min=torch.full((n,), float("inf"), device=device), max=torch.full((n,), -float("inf"), device=device),
        n_active=zeros(torch.int64), hist=torch.zeros((n, len(HIST_EDGES) + 1), dtype=torch.int64, device=device),
        top=_empty_examples(n, cfg, -float("inf"), False, device),
        bottom=_empty_examples(n, cfg, float("inf"), False, device),
        sample=_empty_examples(n, cfg, 0.0, True, device),
    )


def empty_state(n_layer: int, d_mlp: int, cfg: PagesConfig, device=None) -> PagesState:
    return PagesState(cfg, tuple(empty_layer(d_mlp, cfg, device) for _ in range(n_layer)), np.zeros(0, np.int64))


# ---------------------------------------------------------------- merging
def _select(a: Examples, b: Examples, k: int, kind: str) -> Examples:
    """The k best of two example sets (disjoint tokens): ordered by value (top: descending, bottom:
    ascending) or priority (sample), then key ascending. Two stable sorts: key first, then the primary."""
    cat = Examples(*(torch.cat([getattr(a, f), getattr(b, f)], dim=1) if getattr(a, f) is not None else None
                     for f in ("value", "key", "context", "prio")))
    order = torch.sort(cat.key, dim=1, stable=True).indices
    primary = (cat.prio if kind == "random_active" else cat.value).gather(1, order)
    order = order.gather(1, torch.sort(primary, dim=1, stable=True, descending=kind == "top").indices)[:, :k]
    take = lambda t: None if t is None else t.gather(1, order)  # noqa: E731
    context = cat.context.gather(1, order[..., None].expand(-1, -1, cat.context.shape[-1]))
    return Examples(take(cat.value), take(cat.key), context, take(cat.prio))


def _merge_moments(a: LayerState, n_b, mean_b, m2_b) -> dict:
    """Chan et al.'s pairwise update of (n, mean, m2); a side with n = 0 contributes nothing."""
    n = a.n + n_b
    safe = torch.clamp(n, min=1).double()
    delta = mean_b - a.mean
    mean = torch.where(n > 0, a.mean + delta * (n_b.double() / safe), a.mean)
    m2 = a.m2 + m2_b + delta * delta * (a.n.double() * n_b.double() / safe)
    return {"n": n, "mean": mean, "m2": m2}


def merge_layer(a: LayerState, b: LayerState, cfg: PagesConfig) -> LayerState:
    """The state of the union of two disjoint token sets."""
    return LayerState(
        **_merge_moments(a, b.n, b.mean, b.m2),
        min=torch.minimum(a.min, b.min), max=torch.maximum(a.max, b.max),
        n_active=a.n_active + b.n_active, hist=a.hist + b.hist,
        top=_select(a.top, b.top, cfg.k, "top"), bottom=_select(a.bottom, b.bottom, cfg.k, "bottom"),
        sample=_select(a.sample, b.sample, cfg.k, "random_active"),
    )


def merge(a: PagesState, b: PagesState) -> PagesState:
    """Two states of disjoint chunks -> the state of their union (ValueError if they share a chunk)."""
    if np.intersect1d(a.chunks, b.chunks).size:
        raise ValueError("states to merge share chunks: a chunk would be counted twice")
    layers = tuple(merge_layer(x, y.to(x.n.device), a.cfg) for x, y in zip(a.layers, b.layers))
    return PagesState(a.cfg, layers, np.union1d(a.chunks, b.chunks))


# ---------------------------------------------------------------- one batch
# How the update stays cheap on a CPU (it runs inside the forward pass, once per layer and batch):
# - scratch: the (M, N) float64/float32/int32/int64 intermediates live in one reused buffer per thread
#   (a fresh 25-50 MB tensor is mmap'ed and page-faults on every call, which cost more than the arithmetic);
# - examples: once a neuron's k slots are filled, only the batch's tokens at least as good as its k-th
#   example (value >= top's, <= bottom's, priority <= the sample's) can enter, so those candidates are
#   found with one comparison and ``nonzero`` and ranked by a sort of the few of them; the full
#   ``topk`` over the batch runs only while slots are unfilled (the first batch) or when too many tie;
# - contexts are cut only for the batch's examples that survive the merge with the state.
_WS = threading.local()
_CANDIDATES_PER_SLOT = 4  # the candidate route while candidates <= this * N * (k + 1)
_SMALL_THREADS = 1  # threads for the tail on small tensors: on a shared CPU each parallel op waits for its slowest thread


@contextlib.contextmanager
def _threads(count: int):
    """torch's intra-op threads set to ``count`` (0: unchanged) inside the block."""
    before = torch.get_num_threads()
    if count and count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count and count != before:
            torch.set_num_threads(before)


def _scratch(nbytes: int, device) -> torch.Tensor:
    """A reused byte buffer of ``nbytes`` on a CPU (one per thread); elsewhere a fresh one (CUDA caches)."""
    if torch.device(device).type != "cpu":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    buf = getattr(_WS, "buf", None)
    if buf is None or buf.numel() < nbytes:
        _WS.buf = None
        with torch.inference_mode(False):  # usable in and outside inference mode
            buf = _WS.buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf[:nbytes]


def _ordered(v: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 with the same order (-0.0 counted as +0.0)."""
    bits = (v + 0.0).view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _best_rows(xt: torch.Tensor, kk: int, largest: bool) -> torch.Tensor:
    """Columns of the kk largest (smallest) values per row of xt (N, M), ties by column ascending -> (N, kk).

    torch.topk breaks ties arbitrarily, so rows where the boundary value is tied are redone on an
    int64 key that orders by value, then column (only those rows: ties are rare in float activations)."""
    m = xt.shape[1]
    extra = int(kk < m)  # one more than kk shows whether the boundary value is tied outside the set
    values, cols = xt.topk(kk + extra, dim=1, largest=largest, sorted=False)  # (N, kk + extra); sorting here is slow
    values, order = values.sort(dim=1, descending=largest)
    cols = cols.gather(1, order)[:, :kk]
    tied = (values[:, kk] == values[:, kk - 1]).nonzero().squeeze(1) if extra else torch.zeros(0, dtype=torch.int64)
    if len(tied):
        r = torch.arange(m, dtype=torch.int64, device=xt.device)
        key = _ordered(xt[tied]) * (1 << 32) + (((1 << 32) - 1 - r) if largest else r)
        cols[tied] = key.topk(kk, dim=1, largest=largest).indices
    return cols


def _rank_candidates(row: torch.Tensor, col: torch.Tensor, primary: torch.Tensor, n: int, kk: int,
                     descending: bool) -> torch.Tensor:
    """Candidates (row, col) in row-major order (``nonzero``'s) with a sort key ``primary`` -> per column
    the rows of its kk best, by primary, then row ascending: (n, kk) int64, -1 where a column has fewer."""
    order = torch.sort(primary, stable=True, descending=descending).indices
    order = order[torch.sort(col[order], stable=True).indices]  # by column, then primary, then row
    col_sorted = col[order]
    counts = torch.bincount(col, minlength=n)
    rank = torch.arange(len(order), device=col.device) - (torch.cumsum(counts, 0) - counts)[col_sorted]
    keep = rank < kk
    rows = torch.full((n, kk), -1, dtype=torch.int64, device=col.device)
    rows[col_sorted[keep], rank[keep]] = row[order[keep]]
    return rows


def _windows(flat: torch.Tensor, rows: torch.Tensor, neuron: torch.Tensor, t_len: int, window: int) -> torch.Tensor:
    """flat (M, N) with row b * T + t; rows (S,) (-1: none), neuron (S,) -> x at t-W..t+W of each row's
    chunk: (S, 2W + 1) float32, NaN outside the chunk (and for row -1). Windows wholly inside their
    chunk (almost all) are one ``take``; the others are masked."""
    n = flat.shape[1]
    t = rows % t_len
    step = torch.arange(-window, window + 1, device=flat.device)
    edge = (t < window) | (t >= t_len - window) | (rows < 0)
    out = flat.reshape(-1).take((rows * n + neuron)[:, None] + step * n) if not bool(edge.any()) else None
    if out is not None:
        return out
    inner = (~edge).nonzero().squeeze(1)
    out = torch.empty((len(rows), 2 * window + 1), dtype=flat.dtype, device=flat.device)
    out[inner] = flat.reshape(-1).take((rows[inner] * n + neuron[inner])[:, None] + step * n)
    e = edge.nonzero().squeeze(1)
    r = rows[e].clamp(min=0)
    te = (r % t_len)[:, None] + step
    inside = (te >= 0) & (te < t_len) & (rows[e] >= 0)[:, None]
    values = flat[(r - r % t_len)[:, None] + te.clamp(0, t_len - 1), neuron[e][:, None]]
    out[e] = torch.where(inside, values, torch.full_like(values, float("nan")))
    return out


def _merge_batches(s: LayerState, rows: torch.Tensor, flat: torch.Tensor, keys: torch.Tensor, t_len: int,
                   cfg: PagesConfig, batch_prio) -> tuple[Examples, Examples, Examples]:
    """Merge the batch's candidate rows (3N, kk) (top, bottom, sample; -1: none) into the state's three
    example sets at once, as ``_select`` of the state and the batch's examples would (one int64 sort key:
    -value for top, value for bottom, the priority for the sample); context windows are cut only for the
    batch's rows that stay."""
    k, n = cfg.k, flat.shape[1]
    ok = rows >= 0
    r = rows.clamp(min=0)
    neuron = torch.arange(3 * n, device=rows.device) % n
    v = flat[r, neuron[:, None]]  # (3N, kk)
    fill = torch.tensor([-float("inf"), float("inf"), 0.0], device=rows.device).repeat_interleave(n)[:, None]
    sign = torch.tensor([-1, 1], device=rows.device).repeat_interleave(n)[:, None]
    fill_primary = torch.cat([_ordered(fill[:2 * n]) * sign, torch.full((n, 1), NO_PRIORITY, device=rows.device)])
    primary_b = torch.cat([_ordered(v[:2 * n]) * sign, batch_prio(r[2 * n:])])
    value = torch.cat([torch.cat([s.top.value, s.bottom.value, s.sample.value]), torch.where(ok, v, fill)], 1)
    key = torch.cat([torch.cat([s.top.key, s.bottom.key, s.sample.key]), torch.where(ok, keys[r], EMPTY_KEY)], 1)
    primary = torch.cat([torch.cat([-_ordered(s.top.value), _ordered(s.bottom.value), s.sample.prio]),
                         torch.where(ok, primary_b, fill_primary)], 1)
    order = torch.sort(key, dim=1, stable=True).indices
    order = order.gather(1, torch.sort(primary.gather(1, order), dim=1, stable=True).indices)[:, :k]
    c = s.top.context.shape[-1]
    slot_index = order.clamp(max=k - 1)[..., None].expand(-1, -1, c)
    # Each set gets tensors of its own (no views of a 3N tensor: pickling a view ships its whole storage).
    context = [e.context.gather(1, slot_index[i * n:(i + 1) * n]) for i, e in enumerate((s.top, s.bottom, s.sample))]
    nb, slot = (order >= k).nonzero(as_tuple=True)
    if len(nb):
        windows = _windows(flat, rows[nb, order[nb, slot] - k], nb % n, t_len, cfg.window)
        kind = nb // n
        for i in range(3):
            sel = (kind == i).nonzero().squeeze(1)
            context[i][nb[sel] - i * n, slot[sel]] = windows[sel]
    part = lambda t, i: t[i * n:(i + 1) * n].gather(1, order[i * n:(i + 1) * n])  # noqa: E731
    return tuple(Examples(part(value, i), part(key, i), context[i], part(primary, i) if i == 2 else None)
                 for i in range(3))


def _candidates(mask_fn, unfilled: torch.Tensor, m: int, limit: int):
    """(row, col) of ``mask_fn()``'s true entries, or None when they would be (or are) more than ``limit``."""
    if int(unfilled.sum()) * m > limit:
        return None
    row, col = mask_fn().nonzero(as_tuple=True)
    return None if len(row) > limit else (row, col)


def _moments_hist(flat: torch.Tensor, scratch: torch.Tensor):
    """(mean, m2) in float64 (two passes over a float64 copy), the histogram (N, HIST_BINS + 2) and the
    count of x > 0 (N,) of flat (M, N), using ``scratch`` (at least M * N * 8 bytes).

    The histogram's bin is the number of edges <= x, clamp(floor(4x) + 33, 0, 65): x * 4 is exact in
    float32 (a power of two), so this equals ``searchsorted(HIST_EDGES, x, "right")``. One ``bincount``
    also counts x > 0: with a = clamp(4x, -33, 32), u = floor(a) + ceil(a) is 2 floor(a) on an edge and
    2 floor(a) + 1 between edges, so bin = floor(u / 2) + 33 and x > 0 iff u >= 1."""
    m, n = flat.shape
    x64 = scratch.view(torch.float64)[:m * n].view(m, n)
    x64.copy_(flat)
    mean = x64.sum(0) / m
    m2 = x64.sub_(mean).square_().sum(0)
    a, b = scratch.view(torch.float32)[:2 * m * n].view(2, m, n)  # x64 is no longer needed
    lo = HIST_LO * HIST_PER_UNIT
    torch.mul(flat, HIST_PER_UNIT, out=a).clamp_(lo - 1, -lo)
    torch.ceil(a, out=b)
    width = 2 * (HIST_BINS + 2)  # codes u - 2 lo + 2 in [0, 2 * (HIST_BINS + 1)] per neuron
    a.floor_().add_(b).add_(torch.arange(n, dtype=torch.float32, device=flat.device) * width - 2 * (lo - 1))  # exact: n * width < 2**24
    code = b.view(torch.int32).copy_(a)
    counts = torch.bincount(code.view(-1), minlength=n * width).view(n, width)
    hist = counts.view(n, HIST_BINS + 2, 2).sum(2)
    return mean, m2, hist, counts[:, 2 - 2 * lo + 1:].sum(1)


def _histogram(flat: torch.Tensor) -> torch.Tensor:
    """Counts of (M, N) over HIST_EDGES per column -> (N, HIST_BINS + 2) int64."""
    return _moments_hist(flat.float(), torch.empty(flat.numel() * 8, dtype=torch.uint8))[2]


def update_layer(s: LayerState, x: torch.Tensor, chunk: torch.Tensor, cfg: PagesConfig, layer: int) -> LayerState:
    """Merge one layer's batch into its state: x (B, T, N) pre-activations of whole chunks ``chunk`` (B,),
    ascending; ``layer`` is the table's layer number (1..n_layer), part of the sample's priority."""
    b_len, t_len, n = x.shape
    if t_len != cfg.chunk_tokens:
        raise ValueError(f"a batch of {t_len} tokens per chunk, but the state counts {cfg.chunk_tokens}")
    dev = x.device
    flat = x.float().reshape(b_len * t_len, n)  # (M, N): row b * T + t, ascending in (chunk, pos) as chunks ascend
    chunk = torch.as_tensor(chunk, dtype=torch.int64, device=dev)
    pos = torch.arange(t_len, dtype=torch.int64, device=dev).repeat(b_len)
    chunks = chunk.repeat_interleave(t_len)
    keys = chunks * t_len + pos  # (M,)
    m, kk = flat.shape[0], min(cfg.k, flat.shape[0])
    limit = _CANDIDATES_PER_SLOT * n * (cfg.k + 1)
    scratch = _scratch(m * n * 8, dev)

    mean_b, m2_b, hist, n_active = _moments_hist(flat, scratch)
    n_b = torch.full((n,), m, dtype=torch.int64, device=dev)
    xt = []  # (N, M), made once if some kind needs the full topk
    transposed = lambda: xt[0] if xt else xt.append(flat.T.contiguous()) or xt[0]  # noqa: E731

    rows = torch.full((3, n, kk), -1, dtype=torch.int64, device=dev)  # top, bottom, sample
    candidates = []  # (row, 3N-column, int64 sort key ascending) of the kinds on the candidate route
    for i, (e, largest) in enumerate(((s.top, True), (s.bottom, False))):
        thr = e.value[:, -1]
        found = _candidates(lambda: flat >= thr if largest else flat <= thr, e.key[:, -1] == EMPTY_KEY, m, limit)
        if found is None:
            rows[i] = _best_rows(transposed(), kk, largest)
        else:
            row, col = found
            order_key = _ordered(flat[row, col])
            candidates.append((row, col + i * n, -order_key if largest else order_key))

    h_token = token_hash(chunks, pos)  # (M,)
    odd = neuron_hash(cfg.seed, cfg.salt, layer, n, dev) | 1  # (N,): priority = h_token * odd (see ``priority``)
    # An active token with priority NO_PRIORITY counts as inactive (it marks an empty slot).
    thr = s.sample.prio[:, -1].clamp(max=NO_PRIORITY - 1)
    prio = scratch.view(torch.int64)[:m * n].view(m, n)  # the moments' scratch, free again
    found = _candidates(lambda: torch.mul(h_token[:, None], odd, out=prio) <= thr,
                        s.sample.prio[:, -1] == NO_PRIORITY, m, limit)
    if found is not None:
        row, col = found
        act = flat[row, col] > 0
        row, col = row[act], col[act]
        candidates.append((row, col + 2 * n, prio[row, col]))
    else:
        p = h_token[None, :] * odd[:, None]  # (N, M)
        p.masked_fill_(transposed() <= 0, NO_PRIORITY)
        vals, sample_rows = p.topk(kk, dim=1, largest=False, sorted=False)
        rows[2] = sample_rows.masked_fill_(vals == NO_PRIORITY, -1)  # inactive picks (fewer than kk active tokens)
    rows = rows.view(3 * n, kk)
    batch_min, batch_max = flat.amin(0), flat.amax(0)
    with _threads(_SMALL_THREADS if dev.type == "cpu" else 0):  # the tail works on small tensors
        if candidates:
            row, col, order_key = (torch.cat(c) for c in zip(*candidates))
            rows = torch.maximum(rows, _rank_candidates(row, col, order_key, 3 * n, kk, False))  # one route per kind
        top, bottom, sample = _merge_batches(s, rows, flat, keys, t_len, cfg, lambda r: h_token[r] * odd[:, None])
        return LayerState(
            **_merge_moments(s, n_b, mean_b, m2_b),
            min=torch.minimum(s.min, batch_min), max=torch.maximum(s.max, batch_max),
            n_active=s.n_active + n_active, hist=s.hist + hist,
            top=top, bottom=bottom, sample=sample,
        )


def update(state: PagesState, layer_index: int, x: torch.Tensor, chunk) -> PagesState:
    """``update_layer`` for block ``layer_index`` (0-based) of the state; the chunks are recorded by ``seen``."""
    layers = list(state.layers)
    layers[layer_index] = update_layer(layers[layer_index], x, chunk, state.cfg, layer_index + 1)
    return replace(state, layers=tuple(layers))


def seen(state: PagesState, chunk) -> PagesState:
    """Record a batch's chunks as merged (after every layer's ``update``)."""
    return replace(state, chunks=np.union1d(state.chunks, np.asarray(chunk, np.int64)))


# ---------------------------------------------------------------- tables
def _context_array(context: np.ndarray) -> pa.Array:
    """(rows, C) float32 with NaN outside the chunk -> list<float32> with nulls there."""
    rows, c = context.shape
    flat = context.reshape(-1)
    values = pa.array(flat, type=pa.float32(), mask=np.isnan(flat))
    return pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * c), values)


def layer_tables(s: LayerState, cfg: PagesConfig, layer: int) -> tuple[pa.Table, pa.Table]:
    """(neuron_stats rows, neuron_examples rows) of one layer (``layer``: the table's number), no model column."""
    s = s.to("cpu")
    n = s.n.numpy()
    n_neurons = len(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.where(n > 1, np.sqrt(s.m2.numpy() / np.maximum(n - 1, 1)), np.nan)
        frac = s.n_active.numpy() / n
    hist = s.hist.numpy()
    stats = pa.table({
        "layer": np.full(n_neurons, layer, np.int16), "neuron": np.arange(n_neurons, dtype=np.int32), "n": n.astype(np.int64),
        "mean": s.mean.numpy(), "sd": sd, "min": s.min.numpy().astype(np.float32), "max": s.max.numpy().astype(np.float32),
        "frac_active": frac.astype(np.float64),
        "hist": pa.ListArray.from_arrays(pa.array(np.arange(n_neurons + 1, dtype=np.int32) * hist.shape[1]), pa.array(hist.reshape(-1))),
    })
    parts = []
    for kind, e in zip(KINDS, (s.top, s.bottom, s.sample)):
        key = e.key.numpy()
        neuron, rank = np.nonzero(key != EMPTY_KEY)  # filled slots, ranks in order (slots are sorted)
        k = key[neuron, rank]
        parts.append(pa.table({
            "layer": np.full(len(k), layer, np.int16), "neuron": neuron.astype(np.int32),
            "kind": pa.array([kind] * len(k), pa.string()), "rank": rank.astype(np.int16),
            "chunk": (k // cfg.chunk_tokens).astype(np.int32), "pos": (k % cfg.chunk_tokens).astype(np.int32),
            "activation": e.value.numpy()[neuron, rank].astype(np.float32),
            "context": _context_array(e.context.numpy()[neuron, rank]),
        }))
    return stats, pa.concat_tables(parts)


# ---------------------------------------------------------------- direct logit effect
def vocab_directions(w_out: torch.Tensor, ln_f_weight: torch.Tensor, w_u: torch.Tensor, k: int,
                     block: int = 256) -> tuple[torch.Tensor, ...]:
    """The k largest and smallest entries per neuron of ((W_out[n] - mean(W_out[n])) * gamma_f) @ W_U.T.

    w_out (N, d): the MLP's ``c_proj`` weight (Conv1D: rows are neurons); ln_f_weight (d,); w_u (V, d).
    The direct path through ln_f's linear part: its centering kept, its scale by the norm left out.
    Neurons go through ``block`` at a time, so memory is O(block * V). Returns (promoted_weight (N, k),
    promoted_id (N, k), suppressed_weight (N, k), suppressed_id (N, k)), float32/int64, best first.
    """
    k = min(k, w_u.shape[0])
    w_u = w_u.float()
    out = [[], [], [], []]
    for lo in range(0, w_out.shape[0], block):
        rows = w_out[lo:lo + block].float()
        logits = ((rows - rows.mean(1, keepdim=True)) * ln_f_weight.float()) @ w_u.T  # (block, V)
        for i, (v, idx) in enumerate((logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False))):
            out[2 * i].append(v)
            out[2 * i + 1].append(idx)
    return tuple(torch.cat(o) for o in out)
