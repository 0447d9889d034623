"""Corpus-wide neuron pages: a mergeable per-(layer, neuron) summary of MLP ``c_fc`` pre-activations,
streamed batch by batch with memory independent of the corpus, and each neuron's direct logit effect.

One ``LayerState`` per layer (N = d_mlp neurons, k examples, W context tokens on each side):

- moments: ``n`` tokens, ``mean``, ``m2`` (float64, Chan's parallel update), ``n_active`` (tokens with x > 0);
  min and max are the best bottom and top examples (k >= 1 keeps them);
- ``hist`` (N, len(HIST_EDGES) + 1) int64 over the fixed ``HIST_EDGES``: bin 0 counts x < edges[0],
  bin i counts edges[i-1] <= x < edges[i], the last bin x >= edges[-1] (``np.searchsorted(edges, x, "right")``);
- three ``Examples`` sets of k tokens per neuron: ``top`` (largest x), ``bottom`` (smallest x), both with
  ties broken by (chunk, pos) ascending, and ``sample`` (x > 0 with the smallest ``priority``, ties by
  (chunk, pos)), each with its context: x at pos-W..pos+W within the chunk, NaN outside it. A set's k
  slots are unordered (a batch writes only the slots its new examples take); ``layer_tables`` orders them.

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
    """priority = h_token + h_neuron mod 2**64, compared as signed int64, elementwise (broadcasting).

    For one neuron, adding a constant permutes the (already mixed, uniform) token hashes, so its k smallest
    are a uniform draw, and its candidates in a batch are the tokens whose hash lies in one cyclic interval:
    a range of the batch's sorted token hashes (``_sample_candidates``), found without an (M, N) pass."""
    return h_token + h_neuron


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
    per_neuron = 3 * k * (4 + 8 + 4 * (2 * window + 1)) + k * 8 + 8 * 3 + 8 + 8 * (len(HIST_EDGES) + 1)
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
        n_active=zeros(torch.int64), hist=torch.zeros((n, len(HIST_EDGES) + 1), dtype=torch.int64, device=device),
        top=_empty_examples(n, cfg, -float("inf"), False, device),
        bottom=_empty_examples(n, cfg, float("inf"), False, device),
        sample=_empty_examples(n, cfg, 0.0, True, device),
    )


def empty_state(n_layer: int, d_mlp: int, cfg: PagesConfig, device=None) -> PagesState:
    return PagesState(cfg, tuple(empty_layer(d_mlp, cfg, device) for _ in range(n_layer)), np.zeros(0, np.int64))


def to_tensors(state: PagesState) -> dict:
    """The state as a flat {name: CPU tensor} (``torch.save``-able, loadable with ``weights_only=True``)."""
    c = state.cfg
    out = {"cfg": torch.tensor([c.k, c.window, c.chunk_tokens, c.seed, c.salt], dtype=torch.int64),
           "chunks": torch.from_numpy(np.asarray(state.chunks, np.int64))}
    for i, layer in enumerate(state.layers):
        for f in fields(layer):
            v = getattr(layer, f.name)
            items = [(f"{f.name}.{g.name}", getattr(v, g.name)) for g in fields(v)] if isinstance(v, Examples) else [(f.name, v)]
            for name, t in items:
                if t is not None:
                    out[f"{i}.{name}"] = t.detach().to("cpu")
    return out


def from_tensors(d: dict, device=None) -> PagesState:
    """``to_tensors``' inverse."""
    k, window, chunk_tokens, seed, salt = (int(v) for v in d["cfg"])
    layers = []
    for i in range(len({name.split(".")[0] for name in d} - {"cfg", "chunks"})):
        get = lambda name, i=i: d[f"{i}.{name}"].to(device) if f"{i}.{name}" in d else None  # noqa: E731
        sets = {e: Examples(*(get(f"{e}.{g}") for g in ("value", "key", "context", "prio"))) for e in ("top", "bottom", "sample")}
        layers.append(LayerState(**{f.name: sets[f.name] if f.name in sets else get(f.name) for f in fields(LayerState)}))
    return PagesState(PagesConfig(k, window, chunk_tokens, seed, salt), tuple(layers), d["chunks"].numpy().copy())


