"""The registry of analyses: each lives in its own module or folder and exports ``ANALYSIS``
(``jobs.analyses.base.Analysis``). Everything else iterates ``REGISTRY`` and never names an analysis.
Adding one: a module here and one line below."""
from jobs.analyses import attn_ar, mi, neurons, path, rotation
from jobs.analyses.base import Analysis, Table

REGISTRY: dict[str, Analysis] = {m.ANALYSIS.name: m.ANALYSIS for m in (path, rotation, neurons, mi, attn_ar)}


def register(analysis: Analysis) -> None:
    """Add an analysis (an extension package, or a test's toy analysis) after the built-in ones."""
    REGISTRY[analysis.name] = analysis


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def selected(chosen) -> list[Analysis]:
    """The analyses of ``chosen`` in registry order, plus those that always run."""
    return [a for a in REGISTRY.values() if a.always or a.name in chosen]


def tables() -> dict[str, Table]:
    """Every analysis's tables by name."""
    return {t.name: t for a in REGISTRY.values() for t in a.tables}
