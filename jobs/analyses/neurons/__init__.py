"""Proper-noun neurons: MLP ``c_fc`` pre-activations of the neuron sample (``activations``), a logistic
regression per neuron and layer (``neuron_logit``), and the best neuron traced over an in-sample and a
held-out chunk (``neuron_heatmap``).

The sample is drawn after the corpus stage (``jobs.corpus.draw_sample``). Each model actor keeps the
sampled pre-activations of the batches it computed (its state: the float32 values the fits use, whatever
``--activations-dtype`` stores); the fit of each layer gathers them from every replica through ``apply``.
"""
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import ray
import torch

from jobs.analysis import Analysis, Capture, Option, Table, Write, block_index, table_layers
from jobs.analyses.neurons.figures import ACROSS_FIGURES, FIGURES
from jobs.corpus import draw_sample
from jobs.plotting import by_model
from jobs.replicas import gather_rows, split_by_owner
from jobs.store import Store, size_text
from probe_core import capture as hooks
from probe_core import neurons

NAME = "neurons"
VALUE_TYPES = {"float16": pa.float16(), "float32": pa.float32()}
ACTIVATIONS = Table("activations", pa.schema([
    ("chunk", pa.int32()), ("pos", pa.int32()), ("label", pa.bool_()), ("values", pa.list_(pa.float16())),
]), partitions=("model", "layer"))
LOGIT = Table("neuron_logit", pa.schema([
    ("layer", pa.int16()), ("neuron", pa.int32()), ("n", pa.int32()), ("beta", pa.float64()), ("se", pa.float64()),
    ("z", pa.float64()), ("p", pa.float64()), ("beta_ci_low", pa.float64()), ("beta_ci_high", pa.float64()),
    ("auroc", pa.float64()), ("significant", pa.bool_()), ("q_bh", pa.float64()),
    ("status", pa.string()), ("converged", pa.bool_()), ("n_iter", pa.int16()),
]))
HEATMAP = Table("neuron_heatmap", pa.schema([
    ("layer", pa.int16()), ("neuron", pa.int32()), ("chunk", pa.int32()), ("pos", pa.int32()),
    ("activation", pa.float32()), ("sampled", pa.bool_()), ("in_sample_chunk", pa.bool_()),
]))
OPTIONS = (
    Option("max_samples", {"type": int, "help": "neurons: at most this many proper nouns (and as many other tokens), drawn from "
                                                "every chunk but the last (held out for the token heatmap); default 1000"}),
    Option("activations_dtype", {"help": "neurons: float16|float32 storage of the activations table (the fits always use the "
                                         "model's float32 values); default float16"}),
)


def activations_schema(d_mlp: int, values_dtype: str) -> pa.Schema:
    """The files' schema: ``values`` a fixed-size list of d_mlp in the run's --activations-dtype."""
    schema = ACTIVATIONS.schema
    return schema.set(schema.get_field_index("values"), pa.field("values", pa.list_(VALUE_TYPES[values_dtype], d_mlp)))


@dataclass(frozen=True)
class Part:
    """The neuron sample: keys (n, 2) int64 (chunk, pos) sorted, labels (n,) bool (proper noun)."""

    keys: np.ndarray
    labels: np.ndarray


def plan(ctx) -> Part:
    return Part(*draw_sample(ctx.corpus, ctx.store, ctx.cfg.max_samples, ctx.cfg.seed))


def describe(plan, part) -> list:
    acts = sum(len(part.keys) * m.n_layer * m.d_mlp * 2 for m in plan.models)
    held = f", chunk {plan.n_chunks - 1} held out" if plan.n_chunks > 1 else ""
    return [f"  {NAME}: {len(part.keys)} sampled tokens ({int(part.labels.sum())} proper nouns{held}); "
            f"activations (float16, every layer): {size_text(acts)} in the object store and on disk"]


