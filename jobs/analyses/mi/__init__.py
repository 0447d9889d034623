"""Pairwise mutual information between hidden-state dimensions per layer (``mi``, ``mi_null``, ``mi_summary``):
15-bin histogram (plug-in and Miller-Madow, with a permutation null) or sklearn's KSG, over the stream's first
``--mi-tokens`` tokens. Nothing per batch: replica 0 recomputes the hidden states of those tokens for the
statistics tasks (``hidden_for``, run in the actor through ``apply``)."""
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from jobs.analysis import Analysis, Option, Table
from jobs.analyses.mi.figures import ACROSS_FIGURES, FIGURES, across, summaries
from jobs.store import Store
from probe_core import mutual_info

NAME = "mi"
DEFAULT_CHUNKS = 16  # --mi-tokens default for histogram MI, in chunks
NULL_PAIRS = 20_000  # seeded sample of pairs for the null (all pairs when a layer has fewer)
KSG_COLUMNS_PER_TASK = 32
MI = Table("mi", pa.schema([("layer", pa.int16()), ("dim_i", pa.int32()), ("dim_j", pa.int32()), ("mi_bits", pa.float64()),
                            ("mi_bits_mm", pa.float64()), ("above_null", pa.bool_())]))
NULL = Table("mi_null", pa.schema([("layer", pa.int16()), ("dim_i", pa.int32()), ("dim_j", pa.int32()), ("mi_bits", pa.float64())]))
SUMMARY = Table("mi_summary", pa.schema([
    ("layer", pa.int16()), ("n_tokens", pa.int32()), ("mean_bits", pa.float64()), ("median_bits", pa.float64()),
    ("p05_bits", pa.float64()), ("p95_bits", pa.float64()), ("mean_bits_mm", pa.float64()),
    ("null_mean_bits", pa.float64()), ("null_p95_bits", pa.float64()), ("null_p99_bits", pa.float64()),
    ("excess_mean_bits", pa.float64()),
]))
OPTIONS = (
    Option("mi_tokens", {"type": int, "help": "mi: the first N tokens of the stream; default: 16 chunks for histogram (fewer "
                                              "where the corpus has fewer), the first chunk for ksg"}),
    Option("mi_method", {"help": "mi: histogram (15 equal-width bins, bits) or ksg (sklearn mutual_info_regression); default histogram"}),
    Option("mi_bins", {"type": int, "help": "mi: histogram bins per dimension; default 15"}),
)


@dataclass(frozen=True)
class Part:
    """The MI token set: the first ``tokens`` tokens of the stream, in its first ``chunks`` chunks."""

    chunks: int
    tokens: int