# ---------------------------------------------------------------- merging
def _best(e: Examples, k: int, kind: str) -> Examples:
    """The k best slots of e, in order: by value (top: descending, bottom: ascending) or priority (sample),
    then key ascending. Two stable sorts: key first, then the primary."""
    order = torch.sort(e.key, dim=1, stable=True).indices
    primary = (e.prio if kind == "random_active" else e.value).gather(1, order)
    order = order.gather(1, torch.sort(primary, dim=1, stable=True, descending=kind == "top").indices)[:, :k]
    take = lambda t: None if t is None else t.gather(1, order)  # noqa: E731
    context = e.context.gather(1, order[..., None].expand(-1, -1, e.context.shape[-1]))
    return Examples(take(e.value), take(e.key), context, take(e.prio))


def _select(a: Examples, b: Examples, k: int, kind: str) -> Examples:
    """The k best of two example sets (disjoint tokens), in order (``_best``)."""
    return _best(Examples(*(torch.cat([getattr(a, f), getattr(b, f)], dim=1) if getattr(a, f) is not None else None
                            for f in ("value", "key", "context", "prio"))), k, kind)


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
# - the (M, N) batch is read block by block of rows (``_batch_passes``), each block in cache: the histogram codes
#   and threshold comparisons on the caller's threads, then the float64 moments and the ``bincount`` on a second
#   thread while the single-threaded rest of the update runs; min/max are the best examples;
# - examples: once a neuron's k slots are filled, only the batch's tokens at least as good as its worst
#   example can enter: value >= top's, <= bottom's (one comparison each, in the sweep), and for the sample
#   priority <= its worst, found from the sorted token hashes without touching (M, N). The few candidates
#   are ranked by one sort. The full ``topk`` runs only while slots are unfilled (the first batch);
# - slots are unordered (``layer_tables`` sorts them), so a batch writes only the slots its new examples
#   take (``LayerDelta``), and cuts context windows only for those.
_WS = threading.local()
_CANDIDATES_PER_SLOT = 4  # the candidate route while candidates <= this * N * (k + 1)
_SMALL_THREADS = 1  # threads for the tail on small tensors: on a shared CPU each parallel op waits for its slowest thread
_NARROW = 4  # example rows with at most this many candidates are merged together, the others apart
_BLOCK_ROWS = 128  # rows per block of the sweep: 128 x d_mlp float32 + float64 stays in a CPU's cache


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


def _primary(s: LayerState, rows: torch.Tensor, n: int):
    """The state's (key, primary) of example ``rows`` (ascending, into top | bottom | sample, 0..3N): (R, k)
    each; primary is the int64 sort key, ascending: -value for top, value for bottom, the sample's priority."""
    bounds = torch.searchsorted(rows, torch.tensor([n, 2 * n], device=rows.device)).tolist()
    local = [p - i * n for i, p in enumerate(torch.tensor_split(rows, bounds))]
    key = torch.cat([e.key[r] for e, r in zip((s.top, s.bottom, s.sample), local)])
    primary = torch.cat([-_ordered(s.top.value[local[0]]), _ordered(s.bottom.value[local[1]]), s.sample.prio[local[2]]])
    return key, primary


