"""The figures of a run: every analysis's ``FigureSpec`` (across-sizes figures first), rendered by ``render_all``.

Conventions: one panel per model (ordered by size), axes labelled with units, and every table is
filtered, aggregated or hash-subsampled lazily so that only the plotted rows are collected (tables can
hold 10^7+ rows). Layers: per-block tables use the block index 1..n_layer; ``mi`` uses the
``hidden_states`` index 0..n_layer (0 = embedding output). A figure function raises ``NoData`` (a
``ValueError``) when nothing is left to draw. Shared helpers live in ``jobs.plotting``.
"""
import logging
import os
import re
import warnings
from collections.abc import Callable

import polars as pl

from jobs import analyses
from jobs.plotting import NoData

log = logging.getLogger(__name__)


def _present(tables: dict[str, pl.LazyFrame]) -> dict[str, pl.LazyFrame]:
    """Tables that exist and have at least one row."""
    return {k: v for k, v in tables.items() if v is not None and v.head(1).collect().height > 0}


def specs() -> list[tuple[str, object]]:
    """(report section, FigureSpec) of every figure, in report order: the across-sizes ones, then each analysis's."""
    chosen = analyses.REGISTRY.values()
    return [("across", f) for a in chosen for f in a.across_figures] + [(a.name, f) for a in chosen for f in a.figures]


def render_all(tables: dict[str, pl.LazyFrame], fig_dir: str, *, n_layers: dict[str, int] | None = None,
               on_figure: Callable[[], None] | None = None) -> list[dict]:
    """Write every figure whose tables are present and non-empty as ``<name>.png`` and ``<name>.svg``.

    Returns entries {"name", "title", "section", "png", "svg"} in report order; figures with nothing to
    draw (``NoData``) are skipped and logged. ``n_layers`` (model -> n_layer, e.g. from the manifest) sets the
    relative depth of the "across" figures; without it a model's largest layer in the tables is used.
    ``on_figure()`` is called once per figure of ``specs()``, drawn or skipped (the report stage's progress).
    """
    present = _present(tables)
    os.makedirs(fig_dir, exist_ok=True)
    out = []
    for section, spec in specs():
        entry = _render(section, spec, present, fig_dir, n_layers)
        if entry is not None:
            out.append(entry)
        if on_figure is not None:
            on_figure()
    return out


def _render(section: str, spec, present: dict[str, pl.LazyFrame], fig_dir: str, n_layers) -> dict | None:
    if not all(n in present for n in spec.needs):
        return None
    try:
        fig = spec.draw(present, n_layers)
    except NoData as e:
        log.info("figure %s skipped: %s", spec.name, e)
        return None
    paths = {ext: os.path.join(fig_dir, f"{spec.name}.{ext}") for ext in ("png", "svg")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape("Glyph") + ".*missing")  # rare Unicode tokens
        fig.savefig(paths["png"], dpi=110)
        fig.savefig(paths["svg"])
    return {"name": spec.name, "title": spec.title, "section": section, **paths}