def plan(ctx) -> Part:
    # Histogram MI defaults to DEFAULT_CHUNKS chunks: its plug-in bias falls as 1/N (about 0.12 bits at
    # 1024 tokens, 0.008 at 16,384), and its cost is linear in N. KSG is superlinear: one chunk.
    cfg = ctx.cfg
    default = DEFAULT_CHUNKS * cfg.chunk_tokens if cfg.mi_method == "histogram" else cfg.chunk_tokens
    tokens = min(cfg.mi_tokens or default, ctx.corpus.n_tokens)
    return Part(chunks=-(-tokens // cfg.chunk_tokens), tokens=tokens)


def describe(plan, part) -> list:
    return [f"  {NAME}: {plan.cfg.mi_method}, the first {part.tokens} tokens ({part.chunks} chunks)"]


# ---------------------------------------------------------------- in the model actor
def hidden_for(worker, chunk_ids: np.ndarray, n_tokens: int, bins: int | None = None) -> tuple:
    """In the model actor (``apply``): hidden states of the first ``n_tokens`` tokens of these chunks, per
    hidden_states index.

    chunk_ids: (B,). Returns n_layer + 1 arrays (``num_returns=n_layer + 1``): (n_tokens, d) float32,
    or with ``bins`` (histogram MI) uint8 bin codes (n_tokens, d) from each dimension's min/max over
    all n_tokens. Why codes: they are all the histogram estimator needs, bit-exact with binning the
    floats, and 4x smaller in the object store (gpt2-xl at 16 chunks: 1.3 GB instead of 5 GB).
    The chunks go through the model a few at a time (``block_chunks``), so the worker never holds
    the float hidden states of all of them: with bins, one pass takes each dimension's min/max and a
    second pass bins each block with the global edges (the forward pass is cheap next to the MI).
    """
    ids_all = worker.chunks.ids(chunk_ids)
    t = ids_all.shape[1]
    step = block_chunks(worker, t)
    blocks = [(b0, ids_all[b0:b0 + step]) for b0 in range(0, len(ids_all), step) if b0 * t < n_tokens]

    def layers_of(block_ids, b0):
        """(L + 1, tokens of this block within n_tokens, d) float32 for one block of chunks."""
        hidden = worker.forward(block_ids)["hidden"]
        keep = min(hidden.shape[1] * hidden.shape[2], n_tokens - b0 * t)
        return hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])[:, :keep].float().cpu().numpy()

    n_states, d = worker.spec.n_layer + 1, worker.spec.n_embd
    if bins is None:
        out = np.empty((n_states, n_tokens, d), np.float32)
        for b0, block_ids in blocks:
            h = layers_of(block_ids, b0)
            out[:, b0 * t: b0 * t + h.shape[1]] = h
        return tuple(out)
    lo, hi = np.full((n_states, d), np.inf, np.float32), np.full((n_states, d), -np.inf, np.float32)
    for b0, block_ids in blocks:
        h = layers_of(block_ids, b0)
        lo, hi = np.minimum(lo, h.min(1)), np.maximum(hi, h.max(1))
    edges = [mutual_info.bin_edges(lo[k], hi[k], bins) for k in range(n_states)]
    out = np.empty((n_states, n_tokens, d), np.uint8)
    for b0, block_ids in blocks:
        h = layers_of(block_ids, b0)
        for k in range(n_states):
            out[k, b0 * t: b0 * t + h.shape[1]] = mutual_info.bin_codes(h[k], edges[k])
    return tuple(out)