# ---------------------------------------------------------------- capture: the actor keeps its sampled rows
def _in_batch(ctx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample rows in this batch, their index into ctx.chunk, their positions)."""
    sel = np.isin(ctx.part.keys[:, 0], ctx.chunk)
    keys = ctx.part.keys[sel]
    return sel, np.searchsorted(np.asarray(ctx.chunk, np.int64), keys[:, 0]), keys[:, 1]


def forward(ctx) -> dict:
    _, b, t = _in_batch(ctx)
    return {"mlp_rows": (b, t)} if len(b) else {}


def reduce(ctx) -> list:
    """Keep the batch's sampled pre-activations in the actor's state; write them as ``activations``."""
    if "mlp_pre" not in ctx.out:
        return []
    mlp = ctx.out["mlp_pre"].float().cpu().numpy()  # (L, n, d_mlp)
    sel, b, t = _in_batch(ctx)
    chunks = np.asarray(ctx.chunk)[b].astype(np.int32)
    pos = np.asarray(t, dtype=np.int32)
    labels = np.asarray(ctx.part.labels[sel], dtype=bool)
    for i, key in enumerate(zip(chunks.tolist(), pos.tolist())):
        ctx.state[key] = mlp[:, i]
    d_mlp, dtype = mlp.shape[-1], ctx.cfg.activations_dtype
    writes = []
    for index, layer in enumerate(table_layers(mlp.shape[0])):
        flat = mlp[index].reshape(-1).astype(dtype)  # storage only: the fits use the state's float32 values
        values = pa.FixedSizeListArray.from_arrays(pa.array(flat, VALUE_TYPES[dtype]), d_mlp)
        data = pa.table({"chunk": chunks, "pos": pos, "label": labels, "values": values})
        writes.append(Write(ACTIVATIONS, data, {"layer": int(layer)}, activations_schema(d_mlp, dtype)))
    return writes


def sample_blocks(worker, keys: np.ndarray, batch_size: int = 1) -> tuple:
    """In the model actor (``apply``): sampled pre-activations per layer, rows in the order of ``keys`` (n, 2).

    Returns n_layer arrays (n, d_mlp) float32, the model's own values (call with ``num_returns=n_layer``
    so each layer is its own object). Rows this process did not compute (a resumed run, or a restarted
    actor) are read back from a float32 ``activations`` table, or else recomputed by a forward pass
    over their chunks, ``batch_size`` chunks at a time: float16 storage is never read back, so the
    fits never see its rounding.
    """
    samples = worker.state[NAME]
    missing = [tuple(k) for k in keys.tolist() if tuple(k) not in samples]
    if missing and not _load_samples(worker, missing):
        _recompute_samples(worker, np.asarray(missing), batch_size)
    stacked = np.stack([samples[tuple(k)] for k in keys.tolist()], axis=1)  # (L, n, d_mlp)
    return tuple(stacked[layer] for layer in range(stacked.shape[0]))


def _recompute_samples(worker, missing: np.ndarray, batch_size: int) -> None:
    """Forward passes over the chunks holding ``missing`` (m, 2) keys; their rows go into the state."""
    needed = np.unique(missing[:, 0])
    for lo in range(0, len(needed), max(1, batch_size)):
        chunk_ids = needed[lo:lo + max(1, batch_size)]
        sel = np.isin(missing[:, 0], chunk_ids)
        b_idx = np.searchsorted(chunk_ids, missing[sel, 0])
        out = worker.forward(worker.chunks.ids(chunk_ids), mlp_rows=(b_idx, missing[sel, 1]))
        mlp = out["mlp_pre"].float().cpu().numpy()  # (L, m_batch, d_mlp)
        for i, key in enumerate(map(tuple, missing[sel].tolist())):
            worker.state[NAME][key] = mlp[:, i]


def _load_samples(worker, missing) -> bool:
    """Read ``missing`` keys back from the activations table if it is float32 and holds them all; else False."""
    per_layer = []
    for layer in table_layers(worker.spec.n_layer):
        folder = worker.store.table_dir(ACTIVATIONS, model=worker.spec.name, layer=int(layer))
        try:
            dataset = ds.dataset(folder, filesystem=worker.store.fs, format="parquet")
        except (FileNotFoundError, OSError):
            return False
        if dataset.schema.field("values").type.value_type != pa.float32():
            return False  # float16 storage: recompute instead of reading rounded values
        table = dataset.to_table()
        index = {(c, p): i for i, (c, p) in enumerate(zip(table["chunk"].to_pylist(), table["pos"].to_pylist()))}
        values = table["values"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, -1)
        per_layer.append((index, values))
    if not all(key in index for index, _ in per_layer for key in missing):
        return False
    for key in missing:
        worker.state[NAME][key] = np.stack([values[index[key]] for index, values in per_layer])
    return True


def neuron_trace(worker, chunk_ids: np.ndarray, layer: int, neuron: int) -> np.ndarray:
    """In the model actor (``apply``): one neuron's c_fc pre-activation at every position of these chunks,
    (B,) -> (B, T) float32; layer is the block number 1..n_layer, as in the tables."""
    with torch.inference_mode():
        ids = torch.tensor(worker.chunks.ids(chunk_ids), dtype=torch.long, device=worker.device)
        point = hooks.mlp_pre(block_index(layer))
        with hooks.capture(worker.model, {point: lambda a: a[..., neuron].float()}) as cache:
            worker.model.transformer(input_ids=ids)
        return cache[point].cpu().numpy()


# ---------------------------------------------------------------- statistics
def fit_neurons(store_uri: str, model: str, layer: int, positions: list, labels: np.ndarray, alpha: float, use_gpu: bool,
                *blocks: np.ndarray) -> dict:
    """Per-neuron logistic regression of the proper-noun label on one layer's pre-activations, gathered from
    several replicas: block j (k_j, d_mlp) holds the sample keys at ``positions[j]``; the rows go back into
    the sample's key order before the fit."""
    device = "cuda" if use_gpu and torch.cuda.is_available() else None
    table = neurons.neuron_logit_table(gather_rows(positions, blocks), labels.astype(np.float64), alpha=alpha, device=device)
    table = table.with_columns(pl.lit(layer, dtype=pl.Int16).alias("layer"))
    Store(store_uri).write_table(LOGIT, f"layer-{layer:03d}", table.to_arrow(), model=model)
    return {"model": model, "layer": layer, "significant": int(table["significant"].sum())}


