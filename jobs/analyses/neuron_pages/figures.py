"""The report's "Neurons" section: an index of neurons per model and a figure of the share of tokens that
activate each neuron, per layer."""
from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from jobs.analysis import FigureSpec
from jobs.plotting import by_model, models_of

TOP_TOKENS = 5  # promoted tokens shown per neuron in the index


def promoted_tokens(vocab: pl.LazyFrame, n: int = TOP_TOKENS) -> pl.LazyFrame:
    """model, layer, neuron, top_promoted: the n most promoted tokens, best first, joined by ' | '."""
    return (vocab.filter((pl.col("kind") == "promoted") & (pl.col("rank") < n)).sort("model", "layer", "neuron", "rank")
            .group_by("model", "layer", "neuron", maintain_order=True)
            .agg(pl.col("token").str.join(" | ").alias("top_promoted")))


def neuron_index(t: dict) -> pl.LazyFrame:
    """One row per neuron: layer, neuron, max, frac_active, top promoted tokens, and beta, p, q_bh where
    ``neuron_logit`` fitted it."""
    index = t["neuron_stats"].select("model", "layer", "neuron", "max", "frac_active")
    if "neuron_vocab" in t:
        index = index.join(promoted_tokens(t["neuron_vocab"]), on=["model", "layer", "neuron"], how="left")
    if "neuron_logit" in t:
        index = index.join(t["neuron_logit"].select("model", "layer", "neuron", "beta", "p", "q_bh"),
                           on=["model", "layer", "neuron"], how="left")
    return index


def summaries(t: dict, manifest: dict) -> list:
    if "neuron_stats" not in t:
        return []
    top = neuron_index(t).sort("max", descending=True).collect()
    return [by_model("Neurons of largest maximum pre-activation (index; the neuron pages list every selected one)",
                     top, pl.col("max").neg())]


def draw_frac_active(t: dict, n_layers: dict) -> Figure:
    stats = t["neuron_stats"].select("model", "layer", "frac_active").collect()
    models = models_of(stats)
    fig = Figure(figsize=(6.5, 3.2 * len(models)))
    for ax, model in zip(np.atleast_1d(fig.subplots(len(models), 1, squeeze=False)[:, 0]), models):
        rows = stats.filter(pl.col("model") == model).sort("layer")
        layers = rows["layer"].unique().sort().to_list()
        ax.boxplot([rows.filter(pl.col("layer") == l)["frac_active"].to_numpy() for l in layers], showfliers=False)
        ax.set_xticks(range(1, len(layers) + 1), [str(l) for l in layers])
        ax.set(title=model, xlabel="layer (block)", ylabel="share of tokens with x > 0")
    fig.suptitle("Neurons: share of tokens activating each neuron, per layer")
    fig.tight_layout()
    return fig


FIGURES = (FigureSpec("neuron_frac_active", "Neurons: share of tokens activating each neuron, per layer",
                      ("neuron_stats",), draw_frac_active),)
