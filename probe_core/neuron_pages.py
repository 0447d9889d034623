"""Corpus-wide neuron pages: a mergeable per-(layer, neuron) summary of MLP ``c_fc`` pre-activations,
streamed batch by batch with memory independent of the corpus, and each neuron's direct logit effect.

One ``LayerState`` per layer (N = d_mlp neurons, k examples, W context tokens on each side):

- moments: ``n`` tokens, ``mean``, ``m2`` (float64, Chan's parallel update), ``n_active`` (tokens with x > 0);
  min and max are the best bottom and top examples (k >= 1 keeps them);
- ``hist`` (N, len(HIST_EDGES) + 1) int64 over the fixed ``HIST_EDGES``: bin 0 counts x <= edges[0],
  bin i counts edges[i-1] < x <= edges[i], the last bin x > edges[-1] (``np.searchsorted(edges, x, "left")``),
  so the bins from the one above 0 on count the active tokens (x > 0);
- three ``Examples`` sets of k tokens per neuron: ``top`` (largest x), ``bottom`` (smallest x), both with
  ties broken by (chunk, pos) ascending, and ``sample`` (x > 0 with the smallest ``priority``, ties by
  (chunk, pos)), each with its context: x at pos-W..pos+W within the chunk, NaN outside it. A set's k
  slots are unordered (a batch writes only the slots its new examples take); ``layer_tables`` orders them.

A token is keyed by ``chunk * T + pos`` (T: tokens per chunk). Every update and merge is exact and
independent of batching and order (the moments up to float64 rounding), so replicas' states merge.
Batches hold whole chunks; a state records which chunks it has seen (``PagesState.chunks``).
"""
import contextlib
import functools
import hashlib
import math
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
    """h_token = mix(mix(chunk) ^ pos), elementwise int64 (broadcasting)."""
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
# - one sweep reads the (M, N) batch in row blocks that stay in cache (``_sweep``, the caller's threads): the
#   histogram's bin codes, and each group of ``_GROUP`` rows' max and min;
# - then two threads of one OpenMP thread each (on a shared CPU each parallel op waits for its slowest thread):
#   the caller finds and merges the examples while a second thread counts the histogram (``bincount``); both then
#   take the float64 moments block by block, whichever is free first (``_Moments``);
# - examples: only tokens at least as good as a neuron's worst example can enter: for top and bottom only the
#   groups whose max (min) reaches it are read (``_threshold_candidates``; where a slot is empty, the batch's own
#   kk-th best group max (min) bounds the same way); for the sample, the tokens whose priority is at most the worst,
#   a run of the sorted token hashes (``_sample_candidates``), so nothing but the sweep touches all of (M, N);
# - slots are unordered (``layer_tables`` sorts them), so a batch writes only the slots its new examples
#   take (``LayerDelta``), and cuts context windows only for those.
_WS = threading.local()
_CANDIDATES_PER_SLOT = 4  # the threshold search while its groups and candidates stay <= 2 * this * N * (k + 1)
_NARROW = 4  # example rows with at most this many candidates are merged together, the others apart
_BLOCK_ROWS = 128  # rows per block of the sweep: 128 x d_mlp float32 + float64 stays in a CPU's cache
_GROUP = 16  # rows per group of the top/bottom search (the gcd with the batch's rows): 1/16 of the comparisons
_PAD = torch.iinfo(torch.int64).max  # a candidate matrix's unused entry: sorts after every example


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


def _scratch(name: str, nbytes: int, device) -> torch.Tensor:
    """A reused byte buffer ``name`` of ``nbytes`` on a CPU (per thread); elsewhere a fresh one (CUDA caches)."""
    if torch.device(device).type != "cpu":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    bufs = _WS.__dict__.setdefault("bufs", {})
    buf = bufs.get(name)
    if buf is None or buf.numel() < nbytes:
        bufs[name] = None
        with torch.inference_mode(False):  # usable in and outside inference mode
            buf = bufs[name] = torch.empty(nbytes, dtype=torch.uint8)
    return buf[:nbytes]