def block_chunks(worker, chunk_tokens: int, budget_bytes: int = 512 * 2**20) -> int:
    """Chunks per forward pass of ``hidden_for``: float32 hidden states of all layers near ``budget_bytes``."""
    per_chunk = (worker.spec.n_layer + 1) * chunk_tokens * worker.spec.n_embd * 4
    return max(1, min(worker.fit_chunks or 64, budget_bytes // per_chunk))


# ---------------------------------------------------------------- statistics tasks
def layer_mi(store_uri: str, model: str, layer: int, hidden: np.ndarray, bins: int, use_gpu=False, seed: int = 0) -> dict:
    """All-pairs histogram MI (plug-in and Miller-Madow) and its permutation null of one hidden_states
    layer over the MI token set: hidden (n_tokens, d) float values or uint8 bin codes."""
    h = np.asarray(hidden)  # uint8 bin codes from the worker (hidden_for with bins), or float values
    codes = h if h.dtype == np.uint8 else mutual_info.bin_codes(h, mutual_info.bin_edges(h.min(0), h.max(0), bins))
    device = "cuda" if use_gpu and torch.cuda.is_available() else None
    plug, mm = mutual_info.histogram_mi_codes(codes, bins=bins, device=device)
    ni, nj, null = histogram_null(codes, bins, seed=int(np.random.SeedSequence([seed, layer]).generate_state(1)[0]))
    Store(store_uri).write_table(NULL, f"layer-{layer:03d}", pa.table(
        {"layer": np.full(len(null), layer, np.int16), "dim_i": ni.astype(np.int32), "dim_j": nj.astype(np.int32), "mi_bits": null}), model=model)
    dim_i, dim_j, values = mutual_info.upper_pairs(plug)
    return write_mi(store_uri, model, layer, h.shape[0], dim_i, dim_j, values, mutual_info.upper_pairs(mm)[2], null)


def histogram_null(codes: np.ndarray, bins: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dim_i, dim_j, plug-in MI) of NULL_PAIRS seeded pairs after permuting each dimension's tokens
    independently (seed)."""
    i, j = mutual_info.null_pairs(codes.shape[1], NULL_PAIRS, seed=seed)
    return i, j, mutual_info.pair_mi_codes(mutual_info.null_codes(codes, seed=seed), i, j, bins=bins)


def ksg_columns(hidden: np.ndarray, columns: range, seed: int) -> list[np.ndarray]:
    """KSG MI (bits) of each column in ``columns`` against every later column (sklearn, ~1 s a column)."""
    return [mutual_info.ksg_mi_column(hidden, j, seed=seed) for j in columns]


def write_ksg(store_uri: str, model: str, layer: int, n_tokens: int, d: int, *blocks: list[np.ndarray]) -> dict:
    """Join the column blocks of one layer (in column order) into the mi table."""
    rows = [values for block in blocks for values in block]
    dim_i = np.concatenate([np.full(d - j - 1, j, np.int32) for j in range(d - 1)])
    dim_j = np.concatenate([np.arange(j + 1, d, dtype=np.int32) for j in range(d - 1)])
    return write_mi(store_uri, model, layer, n_tokens, dim_i, dim_j, np.concatenate(rows[: d - 1]))


def write_mi(store_uri: str, model: str, layer: int, n_tokens: int, dim_i, dim_j, values, values_mm=None, null=None) -> dict:
    """mi rows (mi_bits, mi_bits_mm NaN for KSG, above_null: mi_bits > the layer's null p99) and mi_summary."""
    store, part = Store(store_uri), f"layer-{layer:03d}"
    values = np.asarray(values, np.float64)
    values_mm = np.full(len(values), np.nan) if values_mm is None else np.asarray(values_mm, np.float64)
    ns = mutual_info.null_summary(np.zeros(0) if null is None else null)
    above = values > ns["p99"]  # False everywhere when there is no null (NaN p99)
    store.write_table(MI, part, pa.table({"layer": np.full(len(values), layer, np.int16), "dim_i": dim_i, "dim_j": dim_j,
                                          "mi_bits": values, "mi_bits_mm": values_mm, "above_null": above}), model=model)
    s = mutual_info.mi_summary(values)
    summary = {"layer": [layer], "n_tokens": [n_tokens], **{f"{k}_bits": [v] for k, v in s.items()},
               "mean_bits_mm": [mutual_info.mi_summary(values_mm)["mean"]],
               "null_mean_bits": [ns["mean"]], "null_p95_bits": [ns["p95"]], "null_p99_bits": [ns["p99"]],
               "excess_mean_bits": [s["mean"] - ns["mean"]]}
    store.write_table(SUMMARY, part, pa.table(summary), model=model)
    return {"model": model, "layer": layer, "mean_bits": s["mean"]}


def stats(ctx, m) -> list:
    """One histogram task per hidden_states layer, or for KSG (about 1 s a column) tasks over blocks of columns;
    (label, ref) pairs, one per layer."""
    cfg, store, part = ctx.plan.cfg, ctx.store, ctx.plan.parts[NAME]
    # uint8 bin codes from the worker for the histogram (4x smaller than float32 hidden states); floats for KSG.
    bins = cfg.mi_bins if cfg.mi_method == "histogram" and cfg.mi_bins <= 256 else None
    hidden = ctx.workers[m.name].apply.options(num_returns=m.n_layer + 1).remote(hidden_for, np.arange(part.chunks), part.tokens, bins)
    if cfg.mi_method == "histogram":
        task = ray.remote(layer_mi).options(**ctx.gpu)
        return [(f"layer {layer}/{m.n_layer}", task.remote(store.uri, m.name, layer, h, cfg.mi_bins, ctx.use_gpu, cfg.seed))
                for layer, h in enumerate(hidden)]
    d, refs = m.n_embd, []
    block = min(KSG_COLUMNS_PER_TASK, math.ceil((d - 1) / 8))  # at least 8 tasks a layer
    columns, write = ray.remote(ksg_columns), ray.remote(write_ksg)
    for layer, h in enumerate(hidden):
        parts = [columns.remote(h, range(lo, min(lo + block, d - 1)), cfg.seed) for lo in range(0, d - 1, block)]
        refs.append((f"layer {layer}/{m.n_layer}", write.remote(store.uri, m.name, layer, part.tokens, d, *parts)))
    return refs


ANALYSIS = Analysis(
    name=NAME, heading="Mutual information", blurb="Pairwise mutual information between hidden dimensions per layer.",
    tables=(MI, NULL, SUMMARY), options=OPTIONS, plan=plan, describe=describe, stats=stats,
    disk_bytes=lambda plan, m: (m.n_layer + 1) * m.n_embd * (m.n_embd - 1) // 2 * 18,
    summaries=summaries, figures=FIGURES, across=across, across_figures=ACROSS_FIGURES,
)
