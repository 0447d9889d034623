"""Path length: per token and layer the L2 step of the hidden state, its cumulative sum and the angle; the
model's logit of the true next token; Pearson r of the steps with it (``path_summary``, ``path_layer_r``).

Always run: its tables (``tokens``, ``layer_metrics``) key every other per-token table.
"""
import numpy as np
import polars as pl
import pyarrow as pa
import ray
from matplotlib.figure import Figure

from jobs.analysis import Analysis, Capture, FigureSpec, Table, Write
from jobs.plotting import (add_lines, by_model, collect, depth_legend, depth_lines, int_x, models_of, panels,
                           resolve_chunk, thin, wide, with_depth)
from jobs.store import Store
from probe_core import path_length

# Per model, only what the model computes; the tokens view of ``probe query`` adds the corpus columns.
TOKENS = Table("tokens", pa.schema([("chunk", pa.int32()), ("pos", pa.int32()), ("next_token_logit", pa.float32())]))
LAYER_METRICS = Table("layer_metrics", pa.schema([
    ("chunk", pa.int32()), ("pos", pa.int32()), ("layer", pa.int16()),
    ("path_step", pa.float32()), ("path_cum", pa.float32()), ("angle_rad", pa.float32()),
]))
PATH_SUMMARY = Table("path_summary", pa.schema([
    ("n_tokens", pa.int64()), ("r_path_logit", pa.float64()), ("r_ci_low", pa.float64()), ("r_ci_high", pa.float64()),
]))
PATH_LAYER_R = Table("path_layer_r", pa.schema([
    ("layer", pa.int16()), ("n_tokens", pa.int64()), ("r", pa.float64()), ("r_ci_low", pa.float64()), ("r_ci_high", pa.float64()),
]))


def reduce(ctx) -> list:
    """``tokens`` and ``layer_metrics`` rows of one batch (``forward_metrics`` always computes what they need)."""
    chunks, pos = ctx.grid()
    b, t = ctx.input_ids.shape
    logits = np.concatenate([ctx.out["next_logit"].cpu().numpy(), np.zeros((b, 1), np.float32)], axis=1).ravel()
    tokens = pa.table({"chunk": chunks, "pos": pos, "next_token_logit": pa.array(logits, mask=pos == t - 1)})
    chunks, pos, layer = ctx.grid(per_layer=True)
    metrics = pa.table({"chunk": chunks, "pos": pos, "layer": layer,
                        **{k: ctx.per_token_layer(k) for k in ("path_step", "path_cum", "angle_rad")}})
    return [Write(TOKENS, tokens), Write(LAYER_METRICS, metrics)]


def model_path_summary(store_uri: str, model: str, n_layer: int) -> dict:
    """Pearson r between path_step and the next-token logit (position 0 and the chunk's last position
    left out), with Fisher-z 95% intervals: every layer in ``path_layer_r``, the last one in ``path_summary``."""
    store = Store(store_uri)
    tokens = store.scan_model(TOKENS, model).select("chunk", "pos", "next_token_logit")
    steps = store.scan_model(LAYER_METRICS, model).select("chunk", "pos", "layer", "path_step")
    per_layer = path_length.path_layer_correlations(steps.join(tokens, on=["chunk", "pos"]))
    store.write_table(PATH_LAYER_R, "all", per_layer.to_arrow(), model=model)
    last = per_layer.filter(pl.col("layer") == n_layer)
    n, r, lo, hi = last.row(0)[1:] if last.height else (0, float("nan"), float("nan"), float("nan"))  # no usable token
    store.write_table(PATH_SUMMARY, "all", pa.table({"n_tokens": [n], "r_path_logit": [r], "r_ci_low": [lo],
                                                     "r_ci_high": [hi]}), model=model)
    return {"model": model, "n_tokens": n, "r_path_logit": r}


def stats(ctx, m) -> list:
    return [ray.remote(model_path_summary).remote(ctx.store.uri, m.name, m.n_layer)]


def disk_bytes(plan, m) -> int:
    return plan.corpus.n_tokens * (12 + 14 * m.n_layer)  # tokens + layer_metrics


# ---------------------------------------------------------------- report
def fig_path_cumulative(layer_metrics: pl.LazyFrame, chunk: int = 0) -> Figure:
    """Cumulative path length vs layer, one line per token of ``chunk`` coloured by position; panel per model."""
    c = resolve_chunk(layer_metrics, chunk)
    df = collect(layer_metrics.filter(pl.col("chunk") == c).select("model", "pos", "layer", "path_cum"), "path")
    models = models_of(df)
    fig, axes = panels(len(models))
    for ax, m in zip(axes, models):
        keys, layers, Y = wide(df.filter(pl.col("model") == m), ["pos"], "path_cum")
        lc = add_lines(ax, layers, Y, cmap="viridis", array=keys["pos"].to_numpy().astype(float),
                       linewidths=0.6, alpha=0.6, rasterized=True)
        ax.plot(layers, np.nanmean(Y, axis=0), color="black", lw=2.2, label="mean over tokens")
        fig.colorbar(lc, ax=ax, label="token position in chunk")
        ax.set(title=f"{m}: chunk {c}, {Y.shape[0]} tokens", ylabel="cumulative path length (L2, residual units)")
        int_x(ax, "layer (block output)")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(FIGURES[0].title)
    return fig


