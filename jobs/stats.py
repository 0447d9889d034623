"""Statistics stage: one function per (model, layer) unit of work, run as Ray tasks by the driver.

Each reads its input (an activation block from the object store, or a table of the run) and writes
its result shards itself, returning only a small summary.
"""
import numpy as np
import polars as pl
import pyarrow as pa

from jobs.store import Store
from probe_core import attn_ar, mutual_info, neurons, path_length, rotation


def _device(use_gpu: bool) -> str | None:
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else None


def fit_neurons(store_uri: str, model: str, layer: int, block: np.ndarray, labels: np.ndarray, alpha: float, use_gpu=False) -> dict:
    """Per-neuron logistic regression of the proper-noun label on one layer's pre-activations (n, d_mlp)."""
    table = neurons.neuron_logit_table(block, labels.astype(np.float64), alpha=alpha, device=_device(use_gpu))
    table = table.with_columns(pl.lit(layer, dtype=pl.Int16).alias("layer"))
    Store(store_uri).write_table("neuron_logit", f"layer-{layer:03d}", table.to_arrow(), model=model)
    return {"model": model, "layer": layer, "significant": int(table["significant"].sum())}


def layer_mi(store_uri: str, model: str, layer: int, hidden: np.ndarray, bins: int, use_gpu=False, seed: int = 0) -> dict:
    """All-pairs histogram MI (plug-in and Miller-Madow) and its permutation null of one hidden_states
    layer over the MI token set: hidden (n_tokens, d) float values or uint8 bin codes."""
    h = np.asarray(hidden)  # uint8 bin codes from the worker (hidden_for with bins), or float values
    codes = h if h.dtype == np.uint8 else mutual_info.bin_codes(h, mutual_info.bin_edges(h.min(0), h.max(0), bins))
    plug, mm = mutual_info.histogram_mi_codes(codes, bins=bins, device=_device(use_gpu))
    ni, nj, null = _histogram_null(codes, bins, seed=int(np.random.SeedSequence([seed, layer]).generate_state(1)[0]))
    Store(store_uri).write_table("mi_null", f"layer-{layer:03d}", pa.table(
        {"layer": np.full(len(null), layer, np.int16), "dim_i": ni.astype(np.int32), "dim_j": nj.astype(np.int32), "mi_bits": null}), model=model)
    dim_i, dim_j, values = mutual_info.upper_pairs(plug)
    return write_mi(store_uri, model, layer, h.shape[0], dim_i, dim_j, values, mutual_info.upper_pairs(mm)[2], null)


NULL_PAIRS = 20_000  # seeded sample of pairs for the null (all pairs when a layer has fewer)


def _histogram_null(codes: np.ndarray, bins: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dim_i, dim_j, plug-in MI) of NULL_PAIRS seeded pairs after permuting each dimension's tokens
    independently (seed)."""
    i, j = mutual_info.null_pairs(codes.shape[1], NULL_PAIRS, seed=seed)
    return i, j, mutual_info.pair_mi_codes(mutual_info.null_codes(codes, seed=seed), i, j, bins=bins)


KSG_COLUMNS_PER_TASK = 32


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
    store.write_table("mi", part, pa.table({"layer": np.full(len(values), layer, np.int16), "dim_i": dim_i, "dim_j": dim_j,
                                            "mi_bits": values, "mi_bits_mm": values_mm, "above_null": above}), model=model)
    s = mutual_info.mi_summary(values)
    summary = {"layer": [layer], "n_tokens": [n_tokens], **{f"{k}_bits": [v] for k, v in s.items()},
               "mean_bits_mm": [mutual_info.mi_summary(values_mm)["mean"]],
               "null_mean_bits": [ns["mean"]], "null_p95_bits": [ns["p95"]], "null_p99_bits": [ns["p99"]],
               "excess_mean_bits": [s["mean"] - ns["mean"]]}
    store.write_table("mi_summary", part, pa.table(summary), model=model)
    return {"model": model, "layer": layer, "mean_bits": s["mean"]}


def scan(store: Store, table: str, model: str) -> pl.LazyFrame:
    return store.scan(f"{table}/model={model}")


def model_attn_ar(store_uri: str, model: str, alpha: float = 0.05, start: int = 3) -> int:
    """AR(2) OLS of log attention norms per layer and chunk, and pooled per layer; significance at
    alpha with Bonferroni over the model's layers (pooled) or its per-chunk regressions (``ar2_table``)."""
    store = Store(store_uri)
    norms = scan(store, "attn_norms", model).sort("layer", "chunk", "pos").collect()
    frames, n_layers = [], norms["layer"].n_unique()
    for (layer,), part in norms.group_by("layer", maintain_order=True):
        wide = part.pivot(on="pos", index="chunk", values="log_norm", sort_columns=False).sort("chunk")
        positions = sorted(int(c) for c in wide.columns if c != "chunk")
        y = wide.select([str(p) for p in positions]).to_numpy().astype(np.float64)
        table = attn_ar.ar2_table(y, wide["chunk"].to_numpy(), start=start, alpha=alpha, n_layers=n_layers)
        frames.append(table.with_columns(pl.lit(layer, dtype=pl.Int16).alias("layer")))
    result = pl.concat(frames)
    store.write_table("attn_ar", "all", result.to_arrow(), model=model)
    return result.height


