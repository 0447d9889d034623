"""One neuron's page as polars frames (``neuron_page``; the Python API's entry point), the neurons that get an
HTML page (``select_neurons``), and the page as terminal text (``page_text``, what ``probe neuron`` prints).

Every function takes the run's LazyFrames (``jobs.query.scan_tables``) and collects only the neurons asked for."""
from __future__ import annotations

import math

import numpy as np
import polars as pl

from jobs.errors import UsageError
from probe_core.neuron_pages import HIST_EDGES

KEYS = ["model", "layer", "neuron"]
KINDS = ("top", "bottom", "random_active")
N_SIGNIFICANT = 50  # Bonferroni-significant neurons given a page per model, largest |beta| first
N_PER_LAYER = 5  # neurons of largest max pre-activation given a page per layer
FIT_COLUMNS = {"beta": pl.Float64, "se": pl.Float64, "p": pl.Float64, "q_bh": pl.Float64, "auroc": pl.Float64,
               "significant": pl.Boolean, "status": pl.String}
VOCAB_COLUMNS = {"kind": pl.String, "rank": pl.Int16, "token_id": pl.Int32, "token": pl.String, "weight": pl.Float32}
MARK = ("⟦", "⟧")  # around the activating token in terminal text
BARS = "▁▂▃▄▅▆▇█"
# Control characters would break a line of text or a table cell: shown as visible symbols instead.
VISIBLE = str.maketrans({"\n": "↵", "\r": "␍", "\t": "⇥"})


def visible(token: str | None) -> str:
    """A token's text with line breaks and tabs as visible symbols (None, a token the corpus lacks, as '?')."""
    return "?" if token is None else token.translate(VISIBLE)


def select_neurons(t: dict) -> pl.DataFrame:
    """model, layer, neuron, why of every neuron that gets a page, sorted: per model the ``N_SIGNIFICANT``
    Bonferroni-significant neurons (``neuron_logit.significant``) of largest |beta|, and per layer the
    ``N_PER_LAYER`` of largest max pre-activation; only neurons ``neuron_stats`` holds. why: 'significant',
    'max' or both."""
    stats = t["neuron_stats"].select(KEYS + ["max"])
    parts = [stats.sort(["model", "layer", "max", "neuron"], descending=[False, False, True, False])
             .group_by("model", "layer", maintain_order=True).head(N_PER_LAYER)
             .select(KEYS).with_columns(why=pl.lit("max"))]
    if "neuron_logit" in t:
        significant = (t["neuron_logit"].filter(pl.col("significant").fill_null(False))
                       .join(stats, on=KEYS, how="semi").with_columns(abs_beta=pl.col("beta").abs())
                       .sort(["model", "abs_beta", "layer", "neuron"], descending=[False, True, False, False], nulls_last=True)
                       .group_by("model", maintain_order=True).head(N_SIGNIFICANT))
        parts.insert(0, significant.select(KEYS).with_columns(why=pl.lit("significant")))
    return (pl.concat(parts).group_by(KEYS, maintain_order=True).agg(pl.col("why").str.join(", "))
            .sort(KEYS).collect())


def _tokens(t: dict, model: str) -> pl.LazyFrame | None:
    """chunk, pos, token: the run's corpus (shared by the models), else the model's tokens view."""
    if "corpus" in t:
        return t["corpus"].select("chunk", "pos", "token")
    if "tokens" in t:
        return t["tokens"].filter(pl.col("model") == model).select("chunk", "pos", "token")
    return None


