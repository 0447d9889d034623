"""A run's files: every table as a lazy polars scan, the check of their footers, the figures and report
(``jobs.api`` opens a run for users on top of these)."""
import os
import tempfile

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from jobs import analyses
from jobs.errors import UsageError, one_line
from jobs.progress import StageBar
from jobs.schema import all_tables
from jobs.store import Store

HIVE_TYPES = {"model": pl.String, "layer": pl.Int16, "shard": pl.Int32}
# The tokens view: the per-model file columns joined with the run's corpus table, in the order users know.
TOKEN_COLUMNS = ["chunk", "pos", "row", "token_id", "token", "next_token_id", "next_token_logit", "is_proper_noun", "model"]


def scan_tables(store: Store) -> dict[str, pl.LazyFrame]:
    """Each table that has files, as a lazy scan with its hive partition columns (model, layer, shard).

    ``tokens`` is a view: each model's own columns (next_token_logit) joined on (chunk, pos) with the
    run's ``corpus`` table (token_id, token, row, next_token_id, is_proper_noun).

    A fixed-size list column (``activations.values``: d_mlp values) differs in size between models, so
    such a table is scanned per model and the column exposed as a variable-length list.
    """
    tables = {}
    for table in store.tables():
        files = store.list_files(table)
        hive = {k: HIVE_TYPES[k] for k in (p.split("=")[0] for p in files[0][len(store.path(table)):].split("/") if "=" in p)}
        fixed = [f for f in pq.read_schema(files[0], filesystem=store.fs) if pa.types.is_fixed_size_list(f.type)]
        if not fixed:
            tables[table] = store.scan(table, **hive)
            continue
        models = sorted({f.split("/model=")[1].split("/")[0] for f in files})
        scans = [store.scan(f"{table}/model={m}", **hive) for m in models]
        for column in fixed:
            # float16 unless every model stored float32 (--activations-dtype), so nothing is rounded.
            inner = {s.collect_schema()[column.name].inner for s in scans}
            dtype = pl.Float32 if inner == {pl.Float32} else pl.Float16
            scans = [s.with_columns(pl.col(column.name).cast(pl.List(dtype))) for s in scans]
        tables[table] = pl.concat(scans)
    if "tokens" in tables and "corpus" in tables:
        tables["tokens"] = tables["tokens"].join(tables["corpus"].drop("shard", "source_file"), on=["chunk", "pos"],
                                                 how="left").select(TOKEN_COLUMNS)
    return tables


def open_store(uri: str, what: str) -> Store:
    """Store(uri), with a URI pyarrow cannot open (unknown scheme, bad bucket) as one line."""
    try:
        return Store(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for URIs it cannot open
        raise UsageError(f"{what} {uri} cannot be opened ({one_line(e)[:200]})") from None


def check_footers(store: Store) -> None:
    """The one check of a run's files where a run is opened: UsageError naming the first Parquet file whose
    footer cannot be read (a truncated shard), or whose columns are not the ones this version writes (a run
    written by an older version, whose layout is not read: rerunning it is the upgrade)."""
    known = all_tables()
    for table in store.tables():
        for path in store.list_files(table):
            try:
                columns = set(pq.read_metadata(path, filesystem=store.fs).schema.to_arrow_schema().names)
            except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a cut-short file
                raise UsageError(f"{path} is damaged ({one_line(e)}): finish the run again with "
                                 f"probe run --resume --run-id <id> --out {store.uri}") from None
            want = set(known[table].schema.names) if table in known else columns
            if columns != want:
                diff = ", ".join([f"lacks {c}" for c in sorted(want - columns)] + [f"has {c}" for c in sorted(columns - want)])
                raise UsageError(f"{store.uri} was written by another version of gpt2-probe (table {table} {diff}): "
                                 f"rerun it with this version into a new --out")


def make_report(store: Store, manifest: dict | None = None) -> str:
    """Render every figure under OUT/figures, the analyses' pages and OUT/report.html; returns the report's path."""
    # Here, not at the top: matplotlib is only for the report, and probe query should not pay its import.
    from jobs.across_sizes import model_info
    from jobs.figures import render_all, specs
    from jobs.report import write_report

    manifest = manifest or store.read_json("manifest.json")
    tables = scan_tables(store)
    with tempfile.TemporaryDirectory() as tmp:
        local = store.root if store.is_local else tmp
        info = model_info(manifest, tables)
        n_layers = {m: n for m, n in zip(info["model"], info["n_layer"]) if n is not None}
        with StageBar("report", "figures", len(specs()), "figures") as bar:
            figures = render_all(tables, os.path.join(local, "figures"), n_layers=n_layers, on_figure=bar.update)
        pages = {a.name: a.pages(tables, local) for a in analyses.REGISTRY.values() if a.pages}
        path = write_report(local, manifest, tables, figures, pages)
        if not store.is_local:
            for root, _, files in os.walk(local):
                for name in files:
                    full = os.path.join(root, name)
                    with open(full, "rb") as f:
                        store.write_bytes(os.path.relpath(full, local), f.read())
            path = store.path("report.html")
    return path
