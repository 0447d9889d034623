"""What an analysis is: the ``Analysis`` record every analysis module exports as ``ANALYSIS``.

The driver, the model actor, the statistics launcher, the figures, the report and the across-sizes
table iterate the registry (``jobs.analyses``) and call these parts; an absent part is ``None``.
This module is not part of the registry's package, so an analysis defined outside it (``PROBE_ANALYSES``)
imports the contract without loading the registry.
Layers: tables number blocks 1..n_layer (``table_layers``); ``block_index`` maps back to ``model.transformer.h``.
"""
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from jobs.store import Table  # noqa: F401  (re-exported: analyses declare their tables with it)


@dataclass(frozen=True)
class Write:
    """One shard a batch writes: ``data`` into ``table``, with extra partition values (``layer``) and,
    where the file schema depends on the model (fixed-size lists), the schema to cast to."""

    table: Table
    data: pa.Table
    partitions: dict = field(default_factory=dict)
    schema: pa.Schema | None = None


@dataclass(frozen=True)
class Option:
    """A ``probe run`` flag an analysis owns: the ``RunConfig`` field it sets and argparse keywords."""

    field: str
    kwargs: dict


@dataclass(frozen=True)
class FigureSpec:
    """A figure of the report: drawn only when every table in ``needs`` is present and non-empty.
    ``draw(tables, n_layers)``: tables = {name: LazyFrame}; n_layers = {model: n_layer} (may be empty)."""

    name: str
    title: str
    needs: tuple[str, ...]
    draw: Callable


@dataclass(frozen=True)
class Command:
    """A ``probe <name> OUT ...`` subcommand an analysis adds: ``arguments`` are (flags, argparse keywords) after the
    run folder; ``run(tables, args) -> exit code`` gets the opened run's LazyFrames (``jobs.query.scan_tables``)."""

    name: str
    help: str
    arguments: tuple[tuple[tuple[str, ...], dict], ...]
    run: Callable


@dataclass(frozen=True)
class Capture:
    """The actor side of an analysis, called by the model actor for every batch.

    state(worker, part) -> the analysis's state in the actor (kept across batches), or absent;
    forward(ctx) -> keyword arguments for ``probe_core.metrics.forward_metrics`` (``ctx.out`` is None);
    reduce(ctx) -> list of ``Write`` from the forward pass's outputs (``ctx.out``).
    """

    reduce: Callable
    forward: Callable | None = None
    state: Callable | None = None


@dataclass(frozen=True)
class Analysis:
    """Everything specific to one analysis.

    - tables: the tables it writes; options: the flags it owns; check(cfg): refuses bad settings (UsageError)
    - inputs(cfg, tokenizer, models) -> its checked inputs, before Ray starts (models: the ``ModelSpec``s)
    - min_chunk_tokens: (the least --chunk-tokens it gives an answer at, why), or None
    - plan(ctx: PlanContext) -> its frozen part of the plan, after the corpus stage; describe(plan, part) -> plan lines
    - capture: the actor side; stats(ctx: StatsContext, model) -> Ray refs of its statistics tasks, or
      (label, ref) pairs such as ("layer 7/24", ref), which the stage's progress names
    - disk_bytes(plan, model) -> rough uncompressed bytes it writes for one model
    - heading, blurb, summaries(tables, manifest) -> [(caption, DataFrame)], figures: its report section
    - across(tables) -> a LazyFrame of per-model columns for the across-sizes table; across_figures
    - pages(tables, run_dir_local) -> [(title, href relative to the run folder)]: static pages it writes beside
      report.html, linked from its section; commands: the ``probe`` subcommands it adds
    """

    name: str
    heading: str
    blurb: str
    tables: tuple[Table, ...] = ()
    options: tuple[Option, ...] = ()
    check: Callable | None = None
    inputs: Callable | None = None
    plan: Callable | None = None
    describe: Callable | None = None
    capture: Capture | None = None
    stats: Callable | None = None
    disk_bytes: Callable | None = None
    summaries: Callable | None = None
    figures: tuple[FigureSpec, ...] = ()
    across: Callable | None = None
    across_figures: tuple[FigureSpec, ...] = ()
    pages: Callable | None = None
    commands: tuple[Command, ...] = ()
    always: bool = False  # run whatever --analyses says (its tables key the others)
    default: bool = True  # in the default --analyses (an expensive analysis is asked for by name)
    min_chunk_tokens: tuple[int, str] | None = None


@dataclass(frozen=True)
class BatchContext:
    """One batch, as an analysis's capture sees it.

    chunk (B,) chunk indices; input_ids (B, T); out: ``forward_metrics``' outputs (``hidden`` (L+1, B, T, d),
    ``path_step`` ... (L, B, T)) or None before the pass; n_layer; d_mlp; cfg: the actor's ``WorkerConfig``;
    part: the analysis's part of the plan; state: its state in the actor.
    """

    chunk: np.ndarray
    input_ids: np.ndarray
    n_layer: int
    d_mlp: int
    cfg: object
    part: object = None
    state: object = None
    out: dict | None = None

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


@dataclass(frozen=True)
class PlanContext:
    """What an analysis's ``plan`` sees: the checked inputs (``jobs.plan.Inputs``), its own checked inputs
    (``part``), the corpus index, the run folder and the Ray-started driver."""

    inputs: object
    part: object
    corpus: object
    store: object

    @property
    def cfg(self):
        return self.inputs.cfg


@dataclass(frozen=True)
class StatsContext:
    """What a statistics launcher sees: the plan, the run folder, the model actors (``ReplicaSet``: replica 0
    by ``workers[name]``; ``worker.apply`` runs a function in an actor) and a statistics task's Ray options."""

    plan: object
    store: object
    workers: object
    gpu: dict

    @property
    def use_gpu(self) -> bool:
        return bool(self.gpu)


def table_layers(n_layer: int) -> np.ndarray:
    """The layer numbers tables store for per-block values: blocks 1..n_layer (int16). ``layer_metrics``
    layer l compares hidden_states[l-1] with hidden_states[l]; ``mi.layer`` is the hidden_states index
    itself (0..n_layer) and does not go through here."""
    return np.arange(1, n_layer + 1, dtype=np.int16)


def block_index(layer: int) -> int:
    """A table layer (block 1..n_layer) -> the block's index in ``model.transformer.h`` (0-based)."""
    return int(layer) - 1