def neuron_frames(t: dict, model: str, keys: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """``neuron_page``'s frames for several neurons of one model at once (``keys``: layer, neuron), each with
    layer and neuron columns; one scan per table, so a report's pages cost a few scans per model."""
    keys = keys.select(pl.col("layer").cast(pl.Int16), pl.col("neuron").cast(pl.Int32)).unique().lazy()

    def rows(name: str) -> pl.LazyFrame:
        return t[name].filter(pl.col("model") == model).join(keys, on=["layer", "neuron"], how="semi")

    stats = rows("neuron_stats").drop("model").sort("layer", "neuron").collect()
    if "neuron_logit" in t:
        fit = rows("neuron_logit").select("layer", "neuron", *FIT_COLUMNS).collect()
    else:
        fit = pl.DataFrame(schema={"layer": pl.Int16, "neuron": pl.Int32, **FIT_COLUMNS})
    if "neuron_vocab" in t:
        vocab = rows("neuron_vocab").select("layer", "neuron", *VOCAB_COLUMNS).sort("layer", "neuron", "kind", "rank").collect()
    else:
        vocab = pl.DataFrame(schema={"layer": pl.Int16, "neuron": pl.Int32, **VOCAB_COLUMNS})
    half = (pl.col("context").list.len() // 2).cast(pl.Int32)  # the window is pos-W..pos+W: 2W+1 values
    examples = (rows("neuron_examples").drop("model")
                .with_columns(offset=pl.int_ranges(-half, half + 1, dtype=pl.Int32))
                .explode("context", "offset").rename({"context": "value"})
                .filter(pl.col("value").is_not_null())  # null: outside the chunk
                .with_columns(token_pos=pl.col("pos") + pl.col("offset"))
                .collect())
    tokens = _tokens(t, model)
    if tokens is None or examples.is_empty():
        examples = examples.with_columns(token=pl.lit(None, pl.String))
    else:
        tokens = tokens.filter(pl.col("chunk").is_in(examples["chunk"].unique().implode())).collect()
        examples = examples.join(tokens.rename({"pos": "token_pos"}), on=["chunk", "token_pos"], how="left")
    kind_order = pl.col("kind").replace_strict({k: i for i, k in enumerate(KINDS)}, default=len(KINDS))
    examples = (examples.sort("layer", "neuron", kind_order, "rank", "offset")
                .select("layer", "neuron", "kind", "rank", "chunk", "pos", "activation", "offset", "token_pos", "token", "value"))
    return {"stats": stats, "fit": fit, "examples": examples, "vocab": vocab}


def neuron_page(t: dict, model: str, layer: int, neuron: int) -> dict[str, pl.DataFrame]:
    """One neuron's page as frames: ``stats`` (its ``neuron_stats`` row), ``fit`` (its ``neuron_logit`` row, empty
    where not fitted), ``examples`` (one row per kind, rank and context position in the chunk: offset from the
    example's pos, token_pos, token text, value = the neuron's pre-activation there; offset 0 is the example
    itself) and ``vocab`` (promoted and suppressed tokens). UsageError for a run without ``neuron_stats`` or an
    unknown model, layer or neuron."""
    if "neuron_stats" not in t:
        raise UsageError("the run has no neuron_stats table: run it with the neuron pages analysis in --analyses")
    extent = (t["neuron_stats"].group_by("model").agg(pl.col("layer").min().alias("l0"), pl.col("layer").max().alias("l1"),
                                                      pl.col("neuron").max().alias("n1")).collect())
    known = {m: (l0, l1, n1) for m, l0, l1, n1 in extent.iter_rows()}
    if model not in known:
        raise UsageError(f"no neuron pages for model {model!r} in this run (models: {', '.join(sorted(known)) or 'none'})")
    l0, l1, n1 = known[model]
    if not l0 <= layer <= l1:
        raise UsageError(f"{model} has layers {l0}..{l1} (blocks), not {layer}")
    if not 0 <= neuron <= n1:
        raise UsageError(f"{model} has neurons 0..{n1} per layer, not {neuron}")
    frames = neuron_frames(t, model, pl.DataFrame({"layer": [layer], "neuron": [neuron]}))
    if frames["stats"].is_empty():
        raise UsageError(f"{model} layer {layer} neuron {neuron} has no neuron_stats row (an incomplete run?)")
    return {name: df.drop("layer", "neuron") for name, df in frames.items()}


def contexts(examples: pl.DataFrame) -> list[dict]:
    """The examples as {kind, rank, chunk, pos, activation, tokens: [(offset, token, value)]}, in frame order."""
    out = []
    for (kind, rank), rows in examples.group_by("kind", "rank", maintain_order=True):
        first = rows.row(0, named=True)
        out.append({"kind": kind, "rank": rank, "chunk": first["chunk"], "pos": first["pos"],
                    "activation": first["activation"],
                    "tokens": list(zip(rows["offset"].to_list(), rows["token"].to_list(), rows["value"].to_list()))})
    return out


def num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6) else f"{v:.4g}"
    return str(v)


def sparkline(hist: list[int]) -> str:
    """The histogram as one line of bars, heights on a log scale (an empty bin is a space)."""
    top = math.log1p(max(hist) or 1)
    return "".join(" " if c == 0 else BARS[min(len(BARS) - 1, int(math.log1p(c) / top * (len(BARS) - 1) + 0.5))] for c in hist)


def page_text(page: dict[str, pl.DataFrame], model: str, layer: int, neuron: int) -> str:
    """The page as terminal text: stats, fit, histogram, each example's context with the activating token
    between ⟦ ⟧, and the promoted and suppressed tokens."""
    s = page["stats"].row(0, named=True)
    lines = [f"{model} layer {layer} neuron {neuron}",
             "  " + "  ".join(f"{k} {num(s[k])}" for k in ("n", "mean", "sd", "min", "max", "frac_active"))]
    if page["fit"].height:
        f = page["fit"].row(0, named=True)
        lines.append("  neuron_logit: " + "  ".join(f"{k} {num(f[k])}" for k in ("beta", "p", "q_bh", "significant", "status")))
    else:
        lines.append("  neuron_logit: not fitted")
    hist = s["hist"]
    lines.append(f"  histogram {num(float(HIST_EDGES[0]))} |{sparkline(hist[1:-1])}| {num(float(HIST_EDGES[-1]))}"
                 f"  (log scale; below: {hist[0]}, at or above: {hist[-1]})")
    examples = contexts(page["examples"])
    for kind in KINDS:
        rows = [e for e in examples if e["kind"] == kind]
        lines.append(f"{kind} ({len(rows)})" + ("" if rows else ": none"))
        for e in rows:
            text = "".join(f"{MARK[0]}{visible(tok)}{MARK[1]}" if off == 0 else visible(tok) for off, tok, _ in e["tokens"])
            lines.append(f"  {e['rank'] + 1:>3} {e['activation']:>9.4g}  chunk {e['chunk']} pos {e['pos']}  {text}")
    for kind in ("promoted", "suppressed"):
        v = page["vocab"].filter(pl.col("kind") == kind).sort("rank")
        words = "  ".join(f"{visible(tok)!r} {w:.3g}" for tok, w in zip(v["token"], v["weight"]))
        lines.append(f"{kind}: {words or 'none'}")
    return "\n".join(lines)


def log_heights(hist: list[int]) -> np.ndarray:
    """Bar heights in [0, 1] on a log scale (log1p of the counts over the largest)."""
    h = np.log1p(np.asarray(hist, dtype=float))
    return h / h.max() if h.max() > 0 else h