def fig_logit_vs_step(tokens: pl.LazyFrame, layer_metrics: pl.LazyFrame, path_summary: pl.LazyFrame | None = None,
                      max_points: int = 20_000) -> Figure:
    """Scatter of next-token logit vs the final layer's path step (<= max_points per model); r in titles."""
    tok = tokens.filter(pl.col("next_token_logit").is_not_null()).select("model", "chunk", "pos", "next_token_logit")
    tok = thin(tok, ["model"], ["chunk", "pos"], max_points)
    last = layer_metrics.group_by("model").agg(pl.col("layer").max()).collect()
    steps = layer_metrics.join(last.lazy(), on=["model", "layer"]).select("model", "chunk", "pos", "path_step")
    df = collect(tok.join(steps, on=["model", "chunk", "pos"]), "logit vs path step")
    summary = {} if path_summary is None else {
        m: (n, r) for m, n, r in path_summary.select("model", "n_tokens", "r_path_logit").collect().iter_rows()}
    models = models_of(df)
    fig, axes = panels(len(models))
    for ax, m in zip(axes, models):
        d = df.filter(pl.col("model") == m)
        x, y = d["path_step"].to_numpy().astype(float), d["next_token_logit"].to_numpy().astype(float)
        x, y = x[np.isfinite(x) & np.isfinite(y)], y[np.isfinite(x) & np.isfinite(y)]
        ax.scatter(x, y, s=3, alpha=0.25, color="tab:blue", rasterized=True, label=f"tokens ({len(x):,} plotted)")
        if len(x) > 1 and np.ptp(x) > 0:
            slope, icpt = np.polyfit(x, y, 1)
            xs = np.array([x.min(), x.max()])
            ax.plot(xs, slope * xs + icpt, color="tab:red", lw=1.5, label="least-squares line (sample)")
        n, r = summary.get(m, (None, None))
        r_txt = "r = n/a" if r is None else f"r = {r:.3f} (n = {n:,})"
        ax.set(title=f"{m}: {r_txt}", xlabel="final-layer path step (L2, residual units)",
               ylabel="next-token logit (raw logit units)")
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(FIGURES[1].title)
    return fig


def fig_path_r(path_layer_r: pl.LazyFrame, n_layers: dict[str, int] | None = None) -> Figure:
    """Across sizes: Pearson r of each layer's path step with the next-token logit, CI band."""
    df = with_depth(collect(path_layer_r.select("model", "layer", "r", "r_ci_low", "r_ci_high"), "path r per layer"), n_layers)
    fig, (ax,) = panels(1, w=7.0, h=4.2)
    depth_lines(ax, df, "r", band=("r_ci_low", "r_ci_high"))
    ax.axhline(0, color="black", lw=0.8)
    ax.set(ylabel="Pearson r (path step, next-token logit)", title="band: CI of r")
    depth_legend(ax)
    fig.suptitle(ACROSS_FIGURES[0].title)
    return fig


def summaries(t: dict, manifest: dict) -> list:
    return [by_model("Path length vs next-token logit", t["path_summary"].collect())] if "path_summary" in t else []


def across(t: dict) -> pl.LazyFrame | None:
    return t["path_summary"].select("model", "r_path_logit", "r_ci_low", "r_ci_high") if "path_summary" in t else None


FIGURES = (
    FigureSpec("path_cumulative", "Cumulative hidden-state path length across layers", ("layer_metrics",),
               lambda t, n_layers: fig_path_cumulative(t["layer_metrics"])),
    FigureSpec("path_logit_vs_step", "Next-token logit vs final-layer path step", ("tokens", "layer_metrics"),
               lambda t, n_layers: fig_logit_vs_step(t["tokens"], t["layer_metrics"], t.get("path_summary"))),
)
ACROSS_FIGURES = (
    FigureSpec("across_path_r", "Across sizes: path step vs next-token logit, r per layer", ("path_layer_r",),
               lambda t, n_layers: fig_path_r(t["path_layer_r"], n_layers)),
)

ANALYSIS = Analysis(
    name="path", heading="Path length",
    blurb="Hidden-state path length across layers and its relation to the next-token logit.",
    tables=(TOKENS, LAYER_METRICS, PATH_SUMMARY, PATH_LAYER_R), capture=Capture(reduce=reduce), stats=stats,
    disk_bytes=disk_bytes, summaries=summaries, figures=FIGURES, across=across, across_figures=ACROSS_FIGURES, always=True,
    # path_layer_correlations: positions 1..T-2 (position 0 and the last, which has no next token, are left out), and
    # r is NaN below 3 tokens, so even a one-chunk corpus needs T - 2 >= 3.
    min_chunk_tokens=(5, "Pearson r leaves out each chunk's first and last position and needs 3 tokens"),
)