def model_rotation(store_uri: str, model: str, alpha: float, *after) -> int:
    """Paired t-tests per layer (target vs previous) for each source of occurrences.

    ``after``: refs of tasks that must finish first, passed as top-level arguments so Ray waits for them."""
    store = Store(store_uri)
    angles = scan(store, "rotation_angles", model).collect()
    frames = []
    for (target, source), part in angles.group_by("target", "source", maintain_order=True):
        wide = {k: _occurrence_matrix(part, k) for k in ("target", "previous", "shuffled")}
        table = rotation.rotation_tests(wide["target"], wide["previous"], wide["shuffled"], alpha=alpha)
        frames.append(table.with_columns(pl.lit(target).alias("target"), pl.lit(source).alias("source")))
    if not frames:
        return 0
    result = pl.concat(frames)
    store.write_table("rotation", "all", result.to_arrow(), model=model)
    return result.height


def _occurrence_matrix(frame: pl.DataFrame, kind: str) -> np.ndarray:
    """(n_occurrences, n_layer) angles of one kind, occurrences ordered by (chunk, pos)."""
    wide = frame.filter(pl.col("kind") == kind).pivot(on="layer", index=["chunk", "pos"], values="angle_rad").sort("chunk", "pos")
    layers = sorted((c for c in wide.columns if c not in ("chunk", "pos")), key=int)
    return wide.select(layers).to_numpy().astype(np.float64)


def model_path_summary(store_uri: str, model: str, n_layer: int) -> dict:
    """Pearson r between path_step and the next-token logit (position 0 and the chunk's last position
    left out), with Fisher-z 95% intervals: the last layer in ``path_summary``, every layer in ``path_layer_r``."""
    store = Store(store_uri)
    tokens = scan(store, "tokens", model).select("chunk", "pos", "next_token_logit")
    final = scan(store, "layer_metrics", model).filter(pl.col("layer") == n_layer).select("chunk", "pos", "path_step")
    joined = final.join(tokens, on=["chunk", "pos"]).collect()
    r, n = path_length.path_logit_correlation(
        joined["path_step"].to_numpy(), joined["next_token_logit"].fill_null(np.nan).to_numpy(), joined["pos"].to_numpy()
    )
    lo, hi = path_length.fisher_ci(r, n)
    store.write_table("path_summary", "all", pa.table({"n_tokens": [n], "r_path_logit": [r], "r_ci_low": [float(lo)],
                                                       "r_ci_high": [float(hi)]}), model=model)
    # Every layer: reduced lazily per layer (the joined table of all layers can exceed memory at corpus scale).
    x, y = pl.col("path_step").cast(pl.Float64), pl.col("next_token_logit").cast(pl.Float64)
    per_layer = (
        scan(store, "layer_metrics", model).select("chunk", "pos", "layer", "path_step").join(tokens, on=["chunk", "pos"])
        .filter((pl.col("pos") > 0) & y.is_finite() & x.is_finite())  # null logits drop out here too
        .group_by("layer").agg(pl.len().cast(pl.Int64).alias("n_tokens"), pl.corr(x, y).alias("r"),
                               (x.max() > x.min()).alias("x_varies"), (y.max() > y.min()).alias("y_varies"))
        .sort("layer").collect()
    )
    # As path_logit_correlation: NaN r with fewer than 3 tokens or a constant side.
    ok = (per_layer["n_tokens"] >= 3) & per_layer["x_varies"] & per_layer["y_varies"]
    r_layer = np.where(ok.to_numpy(), per_layer["r"].fill_null(np.nan).to_numpy(), np.nan)
    lo, hi = path_length.fisher_ci(r_layer, per_layer["n_tokens"].to_numpy())
    store.write_table("path_layer_r", "all", pa.table({
        "layer": per_layer["layer"].to_numpy(), "n_tokens": per_layer["n_tokens"].to_numpy(), "r": r_layer,
        "r_ci_low": lo, "r_ci_high": hi}), model=model)
    return {"model": model, "n_tokens": n, "r_path_logit": r}


def best_neuron(store_uri: str, model: str) -> tuple[int, int] | None:
    """(layer, neuron) for the heatmap: the layer with most significant neurons, then its significant
    neuron with the largest positive beta (without any significant one, the ok neuron with the largest beta)."""
    fits = scan(Store(store_uri), "neuron_logit", model).filter(pl.col("status") == "ok").collect()
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


def write_heatmap(store_uri: str, model: str, layer: int, neuron: int, picked, activation: np.ndarray, sample_keys: np.ndarray) -> int:
    """Rows of table neuron_heatmap: activation (n_picked, T) of one neuron over the picked chunks."""
    n, t = activation.shape
    chunk = np.repeat([c for c, _ in picked], t).astype(np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), n)
    sampled = np.isin(chunk.astype(np.int64) * t + pos, sample_keys[:, 0] * t + sample_keys[:, 1])
    data = pa.table({
        "layer": np.full(n * t, layer, np.int16), "neuron": np.full(n * t, neuron, np.int32), "chunk": chunk, "pos": pos,
        "activation": activation.reshape(-1).astype(np.float32), "sampled": sampled,
        "in_sample_chunk": np.repeat([s for _, s in picked], t),
    })
    Store(store_uri).write_table("neuron_heatmap", "all", data, model=model)
    return data.num_rows


def fit_neurons_gathered(store_uri: str, model: str, layer: int, positions: list, labels: np.ndarray, alpha: float,
                         use_gpu: bool, *blocks: np.ndarray) -> dict:
    """fit_neurons on one layer's samples gathered from several replicas: block j (k_j, d_mlp) holds the
    sample keys at ``positions[j]``; the rows go back into the sample's key order before the fit."""
    from jobs.replicas import gather_rows

    return fit_neurons(store_uri, model, layer, gather_rows(positions, blocks), labels, alpha, use_gpu)