def _block_rows(m: int, group: int, device) -> int:
    """Rows per block of a pass over the batch's M rows: ``_BLOCK_ROWS`` rounded down to whole groups on a CPU (a
    block stays in cache); all of them elsewhere (a GPU reads memory fast enough in one block)."""
    return max(group, min(_BLOCK_ROWS, m) // group * group) if torch.device(device).type == "cpu" else m


def _ordered(v: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 with the same order (-0.0 counted as +0.0)."""
    bits = (v + 0.0).view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _value_primary(value: torch.Tensor, top: bool) -> torch.Tensor:
    """The int64 sort key (ascending: best first) of top (-value) or bottom (value) examples."""
    return -_ordered(value) if top else _ordered(value)


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


def _by_column(row: torch.Tensor, col: torch.Tensor, primary: torch.Tensor, value: torch.Tensor, narrow_primary: bool):
    """Candidates ordered by (col, primary, row), as ``_candidate_rows`` takes them. With ``narrow_primary`` (a
    32-bit primary: the order of float32 values) and the input already by row within each column, one stable
    sort on col * 2**32 + primary; otherwise three stable sorts."""
    if narrow_primary:
        order = torch.sort(col * (1 << 32) + primary, stable=True).indices
    else:
        order = torch.sort(row, stable=True).indices
        order = order[torch.sort(primary[order], stable=True).indices]
        order = order[torch.sort(col[order], stable=True).indices]
    return row[order], col[order], primary[order], value[order]


def _candidate_rows(row: torch.Tensor, col: torch.Tensor, primary: torch.Tensor, value: torch.Tensor,
                    n_rows: int, kk: int) -> list:
    """Candidates (E,) of example rows ``col`` (0..n_rows), ordered by (col, primary, batch row) (``_by_column``)
    -> per example row its kk best, packed at the left of a matrix row, in groups by count: the rows with one
    candidate, with at most ``_NARROW``, and more: [(changed (R,) ascending, batch row (R, w) (-1: none),
    primary (R, w) (``_PAD``: none), value (R, w))]."""
    dev = col.device
    counts = torch.bincount(col, minlength=n_rows)
    rank = torch.arange(len(col), device=dev) - (torch.cumsum(counts, 0) - counts)[col]
    keep = rank < kk
    row, col, primary, value, rank = row[keep], col[keep], primary[keep], value[keep], rank[keep]
    used = counts.clamp_(max=kk)
    width = torch.where(used <= 1, 1, torch.where(used <= _NARROW, 2, 3))  # the group of each example row
    groups = []
    for g in (1, 2, 3):
        changed = ((used > 0) & (width == g)).nonzero().squeeze(1)
        if not len(changed):
            continue
        mine = width[col] == g
        at = (torch.searchsorted(changed, col[mine]), rank[mine])
        w = 1 if g == 1 else min(_NARROW, kk) if g == 2 else int(used[changed].max())
        brow = torch.full((len(changed), w), -1, dtype=torch.int64, device=dev).index_put_(at, row[mine])
        bprim = torch.full((len(changed), w), _PAD, dtype=torch.int64, device=dev).index_put_(at, primary[mine])
        bval = torch.zeros((len(changed), w), dtype=value.dtype, device=dev).index_put_(at, value[mine])
        groups.append((changed, brow, bprim, bval))
    return groups


def _windows(flat: torch.Tensor, rows: torch.Tensor, neuron: torch.Tensor, t_len: int, window: int) -> torch.Tensor:
    """flat (M, N) with row b * T + t; rows (S,) (-1: none), neuron (S,) -> x at t-W..t+W of each row's
    chunk: (S, 2W + 1) float32, NaN outside the chunk (and for row -1). One ``take`` of every window, its rows
    clamped to the batch; the few windows crossing their chunk's edge are then masked."""
    m, n = flat.shape
    step = torch.arange(-window, window + 1, device=flat.device)
    at = (rows.clamp(min=0)[:, None] + step).clamp_(0, m - 1)
    out = flat.reshape(-1).take(at.mul_(n).add_(neuron[:, None]))
    t = rows % t_len
    e = ((t < window) | (t >= t_len - window) | (rows < 0)).nonzero().squeeze(1)
    if len(e):
        te = t[e, None] + step
        out[e] = out[e].masked_fill_((te < 0) | (te >= t_len) | (rows[e] < 0)[:, None], float("nan"))
    return out


def _primary(s: LayerState, rows: torch.Tensor, n: int):
    """The state's (key, primary) of example ``rows`` (ascending, into top | bottom | sample, 0..3N): (R, k)
    each; primary is the int64 sort key, ascending: -value for top, value for bottom, the sample's priority."""
    bounds = torch.searchsorted(rows, torch.tensor([n, 2 * n], device=rows.device)).tolist()
    local = [p - i * n for i, p in enumerate(torch.tensor_split(rows, bounds))]
    key = torch.cat([e.key.index_select(0, r) for e, r in zip((s.top, s.bottom, s.sample), local)])
    primary = torch.cat([_value_primary(s.top.value.index_select(0, local[0]), True),
                         _value_primary(s.bottom.value.index_select(0, local[1]), False), s.sample.prio.index_select(0, local[2])])
    return key, primary


def _new_examples(s: LayerState, changed: torch.Tensor, brow: torch.Tensor, bprim: torch.Tensor, bval: torch.Tensor,
                  flat: torch.Tensor, keys: torch.Tensor, t_len: int, cfg: PagesConfig):
    """Merge the batch's candidates of the example rows ``changed`` (R,) (``_candidate_rows``' batch row, primary,
    value, each (R, w)) with the state's slots, as ``_select`` would: the k best by primary, then key. Returns
    the examples that enter, each taking a slot one of the row's evicted examples frees: (row (E,) into 0..3N
    ascending, slot (E,), value, key, primary (E,), context (E, 2W + 1)). Context windows are cut only for these."""
    k, n = cfg.k, flat.shape[1]
    s_key, s_primary = _primary(s, changed, n)
    if brow.shape[1] == 1:  # one candidate per row (most rows, once the slots have filled): it meets the worst slot
        c_key, c_primary = keys[brow[:, 0]], bprim[:, 0]
        worst = s_primary.amax(1, keepdim=True)
        at_worst = s_primary == worst
        worst_key = torch.where(at_worst, s_key, torch.iinfo(torch.int64).min).amax(1, keepdim=True)
        slot = (at_worst & (s_key == worst_key)).byte().argmax(1)  # the worst: largest primary, then key
        worst, worst_key = worst[:, 0], worst_key[:, 0]
        new_r = ((c_primary < worst) | ((c_primary == worst) & (c_key < worst_key))).nonzero().squeeze(1)
        row = changed[new_r]
        return (row, slot[new_r], bval[new_r, 0], c_key[new_r], c_primary[new_r],
                _windows(flat, brow[new_r, 0], row % n, t_len, cfg.window))
    ok = brow >= 0
    key = torch.cat([s_key, torch.where(ok, keys[brow.clamp(min=0)], EMPTY_KEY)], 1)
    primary = torch.cat([s_primary, bprim], 1)
    # Which k stay: one sort by primary; only where the k-th and (k+1)-th tie (repeated contexts give equal
    # activations) does the key decide, and those rows are sorted again by key first.
    ranked, order = torch.sort(primary, dim=1, stable=True)
    tied = (ranked[:, k] == ranked[:, k - 1]).nonzero().squeeze(1)
    if len(tied):
        by_key = torch.sort(key[tied], dim=1, stable=True).indices
        order[tied] = by_key.gather(1, torch.sort(primary[tied].gather(1, by_key), dim=1, stable=True).indices)
    kept = torch.zeros(key.shape, dtype=torch.bool, device=key.device).scatter_(1, order[:, :k], True)
    # Exactly k stay, so a row frees as many slots as it takes batch examples; both lists are row-major: pair them.
    # (A padding entry never stays: the state's k slots, empty ones included, sort before it.)
    free_r, free_slot = (~kept[:, :k]).nonzero(as_tuple=True)
    new_r, new_j = kept[:, k:].nonzero(as_tuple=True)
    batch_row = brow[new_r, new_j]
    row = changed[new_r]
    return (row, free_slot, bval[new_r, new_j], key[:, k:][new_r, new_j], bprim[new_r, new_j],
            _windows(flat, batch_row, row % n, t_len, cfg.window))


def _sample_candidates(h_token: torch.Tensor, h_neuron: torch.Tensor, thr: torch.Tensor, walk: torch.Tensor,
                       active, kk: int):
    """The sample's candidates (row, col), ordered by (col, priority, row). For neuron n the tokens of priority
    h_token + h_n <= thr[n] (int64, wrapping) are those whose hash lies in the cyclic interval [MIN - h_n,
    thr_n - h_n]: a run of the sorted token hashes starting where the priority is MIN and rising along it (two
    ``searchsorted``; equal hashes stay in row order: a stable sort), so no (M, N) pass. For the neurons ``walk``
    (N,) bool (unfilled slots: every active token enters, so only the batch's kk first active ones can stay)
    the run ends at its kk-th active token (``active(rows, cols)`` -> bool), found on ever longer prefixes."""
    m = len(h_token)
    dev = h_token.device
    hs, by_hash = torch.sort(h_token, stable=True)
    lo, hi = torch.iinfo(torch.int64).min - h_neuron, thr - h_neuron  # both wrap mod 2**64
    first = torch.searchsorted(hs, lo)
    past = torch.searchsorted(hs, hi, right=True)
    count = torch.where(lo <= hi, past - first, m - first + past)  # lo > hi: the interval wraps past MAX
    todo, length = walk.nonzero().squeeze(1), min(m, 4 * kk)
    while len(todo):
        seen = active(by_hash[(first[todo, None] + torch.arange(length, device=dev)) % m], todo[:, None]).cumsum(1)
        done = seen[:, -1] >= kk
        count[todo[done]] = (seen[done] >= kk).byte().argmax(1) + 1  # up to the kk-th active token
        if length == m:
            count[todo[~done]] = m
            break
        todo, length = todo[~done], min(m, 4 * length)
    total = int(count.sum())
    col = torch.repeat_interleave(torch.arange(len(h_neuron), device=dev), count, output_size=total)
    offset = torch.arange(total, device=dev) - (torch.cumsum(count, 0) - count)[col]
    return by_hash[(first[col] + offset) % m], col


def _sweep(flat: torch.Tensor, group: int):
    """The one pass over the whole batch flat (M, N), in row blocks that stay in cache, on the caller's threads:
    the histogram's bin codes (M, N) int32 (neuron j's bins at j * (HIST_BINS + 2) ...), and each group of
    ``group`` rows' max and min (M / group, N).

    Bin i counts the x with edges[i-1] < x <= edges[i] (the first bin x <= edges[0], the last x > edges[-1]):
    the number of edges below x, ``searchsorted(HIST_EDGES, x, "left")``. With a = 4x (exact in float32: a power
    of two) and the edges at the integers -32..32 of a, that is clamp(ceil(a), -32, 33) + 32 = ceil(clamp(a,
    -32, 33)) + 32. Bins 33 on count x > 0 (edges[32] = 0)."""
    m, n = flat.shape
    dev = flat.device
    rows = _block_rows(m, group, dev)
    width = HIST_BINS + 2
    if n * width >= 1 << 24:
        raise ValueError(f"{n} neurons: the histogram's float32 codes are exact below {(1 << 24) // width}")
    lo = HIST_LO * HIST_PER_UNIT
    offsets = torch.arange(n, dtype=torch.float32, device=dev) * width - lo  # exact: n * width < 2**24
    sizes = [-(-size // 8) * 8 for size in (m * n * 4, rows * n * 4)]
    codes, a = torch.split(_scratch("sweep", sum(sizes), dev), sizes)
    codes, a = codes[:m * n * 4].view(torch.int32).view(m, n), a[:rows * n * 4].view(torch.float32).view(rows, n)
    gmax, gmin = (torch.empty((m // group, n), dtype=flat.dtype, device=dev) for _ in range(2))
    for r0 in range(0, m, rows):
        block = flat[r0:r0 + rows]
        nb = len(block)
        codes[r0:r0 + nb].copy_(torch.mul(block, HIST_PER_UNIT, out=a[:nb]).clamp_(lo, 1 - lo).ceil_().add_(offsets))
        groups = block.view(nb // group, group, n)
        g0 = r0 // group
        torch.amax(groups, 1, out=gmax[g0:g0 + nb // group])
        torch.amin(groups, 1, out=gmin[g0:g0 + nb // group])
    return codes, gmax, gmin


def _counts(codes: torch.Tensor) -> torch.Tensor:
    """The histogram (N, HIST_BINS + 2) int64 of ``_sweep``'s codes."""
    n = codes.shape[1]
    return torch.bincount(codes.view(-1), minlength=n * (HIST_BINS + 2)).view(n, HIST_BINS + 2)


def _histogram(flat: torch.Tensor) -> torch.Tensor:
    """Counts of (M, N) over HIST_EDGES per column -> (N, HIST_BINS + 2) int64."""
    return _counts(_sweep(flat.float(), 1)[0])


class _Moments:
    """The batch's float64 (mean, m2) per column of flat (M, N), as one task per block of rows (two passes over a
    float64 copy of the block, blocks combined by Chan's update), for threads to share: ``run(buffer)`` does
    tasks until none is left (each task is taken once: a range iterator's ``next`` holds the GIL)."""

    def __init__(self, flat: torch.Tensor, rows: int):
        self.flat, self.rows = flat, rows
        m, n = flat.shape
        self.starts = list(range(0, m, rows))
        self.sums, self.m2s = (torch.empty((len(self.starts), n), dtype=torch.float64, device=flat.device) for _ in range(2))
        self.todo = iter(range(len(self.starts)))

    def buffer(self, name: str) -> torch.Tensor:
        return _scratch(name, self.rows * self.flat.shape[1] * 8, self.flat.device).view(torch.float64).view(self.rows, -1)

    def run(self, x64: torch.Tensor) -> None:
        for i in self.todo:
            block = self.flat[self.starts[i]:self.starts[i] + self.rows]
            x = x64[:len(block)]
            x.copy_(block)
            torch.sum(x, 0, out=self.sums[i])
            torch.sum(x.sub_(self.sums[i] / len(x)).square_(), 0, out=self.m2s[i])

    def result(self):
        m = self.flat.shape[0]
        sizes = torch.tensor([min(self.rows, m - r0) for r0 in self.starts], dtype=torch.float64, device=self.flat.device)[:, None]
        mean = self.sums.sum(0) / m
        return mean, self.m2s.sum(0) + (sizes * (self.sums / sizes - mean) ** 2).sum(0)  # Chan's update, all blocks at once


class _Helper:
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


def _threshold_candidates(flat: torch.Tensor, gmax: torch.Tensor, gmin: torch.Tensor, group: int,
                          thr_top: torch.Tensor, thr_bottom: torch.Tensor, limit: int):
    """The tokens with x >= thr_top[col] and those with x <= thr_bottom[col], reading only the groups of rows
    whose max (min) reaches the threshold: per kind (row, col, value) ordered by group, column, then row (so by
    row within a column); None instead when more than ``limit`` groups or candidates are found (many ties with
    the thresholds)."""
    m, n = flat.shape
    g, col = _sparse_nonzero((gmax >= thr_top).logical_or_(gmin <= thr_bottom))
    if len(g) > limit:
        return None
    rows = (g * group)[:, None] + torch.arange(group, device=flat.device)  # (P, group)
    value = flat.reshape(-1).take(rows * n + col[:, None])
    found = []
    for thr, largest in ((thr_top, True), (thr_bottom, False)):
        t = thr[col][:, None]
        p, j = (value >= t if largest else value <= t).nonzero(as_tuple=True)
        found.append((rows[p, j], col[p], value[p, j]))
    return None if sum(len(f[0]) for f in found) > limit else found


def _worst(s: LayerState):
    """Per neuron (N,) the worst example of each set (top: its smallest value, bottom: largest, sample: largest
    priority) and whether the set has an empty slot; the slots are unordered."""
    unfilled = [(e.key == EMPTY_KEY).any(1) for e in (s.top, s.bottom, s.sample)]
    return (s.top.value.amin(1), s.bottom.value.amax(1), s.sample.prio.amax(1)), unfilled


@functools.lru_cache(maxsize=256)
def _neuron_hash(seed: int, salt: int, layer: int, n: int, device: str) -> torch.Tensor:
    """``neuron_hash``, made once per layer (it never changes); callers must not write it."""
    with torch.inference_mode(False):
        return neuron_hash(seed, salt, layer, n, device)


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


def _full_candidates(flat: torch.Tensor, rows: torch.Tensor, col0: int):
    """A full topk's (N, kk) batch rows per neuron as candidates (row, col + col0, primary, value) of top (col0 0)
    or bottom."""
    n, kk = rows.shape
    col = torch.arange(n, device=flat.device).repeat_interleave(kk)
    row = rows.reshape(-1)
    value = flat.reshape(-1).take(row * flat.shape[1] + col)
    return row, col + col0, _value_primary(value, col0 == 0), value


def layer_delta(s: LayerState, x: torch.Tensor, chunk: torch.Tensor, cfg: PagesConfig, layer: int) -> LayerDelta:
    """What one layer's batch changes in its state ``s`` (read, not written): x (B, T, N) pre-activations of
    whole chunks ``chunk`` (B,), ascending, none of them in ``s``; ``layer`` is the table's layer number
    (1..n_layer), part of the sample's priority."""
    b_len, t_len, n = x.shape
    if t_len != cfg.chunk_tokens:
        raise ValueError(f"a batch of {t_len} tokens per chunk, but the state counts {cfg.chunk_tokens}")
    dev = x.device
    cpu = dev.type == "cpu"
    flat = x.float().reshape(b_len * t_len, n).contiguous()  # (M, N): row b * T + t, ascending in (chunk, pos)
    chunk = torch.as_tensor(chunk, dtype=torch.int64, device=dev)
    m = flat.shape[0]
    limit = _CANDIDATES_PER_SLOT * n * (cfg.k + 1)
    thresholds, unfilled = _worst(s)
    group = math.gcd(m, _GROUP)
    codes, gmax, gmin = _sweep(flat, group)
    moments = _Moments(flat, _block_rows(m, group, dev))
    # The rest runs on two threads of one OpenMP thread each: this one merges the examples while a helper counts
    # the histogram; then both take the moments' blocks.
    with _threads(1 if cpu else 0):
        pending = None
        if cpu:
            helper_x64 = moments.buffer("moments-helper")  # this thread's buffer: the helper is a new thread each time

            def helper():
                hist = _counts(codes)
                moments.run(helper_x64)
                return hist
            pending = _Helper(helper)
        try:
            examples = _examples(s, flat, chunk, cfg, layer, thresholds, unfilled, (gmax, gmin, group), limit)
            moments.run(moments.buffer("moments"))
        except BaseException:
            if pending is not None:  # it reads this thread's buffers: let it finish before they are reused
                pending.thread.join()
            raise
        hist = pending.result() if cpu else _counts(codes)
    mean_b, m2_b = moments.result()
    n_b = torch.full((n,), m, dtype=torch.int64, device=dev)
    return LayerDelta(n_b, mean_b, m2_b, hist[:, 1 - HIST_LO * HIST_PER_UNIT:].sum(1), hist, *examples)


def _examples(s: LayerState, flat: torch.Tensor, chunk: torch.Tensor, cfg: PagesConfig, layer: int, thresholds,
              unfilled, extremes, limit: int):
    """``layer_delta``'s examples that enter (``_new_examples``' tuple, all rows together): each kind's candidates
    (top and bottom by the threshold search, or a full topk where ties with the thresholds make too many; the
    sample by its hash run), ranked and merged with the state's slots."""
    m, n = flat.shape
    t_len = cfg.chunk_tokens
    dev = flat.device
    kk = min(cfg.k, m)
    thr_top, thr_bottom, thr_sample = thresholds
    gmax, gmin, group = extremes
    pos = torch.arange(t_len, dtype=torch.int64, device=dev)
    keys = (chunk[:, None] * t_len + pos).reshape(-1)  # (M,)
    # A neuron with an empty slot takes any token, but only the batch's own kk best can stay, and they reach the
    # kk-th best group max (min): kk groups hold a token at least that good.
    bounded = []
    for thr, g, empty, largest in ((thr_top, gmax, unfilled[0], True), (thr_bottom, gmin, unfilled[1], False)):
        u = empty.nonzero().squeeze(1)
        if len(u) and len(g) >= kk:
            thr = thr.clone()
            thr[u] = g[:, u].topk(kk, dim=0, largest=largest).values[-1]
        bounded.append(thr)
    thr_top, thr_bottom = bounded
    candidates = []  # (row, 3N-column, int64 sort key ascending, value) of each kind
    found = _threshold_candidates(flat, gmax, gmin, group, thr_top, thr_bottom, 2 * limit)
    if found is None:  # too many ties with the thresholds: the full topk
        xt = flat.T.contiguous()  # (N, M)
        for i, largest in enumerate((True, False)):
            candidates.append(_by_column(*_full_candidates(flat, _best_rows(xt, kk, largest), i * n), False))
    else:
        for i, (row, col, value) in enumerate(found):  # by row within each column
            candidates.append(_by_column(row, col + i * n, _value_primary(value, i == 0), value, True))

    h_token = token_hash(chunk[:, None], pos).reshape(-1)  # (M,): mix(chunk) once per chunk
    h_neuron = _neuron_hash(cfg.seed, cfg.salt, layer, n, str(dev))  # (N,): priority = h_token + h_neuron
    value_at = lambda r, c: flat.reshape(-1).take(r * n + c)  # noqa: E731
    row, col = _sample_candidates(h_token, h_neuron, thr_sample.clamp(max=NO_PRIORITY - 1), unfilled[2],
                                  lambda r, c: value_at(r, c) > 0, kk)
    value, prio = value_at(row, col), priority(h_neuron[col], h_token[row])
    act = (value > 0) & (prio != NO_PRIORITY)  # an active token of priority NO_PRIORITY counts as inactive (empty slots have it)
    candidates.append((row[act], col[act] + 2 * n, prio[act], value[act]))  # by (col, priority, row)
    row, col, order_key, value = (torch.cat(c) for c in zip(*candidates))  # the kinds' columns ascend: by column
    parts = [_new_examples(s, *g, flat, keys, t_len, cfg) for g in _candidate_rows(row, col, order_key, value, 3 * n, kk)]
    if len(parts) == 1:
        return parts[0]
    if parts:
        examples = [torch.cat(t) for t in zip(*parts)]
        order = torch.sort(examples[0], stable=True).indices  # rows ascending, as ``apply_delta`` splits them
        return [t[order] for t in examples]
    none = torch.zeros(0, dtype=torch.int64, device=dev)  # no example changes
    return none, none, flat.new_zeros(0), none, none, flat.new_zeros((0, 2 * cfg.window + 1))


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
