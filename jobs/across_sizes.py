"""The report's "Across model sizes" table: one row per model, with the columns each analysis adds (its
``across``) where the run has its tables; the section's figures are the analyses' ``across_figures``.

Relative depth = layer / n_layer: block l's output (block-indexed tables, l = 1..n_layer) and
``hidden_states[l]`` (``mi_summary``, 0 = embeddings) sit at the same depth.
"""
import polars as pl

from jobs import analyses
from jobs.plotting import model_sort_key


def model_info(manifest: dict | None, tables: dict[str, pl.LazyFrame]) -> pl.DataFrame:
    """model, params (Int64, null if unknown), n_layer (Int64), sorted by params then n_layer then name.

    Models and sizes come from ``manifest["models"]``; without it, n_layer is the largest layer of the
    tables that have model and layer columns.
    """
    entries = (manifest or {}).get("models") or {}
    rows = {m: {"params": v.get("n_params"), "n_layer": v.get("n_layer")} for m, v in entries.items()}
    if not rows:
        for lf in tables.values():
            if lf is not None and {"model", "layer"} <= set(lf.collect_schema().names()):
                for m, top in lf.group_by("model").agg(pl.col("layer").max()).collect().iter_rows():
                    r = rows.setdefault(m, {"params": None, "n_layer": None})
                    r["n_layer"] = max(int(top), r["n_layer"] or 0) if top is not None else r["n_layer"]
    order = sorted(rows, key=lambda m: (rows[m]["params"] is None, rows[m]["params"] or 0, rows[m]["n_layer"] or 0,
                                        model_sort_key(m)))
    return pl.DataFrame({"model": order, "params": [rows[m]["params"] for m in order],
                         "n_layer": [rows[m]["n_layer"] for m in order]},
                        schema={"model": pl.String, "params": pl.Int64, "n_layer": pl.Int64})


def summary_table(tables: dict[str, pl.LazyFrame], manifest: dict | None = None) -> pl.DataFrame:
    """One row per model: model, params, n_layer and every analysis's ``across`` columns where the run has
    its tables (e.g. r_path_logit, n_significant_neurons, mi_excess_bits). Columns no model has are left out."""
    t = {k: v for k, v in tables.items() if v is not None}
    out = model_info(manifest, t)
    for a in analyses.REGISTRY.values():
        part = a.across(t) if a.across else None
        if part is not None:
            out = out.join(part.collect(), on="model", how="left", maintain_order="left")
    keep = ["model", "params", "n_layer"] + [c for c in out.columns[3:] if out[c].null_count() < out.height]
    return out.select(keep) if out.height else out