def best_neuron(store_uri: str, model: str) -> tuple[int, int] | None:
    """(layer, neuron) for the heatmap: the layer with most significant neurons, then its significant
    neuron with the largest positive beta (without any significant one, the ok neuron with the largest beta)."""
    fits = Store(store_uri).scan_model(LOGIT, model).filter(pl.col("status") == "ok").collect()
    if fits.is_empty():
        return None
    counts = fits.group_by("layer").agg(pl.col("significant").sum().alias("k")).sort(["k", "layer"], descending=[True, False])
    layer = int(counts["layer"][0])
    in_layer = fits.filter(pl.col("layer") == layer)
    pool = in_layer.filter(pl.col("significant") & (pl.col("beta") > 0))
    best = (pool if pool.height else in_layer).sort("beta", descending=True)
    return layer, int(best["neuron"][0])


def heatmap_chunks(sample_keys: np.ndarray, n_chunks: int) -> list[tuple[int, bool]]:
    """The chunk with most sampled tokens (in sample) and the first chunk with none (held out)."""
    chunks, counts = np.unique(sample_keys[:, 0], return_counts=True)
    picked = [(int(chunks[np.argmax(counts)]), True)] if len(chunks) else []
    held_out = np.setdiff1d(np.arange(n_chunks), chunks)
    if len(held_out):
        picked.append((int(held_out[0]), False))
    return picked


