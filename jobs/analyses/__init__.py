"""The analyses, one module each, end to end: what it needs from the forward pass, the tables it
builds from each batch, the statistics tasks it launches and the disk it writes. The worker, the
driver and the plan iterate the registry (``selected``) instead of branching on analysis names;
the figures and the report are driven by which tables a run holds (``jobs/figures.py``).

Each module defines:

- ``NAME``
- ``forward_options(batch) -> dict``: keyword arguments for ``probe_core.metrics.forward_metrics``
- ``batch_tables(ctx: BatchContext) -> dict[str, pa.Table]``: its tables for one batch (the worker writes them)
- ``launch_stats(ctx: StatsContext, m: ModelSpec) -> list[ObjectRef]``: its statistics tasks for one model
- ``finish_stats(ctx, m) -> list[ObjectRef]``: tasks that need the first ones done (the neuron heatmap)
- ``disk_bytes(plan, m) -> int``: rough uncompressed bytes it writes for one model

``path`` is always run: its tables (tokens, layer_metrics) key every other per-token table.
"""
from dataclasses import dataclass, field

import numpy as np

from jobs.analyses import attn_ar, mi, neurons, path, rotation
from jobs.schema import table_layers

REGISTRY = {m.NAME: m for m in (path, rotation, neurons, mi, attn_ar)}


def selected(names) -> list:
    """The modules of ``names`` in registry order, ``path`` always first."""
    return [module for name, module in REGISTRY.items() if name == "path" or name in names]


@dataclass(frozen=True)
class BatchContext:
    """One computed batch, as the analyses' table builders see it.

    chunk (B,) chunk indices; input_ids (B, T); out: ``forward_metrics``' outputs (``hidden`` (L+1, B, T, d),
    ``path_step`` ... (L, B, T)); n_layer; cfg: the worker's ``WorkerConfig``; target_id: the rotation target.
    """

    chunk: np.ndarray
    input_ids: np.ndarray
    out: dict
    n_layer: int
    cfg: object
    target_id: int | None

    def grid(self, per_layer: bool = False) -> tuple[np.ndarray, ...]:
        """(chunk, pos) int32 of every token, rows ordered chunk, pos; ``per_layer``: (chunk, pos, layer)
        with layers 1..n_layer innermost."""
        b, t = self.input_ids.shape
        chunks = np.repeat(np.asarray(self.chunk, dtype=np.int32), t)
        pos = np.tile(np.arange(t, dtype=np.int32), b)
        if not per_layer:
            return chunks, pos
        n = self.n_layer
        return np.repeat(chunks, n), np.repeat(pos, n), np.tile(table_layers(n), b * t)

    def per_token_layer(self, key: str) -> np.ndarray:
        """``out[key]`` (L, B, T) -> (B * T * L,) in the rows' order (chunk, pos, layer)."""
        return self.out[key].permute(1, 2, 0).reshape(-1).cpu().numpy()


@dataclass
class StatsContext:
    """What statistics launchers need: the plan, the run folder, the model actors (``ReplicaSet``: replica 0 by
    ``workers[name]``), the Ray options of a statistics task (``gpu``) and the refs later stages wait on."""

    plan: object
    store: object
    workers: object
    gpu: dict
    waiting: dict = field(default_factory=dict)

    @property
    def use_gpu(self) -> bool:
        return bool(self.gpu)