def _new_examples(s: LayerState, changed: torch.Tensor, rows: torch.Tensor, flat: torch.Tensor, keys: torch.Tensor,
                  t_len: int, cfg: PagesConfig, h_token: torch.Tensor, h_neuron: torch.Tensor):
    """Merge the batch's candidate rows (R, w) (-1: none) of the example rows ``changed`` (R,) with the state's
    slots, as ``_select`` would: the k best by primary, then key. Returns the examples that enter, each taking
    a slot one of the row's evicted examples frees: (row (E,) into 0..3N ascending, slot (E,), value, key,
    primary (E,), context (E, 2W + 1)). Context windows are cut only for these."""
    k, n = cfg.k, flat.shape[1]
    kind = (changed // n)[:, None]
    neuron = changed % n
    ok = rows >= 0
    r = rows.clamp(min=0)
    v = flat[r, neuron[:, None]]  # (R, w)
    sign = torch.where(kind == 0, -1, 1)
    fill = torch.where(kind == 0, -float("inf"), torch.where(kind == 1, float("inf"), 0.0))
    primary_b = torch.where(kind == 2, priority(h_neuron[neuron, None], h_token[r]), _ordered(v) * sign)
    fill_primary = torch.where(kind == 2, NO_PRIORITY, _ordered(fill) * sign)
    s_key, s_primary = _primary(s, changed, n)
    key = torch.cat([s_key, torch.where(ok, keys[r], EMPTY_KEY)], 1)
    primary = torch.cat([s_primary, torch.where(ok, primary_b, fill_primary)], 1)
    # Which k stay: one sort by primary; only where the k-th and (k+1)-th tie (repeated contexts give equal
    # activations) does the key decide, and those rows are sorted again by key first.
    ranked, order = torch.sort(primary, dim=1, stable=True)
    if primary.shape[1] > k:
        tied = (ranked[:, k] == ranked[:, k - 1]).nonzero().squeeze(1)
        if len(tied):
            by_key = torch.sort(key[tied], dim=1, stable=True).indices
            order[tied] = by_key.gather(1, torch.sort(primary[tied].gather(1, by_key), dim=1, stable=True).indices)
    kept = torch.zeros(key.shape, dtype=torch.bool, device=key.device).scatter_(1, order[:, :k], True)
    # Exactly k stay, so a row frees as many slots as it takes batch examples; both lists are row-major: pair them.
    # (An unfilled batch entry never stays: it ties with the state's empty slots, which sort first.)
    free_r, free_slot = (~kept[:, :k]).nonzero(as_tuple=True)
    new_r, new_j = kept[:, k:].nonzero(as_tuple=True)
    batch_row = rows[new_r, new_j]
    return (changed[new_r], free_slot, v[new_r, new_j], keys[batch_row], primary_b[new_r, new_j],
            _windows(flat, batch_row, neuron[new_r], t_len, cfg.window))


def _sample_candidates(h_token: torch.Tensor, h_neuron: torch.Tensor, thr: torch.Tensor, limit: int):
    """(row, col) with priority h_token[row] + h_neuron[col] <= thr[col] (int64, wrapping), rows ascending, or
    None when more than ``limit``. For neuron n these are the tokens whose hash lies in the cyclic interval
    [MIN - h_n, thr_n - h_n]: a range of the sorted token hashes (two ``searchsorted``), so no (M, N) pass."""
    m = len(h_token)
    hs, by_hash = torch.sort(h_token)
    lo, hi = torch.iinfo(torch.int64).min - h_neuron, thr - h_neuron  # both wrap mod 2**64
    first = torch.searchsorted(hs, lo)
    past = torch.searchsorted(hs, hi, right=True)
    count = torch.where(lo <= hi, past - first, m - first + past)  # lo > hi: the interval wraps past MAX
    total = int(count.sum())
    if total > limit:
        return None
    col = torch.repeat_interleave(torch.arange(len(h_neuron), device=h_token.device), count, output_size=total)
    offset = torch.arange(total, device=h_token.device) - (torch.cumsum(count, 0) - count)[col]
    row = by_hash[(first[col] + offset) % m]
    order = torch.sort(row, stable=True).indices  # row-major, as ``nonzero`` gives: ties rank by row
    return row[order], col[order]


def _batch_passes(flat: torch.Tensor, thr_top: torch.Tensor | None, thr_bottom: torch.Tensor | None):
    """Everything that reads the whole batch flat (M, N), in row blocks that stay in cache. Returns (work, found):
    found, the candidates (row, col) (row-major) with x >= thr_top or x <= thr_bottom (None: that kind is not
    compared), or None without thresholds, computed here on the caller's threads with the histogram codes; and
    ``work()`` -> ((mean, m2) (N,) float64, histogram (N, HIST_BINS + 2), count of x > 0 (N,)): the float64 moments
    (two passes over each block's float64 copy, blocks combined by Chan's update) and the histogram's ``bincount``,
    both one thread's work, which ``layer_delta`` runs on a thread of its own beside the rest of the update.

    The histogram's bin is the number of edges <= x, clamp(floor(4x) + 33, 0, 65): x * 4 is exact in
    float32 (a power of two), so this equals ``searchsorted(HIST_EDGES, x, "right")``. One ``bincount``
    also counts x > 0: with a = clamp(4x, -33, 32), u = floor(a) + ceil(a) is 2 floor(a) on an edge and
    2 floor(a) + 1 between edges, so bin = floor(u / 2) + 33 and x > 0 iff u >= 1."""
    m, n = flat.shape
    dev = flat.device
    rows = _BLOCK_ROWS if dev.type == "cpu" else m  # a GPU reads memory fast enough in one block
    rows = min(rows, m)
    compare = thr_top is not None or thr_bottom is not None
    sizes = [-(-size // 8) * 8 for size in (rows * n * 8, rows * n * 4, rows * n * 4, m * n * 4, rows * n, m * n * int(compare))]
    x64, a, b, codes, tmp, mask = (t[:size] for t, size in zip(torch.split(_scratch(sum(sizes), dev), sizes),
                                                              (rows * n * 8, rows * n * 4, rows * n * 4, m * n * 4, rows * n, m * n)))
    x64, a, b = x64.view(torch.float64).view(rows, n), a.view(torch.float32).view(rows, n), b.view(torch.float32).view(rows, n)
    codes, tmp = codes.view(torch.int32).view(m, n), tmp.view(torch.bool).view(rows, n)
    mask = mask.view(torch.bool).view(m, n) if compare else None
    lo = HIST_LO * HIST_PER_UNIT
    width = 2 * (HIST_BINS + 2)  # codes u - 2 lo + 2 in [0, 2 * (HIST_BINS + 1)] per neuron
    offsets = torch.arange(n, dtype=torch.float32, device=dev) * width - 2 * (lo - 1)  # exact: n * width < 2**24
    starts = range(0, m, rows)
    for r0 in starts:
        block = flat[r0:r0 + rows]
        nb = len(block)
        ab, bb = a[:nb], b[:nb]
        torch.mul(block, HIST_PER_UNIT, out=ab).clamp_(lo - 1, -lo)
        torch.ceil(ab, out=bb)
        codes[r0:r0 + nb].copy_(ab.floor_().add_(bb).add_(offsets))
        if compare:
            part = mask[r0:r0 + nb]
            if thr_top is not None:
                torch.ge(block, thr_top, out=part)
            if thr_bottom is not None:
                below = torch.le(block, thr_bottom, out=tmp[:nb])
                part.logical_or_(below) if thr_top is not None else part.copy_(below)
    found = _sparse_nonzero(mask) if compare else None

    def work():
        sums, m2s = (torch.empty((len(starts), n), dtype=torch.float64, device=dev) for _ in range(2))
        for i, r0 in enumerate(starts):
            x = x64[:min(rows, m - r0)]
            x.copy_(flat[r0:r0 + rows])
            torch.sum(x, 0, out=sums[i])
            torch.sum(x.sub_(sums[i] / len(x)).square_(), 0, out=m2s[i])
        sizes = torch.tensor([min(rows, m - r0) for r0 in starts], dtype=torch.float64, device=dev)[:, None]
        mean = sums.sum(0) / m
        m2 = m2s.sum(0) + (sizes * (sums / sizes - mean) ** 2).sum(0)  # Chan's update of the blocks at once
        counts = torch.bincount(codes.view(-1), minlength=n * width).view(n, width)
        return (mean, m2), counts.view(n, HIST_BINS + 2, 2).sum(2), counts[:, 2 - 2 * lo + 1:].sum(1)

    return work, found


def _histogram(flat: torch.Tensor) -> torch.Tensor:
    """Counts of (M, N) over HIST_EDGES per column -> (N, HIST_BINS + 2) int64."""
    return _batch_passes(flat.float(), None, None)[0]()[1]


class _Background:
    """``fn()`` on a thread of its own (torch releases the GIL in its kernels); ``result()`` joins it."""

    def __init__(self, fn):
        self.out = self.error = None
        # Inference and grad mode are per thread: the new one runs in the caller's.
        modes = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
        self.thread = threading.Thread(target=self._run, args=(fn, modes), daemon=True)
        self.thread.start()

    def _run(self, fn, modes):
        try:
            torch.set_num_threads(1)  # this thread's OpenMP team: one thread (the caller holds the other core)
            with torch.inference_mode(modes[0]), torch.set_grad_enabled(modes[1]):
                self.out = fn()
        except BaseException as e:  # re-raised by result()
            self.error = e

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.out


@dataclass(frozen=True)
class _Done:
    out: object

    def result(self):
        return self.out


def _sparse_nonzero(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask.nonzero(as_tuple=True)`` of a (M, N) bool mask with few true entries: the 8-byte words holding one
    are found first (an eighth of the elements), then the bytes within them."""
    m, n = mask.shape
    flat = mask.reshape(-1)
    if flat.numel() % 8 or flat.storage_offset() % 8:
        return mask.nonzero(as_tuple=True)
    words = flat.view(torch.int64).nonzero().squeeze(1)
    word, byte = flat.view(-1, 8)[words].nonzero(as_tuple=True)
    index = words[word] * 8 + byte
    return index // n, index % n


def _worst(s: LayerState):
    """Per neuron (N,) the worst example of each set (top: its smallest value, bottom: largest, sample: largest
    priority) and whether the set has an empty slot; the slots are unordered."""
    unfilled = [(e.key == EMPTY_KEY).any(1) for e in (s.top, s.bottom, s.sample)]
    return (s.top.value.amin(1), s.bottom.value.amax(1), s.sample.prio.amax(1)), unfilled


@dataclass(frozen=True)
class LayerDelta:
    """One batch's contribution to a layer's state (``layer_delta``; ``apply_delta`` adds it): the batch's own
    n, mean, m2, n_active, hist (N, ...), and the examples that enter: ``row`` (E,) ascending into
    top | bottom | sample (0..3N), the ``slot`` (E,) each takes, value, key, primary (E,) (the sample's
    priority), context (E, 2W + 1)."""

    n: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    n_active: torch.Tensor
    hist: torch.Tensor
    row: torch.Tensor
    slot: torch.Tensor
    value: torch.Tensor
    key: torch.Tensor
    primary: torch.Tensor
    context: torch.Tensor


def layer_delta(s: LayerState, x: torch.Tensor, chunk: torch.Tensor, cfg: PagesConfig, layer: int) -> LayerDelta:
    """What one layer's batch changes in its state ``s`` (read, not written): x (B, T, N) pre-activations of
    whole chunks ``chunk`` (B,), ascending, none of them in ``s``; ``layer`` is the table's layer number
    (1..n_layer), part of the sample's priority."""
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

    (thr_top, thr_bottom, thr_sample), unfilled = _worst(s)
    # Unfilled slots (the first batches) make every token a candidate: the full topk is cheaper then.
    full = [int(u.sum()) * m > limit for u in unfilled]
    work, found = _batch_passes(flat, None if full[0] else thr_top, None if full[1] else thr_bottom)
    if found is not None and len(found[0]) > 2 * limit:  # too many ties with the worst examples
        full[0] = full[1] = True
    # The rest works on small tensors (one thread: on a shared CPU each parallel op waits for its slowest
    # thread), while the moments and the histogram's bincount run on another.
    with _threads(_SMALL_THREADS if dev.type == "cpu" else 0):
        pending = _Background(work) if dev.type == "cpu" else _Done(work())
        xt = []  # (N, M), made once if some kind needs the full topk
        transposed = lambda: xt[0] if xt else xt.append(flat.T.contiguous()) or xt[0]  # noqa: E731

        rows = torch.full((3, n, kk), -1, dtype=torch.int64, device=dev)  # top, bottom, sample
        candidates = []  # (row, 3N-column, int64 sort key ascending) of the kinds on the candidate route
        value = flat[found] if found is not None else None
        for i, (largest, thr) in enumerate(((True, thr_top), (False, thr_bottom))):
            if full[i]:
                rows[i] = _best_rows(transposed(), kk, largest)
                continue
            row, col = found
            take = (value >= thr[col]) if largest else (value <= thr[col])
            order_key = _ordered(value[take])
            candidates.append((row[take], col[take] + i * n, -order_key if largest else order_key))

        h_token = token_hash(chunks, pos)  # (M,)
        h_neuron = neuron_hash(cfg.seed, cfg.salt, layer, n, dev)  # (N,): priority = h_token + h_neuron
        # An active token with priority NO_PRIORITY counts as inactive (it marks an empty slot).
        sampled = None if int(unfilled[2].sum()) * m > limit else \
            _sample_candidates(h_token, h_neuron, thr_sample.clamp(max=NO_PRIORITY - 1), limit)
        if sampled is not None:
            row, col = sampled
            act = flat[row, col] > 0
            row, col = row[act], col[act]
            candidates.append((row, col + 2 * n, priority(h_neuron[col], h_token[row])))
        else:
            p = priority(h_neuron[:, None], h_token[None, :])  # (N, M)
            p.masked_fill_(transposed() <= 0, NO_PRIORITY)
            vals, sample_rows = p.topk(kk, dim=1, largest=False, sorted=False)
            rows[2] = sample_rows.masked_fill_(vals == NO_PRIORITY, -1)  # inactive picks (fewer than kk active tokens)
        rows = rows.view(3 * n, kk)
        if candidates:
            row, col, order_key = (torch.cat(c) for c in zip(*candidates))
            rows = torch.maximum(rows, _rank_candidates(row, col, order_key, 3 * n, kk, False))  # one route per kind
        # Columns each example row uses (its candidates are packed at the left, except the full route's).
        used = ((rows >= 0) * torch.arange(1, kk + 1, device=dev)).amax(1)
        changed = used.nonzero().squeeze(1)
        # Most rows have a few candidates and a few rows many: merging them apart keeps the sort narrow.
        narrow = used[changed] <= _NARROW
        groups = [(changed[narrow], min(_NARROW, kk)), (changed[~narrow], int(used.max()) if len(changed) else 0)]
        parts = [_new_examples(s, c, rows[c, :w], flat, keys, t_len, cfg, h_token, h_neuron) for c, w in groups if len(c)]
        if len(parts) == 1:
            examples = parts[0]
        elif parts:
            examples = [torch.cat(t) for t in zip(*parts)]
            order = torch.sort(examples[0], stable=True).indices  # rows ascending, as ``apply_delta`` splits them
            examples = [t[order] for t in examples]
        else:  # no example changes
            none = torch.zeros(0, dtype=torch.int64, device=dev)
            examples = (none, none, flat.new_zeros(0), none, none, flat.new_zeros((0, 2 * cfg.window + 1)))
        (mean_b, m2_b), hist, n_active = pending.result()
    n_b = torch.full((n,), m, dtype=torch.int64, device=dev)
    return LayerDelta(n_b, mean_b, m2_b, n_active, hist, *examples)


def apply_delta(s: LayerState, d: LayerDelta) -> LayerState:
    """Add a batch's ``layer_delta`` to ``s`` in place (its tensors are written) and return ``s``."""
    n, k = s.top.key.shape
    with torch.inference_mode():
        moments = _merge_moments(s, d.n, d.mean, d.m2)
        for name, t in moments.items():
            getattr(s, name).copy_(t)
        s.n_active.add_(d.n_active)
        s.hist.add_(d.hist)
        bounds = [0, *torch.searchsorted(d.row, torch.tensor([n, 2 * n], device=d.row.device)).tolist(), len(d.row)]
        for i, e in enumerate((s.top, s.bottom, s.sample)):
            part = slice(bounds[i], bounds[i + 1])
            index = (d.row[part] - i * n) * k + d.slot[part]
            e.value.view(-1).index_copy_(0, index, d.value[part])
            e.key.view(-1).index_copy_(0, index, d.key[part])
            e.context.view(n * k, -1).index_copy_(0, index, d.context[part])
            if e.prio is not None:
                e.prio.view(-1).index_copy_(0, index, d.primary[part])
    return s


def update_layer(s: LayerState, x: torch.Tensor, chunk: torch.Tensor, cfg: PagesConfig, layer: int) -> LayerState:
    """A new state: ``s`` with one layer's batch merged (``layer_delta`` added to a copy)."""
    return apply_delta(_map(s, torch.clone), layer_delta(s, x, chunk, cfg, layer))


def update(state: PagesState, layer_index: int, x: torch.Tensor, chunk) -> PagesState:
    """``update_layer`` for block ``layer_index`` (0-based) of the state; the chunks are recorded by ``seen``."""
    layers = list(state.layers)
    layers[layer_index] = update_layer(layers[layer_index], x, chunk, state.cfg, layer_index + 1)
    return replace(state, layers=tuple(layers))


def seen(state: PagesState, chunk) -> PagesState:
    """Record a batch's chunks as merged (after every layer's ``update``)."""
    return replace(state, chunks=np.union1d(state.chunks, np.asarray(chunk, np.int64)))


def commit(state: PagesState, deltas: dict, chunk) -> PagesState:
    """Add a batch's deltas {layer_index (0-based): LayerDelta} to ``state`` in place and record its chunks:
    the actor computes every layer's delta during the forward pass and commits once the pass has finished,
    so a batch that fails part way (and is split and run again) is never counted twice."""
    for index, d in deltas.items():
        apply_delta(state.layers[index], d)
    return seen(state, chunk)


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
        "mean": s.mean.numpy(), "sd": sd, "min": s.bottom.value.amin(1).numpy(), "max": s.top.value.amax(1).numpy(),
        "frac_active": frac.astype(np.float64),
        "hist": pa.ListArray.from_arrays(pa.array(np.arange(n_neurons + 1, dtype=np.int32) * hist.shape[1]), pa.array(hist.reshape(-1))),
    })
    parts = []
    for kind, e in zip(KINDS, (s.top, s.bottom, s.sample)):
        e = _best(e, cfg.k, kind)  # the state's slots are unordered
        key = e.key.numpy()
        neuron, rank = np.nonzero(key != EMPTY_KEY)  # filled slots, ranks in order (empty ones sort last)
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