def heatmap(store_uri: str, model: str, actor, sample_keys: np.ndarray, n_chunks: int, *fits) -> int:
    """After the model's fits (``fits``: their refs, so Ray waits): the best neuron traced by ``actor`` over
    the heatmap's chunks, written as ``neuron_heatmap``; returns rows written."""
    picked, best = heatmap_chunks(sample_keys, n_chunks), best_neuron(store_uri, model)
    if not (best and picked):
        return 0
    activation = ray.get(actor.apply.remote(neuron_trace, np.array([c for c, _ in picked]), *best))
    layer, neuron = best
    n, t = activation.shape
    chunk = np.repeat([c for c, _ in picked], t).astype(np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), n)
    sampled = np.isin(chunk.astype(np.int64) * t + pos, sample_keys[:, 0] * t + sample_keys[:, 1])
    data = pa.table({
        "layer": np.full(n * t, layer, np.int16), "neuron": np.full(n * t, neuron, np.int32), "chunk": chunk, "pos": pos,
        "activation": activation.reshape(-1).astype(np.float32), "sampled": sampled,
        "in_sample_chunk": np.repeat([s for _, s in picked], t),
    })
    Store(store_uri).write_table(HEATMAP, "all", data, model=model)
    return data.num_rows


def stats(ctx, m) -> list:
    """One fit task per layer, then the heatmap. Each replica holds the samples of the batches it computed:
    each is asked for its own keys (replica 0 also for keys no live replica computed in this run: it
    recomputes them), and every layer's fit puts the rows back into the sample's key order."""
    plan, workers, part = ctx.plan, ctx.workers, ctx.plan.parts[NAME]
    owners = split_by_owner(workers.owner[m.name][part.keys[:, 0]], workers.live(m.name))
    per_replica = []
    for r, pos in owners.items():
        refs = workers.actors[m.name][r].apply.options(num_returns=m.n_layer).remote(sample_blocks, part.keys[pos], plan.batch_size)
        per_replica.append(refs if isinstance(refs, list) else [refs])
    task = ray.remote(fit_neurons).options(**ctx.gpu)
    fits = [task.remote(ctx.store.uri, m.name, layer, list(owners.values()), part.labels, plan.cfg.alpha, ctx.use_gpu,
                        *[blocks[block_index(layer)] for blocks in per_replica])
            for layer in map(int, table_layers(m.n_layer))]
    trace = ray.remote(heatmap).remote(ctx.store.uri, m.name, workers[m.name], part.keys, plan.n_chunks, *fits)
    return [(f"layer {layer}/{m.n_layer}", ref) for layer, ref in enumerate(fits, 1)] + [("heatmap", trace)]


# ---------------------------------------------------------------- report
def summaries(t: dict, manifest: dict) -> list:
    if "neuron_logit" not in t:
        return []
    top = (t["neuron_logit"].filter(pl.col("significant")).sort("p", pl.col("z").abs(), descending=[False, True])
           .group_by("model", "layer", maintain_order=True).head(3)
           .select("model", "layer", "neuron", "n", "beta", "se", "z", "p", "q_bh", "status").collect())
    return [by_model("Top 3 significant neurons per model and layer (smallest p)", top, "layer", "p")]


def across(t: dict) -> pl.LazyFrame | None:
    if "neuron_logit" not in t:
        return None
    return t["neuron_logit"].group_by("model").agg(
        pl.col("significant").sum().cast(pl.Int64).alias("n_significant_neurons"),
        pl.len().cast(pl.Int64).alias("n_neurons"),
        pl.col("significant").cast(pl.Float64).mean().alias("frac_significant_neurons"))


ANALYSIS = Analysis(
    name=NAME, heading="Proper-noun neurons",
    blurb="Per-neuron logistic regression of the proper-noun label on pre-GELU MLP activations.",
    tables=(ACTIVATIONS, LOGIT, HEATMAP), options=OPTIONS, plan=plan, describe=describe,
    capture=Capture(reduce=reduce, forward=forward, state=lambda worker, part: {}), stats=stats,
    disk_bytes=lambda plan, m: len(plan.parts[NAME].keys) * m.n_layer * (m.d_mlp * 2 + 12),
    summaries=summaries, figures=FIGURES, across=across, across_figures=ACROSS_FIGURES,
)
