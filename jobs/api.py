"""Reading a run from Python (notebooks), and the checks ``probe query`` and ``probe report`` share.

    from jobs.api import open_run
    run = open_run("results/r1")                    # warns on stderr if the run is in progress or incomplete
    run.table("layer_metrics").group_by("model", "layer").agg(pl.col("path_step").mean()).collect()
    x = run.activations("gpt2", layer=5)            # (n, d_mlp) numpy array, rows in (chunk, pos) order

Opening a run checks it once (manifest, Parquet footers, columns: a UsageError naming the file otherwise) and
prints one warning line when another run holds its lease (in progress) or it is incomplete (a stage not
done, batches missing), naming what is missing and the ``--resume`` command.
"""
import re
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from jobs import analyses
from jobs.corpus import CORPUS
from jobs.errors import UsageError, one_line
from jobs.manifest import STAGES, read_manifest
from jobs.query import check_footers, open_store, scan_tables
from jobs.store import Lease, Store

STAGE_WORDS = {"plan": "the plan", "corpus": "the corpus stage", "capture": "capture", "stats": "statistics",
               "report": "the report"}


class Run:
    """An opened run folder: ``tables()``/``table(name)`` as polars LazyFrames, ``activations(model, layer)``,
    ``sql(query)``; ``manifest`` is OUT/manifest.json, ``problems`` what the opening check found (empty when finished)."""

    def __init__(self, store: Store, manifest: dict, problems: list[str]):
        self.store, self.manifest, self.problems = store, manifest, problems
        self._tables = None

    @property
    def uri(self) -> str:
        return self.store.uri

    def tables(self) -> dict[str, pl.LazyFrame]:
        """Every table with files, as a lazy scan (``model``, ``layer``, ``shard`` from the folder names); ``tokens``
        is the view joined with the run's corpus table; ``activations.values`` a list column."""
        if self._tables is None:
            self._tables = scan_tables(self.store)
        return self._tables

    def table(self, name: str) -> pl.LazyFrame:
        """One table; a table this run has not written is a UsageError saying why (see ``absent``)."""
        tables = self.tables()
        if name not in tables:
            raise UsageError(self.absent(name))
        return tables[name]

    def absent(self, name: str) -> str:
        """Why this run has no table ``name``: its analysis was not run, the run stopped before the stage that
        writes it, or no such table exists."""
        owner = next((a for a in analyses.REGISTRY.values() if name in {t.name for t in a.tables}), None)
        if owner is None and name != CORPUS.name:
            known = sorted({t.name for a in analyses.REGISTRY.values() for t in a.tables} | {CORPUS.name})
            return f"no table `{name}` in any run (tables: {', '.join(known)})"
        chosen = {a.name for a in analyses.selected(self.manifest.get("config", {}).get("analyses") or analyses.names())}
        if owner is not None and owner.name not in chosen:
            return f"table `{name}` is absent: analysis `{owner.name}` was not run"
        stages = self.manifest.get("stages", {})
        stopped = next((s for s in STAGES if stages.get(s, {}).get("status") != "done"), None)
        if stopped is not None:
            return f"table `{name}` is absent: the run stopped before {STAGE_WORDS[stopped]}; resume with {self.resume_command()}"
        return f"table `{name}` is absent: the run wrote no rows to it"

    def activations(self, model: str, layer: int) -> np.ndarray:
        """``activations.values`` of one model and layer (block 1..n_layer) as an (n, d_mlp) array in the stored
        dtype (``--activations-dtype``), rows in (chunk, pos) order, as
        ``run.table("activations").filter(model=..., layer=...).sort("chunk", "pos")``."""
        self.table("activations")
        folder = f"activations/model={model}/layer={int(layer)}"
        if not self.store.exists(folder):
            models = sorted({f.split("/model=")[1].split("/")[0] for f in self.store.list_files("activations")})
            raise UsageError(f"no activations for model {model} layer {layer} in {self.uri} (models: {', '.join(models)}; "
                             f"layers are blocks 1..n_layer)")
        parts = [pq.read_table(f, filesystem=self.store.fs, columns=["chunk", "pos", "values"])
                 for f in self.store.list_files(folder)]
        data = pa.concat_tables(parts).sort_by([("chunk", "ascending"), ("pos", "ascending")])
        values = data.column("values").combine_chunks()
        return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), values.type.list_size)

    def sql(self, query: str) -> pl.DataFrame:
        """SQL over every table (polars); an absent table is a UsageError saying why, not "relation not found"."""
        context = pl.SQLContext(self.tables())
        try:
            return context.execute(query).collect()
        except Exception as e:  # polars raises several error types for bad SQL or unknown tables
            missing = re.search(r"relation '([^']+)' was not found", str(e))
            if missing:
                raise UsageError(self.absent(missing.group(1))) from None
            raise UsageError(f"query failed: {one_line(e)} (tables: {', '.join(sorted(context.tables()))})") from None

    def resume_command(self) -> str:
        return f"probe run --resume --run-id {self.manifest.get('run_id', '<id>')} --out {self.uri}"


def open_run(uri: str, warn: bool = True) -> Run:
    """Open the run folder ``uri`` (a path or pyarrow URI): a UsageError if it is no run or is damaged; with
    ``warn``, one line on stderr when the run is in progress or incomplete."""
    store = open_store(uri, "the run folder")
    if not store.exists("manifest.json"):
        raise UsageError(f"{uri} holds no run (no manifest.json): give the --out folder of a probe run")
    manifest = read_manifest(store)
    check_footers(store)
    run = Run(store, manifest, [])
    run.problems = run_problems(run)
    if warn and run.problems:
        print(f"probe: warning: {'; '.join(run.problems)}", file=sys.stderr, flush=True)
    return run


def run_problems(run: Run) -> list[str]:
    """What makes a run unsafe to read as final: another run holding its lease, stages not done, batches missing."""
    stages = run.manifest.get("stages", {})
    not_done = [f"{STAGE_WORDS[s]} {stages[s].get('status', 'not done')}" if s in stages else f"{STAGE_WORDS[s]} not run"
                for s in STAGES if stages.get(s, {}).get("status") != "done"]
    holder = Lease(run.store).live_holder()
    if holder is not None:
        return [f"{run.uri} is in progress (probe run on host {holder.get('host')}, pid {holder.get('pid')}"
                + "".join(f"; {x}" for x in not_done) + "): its tables are incomplete until it finishes"]
    if not not_done:
        return []
    data, size = run.manifest.get("data", {}), run.manifest.get("batch_size")
    missing = []
    if data.get("chunks") and size:
        n = -(-int(data["chunks"]) // int(size))
        for model in run.manifest.get("models", {}):
            have = len(run.store.list_parts(f"_progress/model={model}", ".json"))
            if have < n:
                missing.append(f"{model} {n - have} of {n} batches missing")
    return [f"{run.uri} is incomplete ({', '.join(not_done + missing)}): resume with {run.resume_command()}"]


def run_query(uri: str, query: str) -> pl.DataFrame:
    """``probe query``: open the run (checked and warned as ``open_run``), then SQL over its tables."""
    return open_run(uri).sql(query)
