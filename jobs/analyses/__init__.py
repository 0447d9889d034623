"""The registry of analyses: each lives in its own module or folder and exports ``ANALYSIS``
(``jobs.analysis.Analysis``). Everything else iterates ``REGISTRY`` and never names an analysis.

Adding one: a module here and one line below, or, from outside the package, a module named in the
environment variable ``PROBE_ANALYSES`` (comma list of importable modules, each exporting ``ANALYSIS``),
which the driver and every Ray worker import (a local Ray instance inherits the driver's environment;
on a cluster set it in the job's ``runtime_env``).
"""
import importlib
import os

from jobs.analyses import attn_ar, mi, neuron_pages, neurons, path, rotation
from jobs.analysis import Analysis, Table

REGISTRY: dict[str, Analysis] = {m.ANALYSIS.name: m.ANALYSIS for m in (path, rotation, neurons, mi, attn_ar, neuron_pages)}


def register(analysis: Analysis) -> None:
    """Add an analysis after the built-in ones."""
    REGISTRY[analysis.name] = analysis


for _module in filter(None, (m.strip() for m in os.environ.get("PROBE_ANALYSES", "").split(","))):
    register(importlib.import_module(_module).ANALYSIS)


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def defaults() -> tuple[str, ...]:
    """The analyses ``--analyses`` runs when it is not given."""
    return tuple(name for name, a in REGISTRY.items() if a.default)


def selected(chosen) -> list[Analysis]:
    """The analyses of ``chosen`` in registry order, plus those that always run."""
    return [a for a in REGISTRY.values() if a.always or a.name in chosen]


def tables() -> dict[str, Table]:
    """Every analysis's tables by name."""
    return {t.name: t for a in REGISTRY.values() for t in a.tables}
