"""Reading a finished run: every table as a lazy polars scan, SQL over them, the figures and report."""
import os
import tempfile

import polars as pl

from jobs.config import UsageError
from jobs.schema import partition_keys
from jobs.store import Store

HIVE_TYPES = {"model": pl.String, "layer": pl.Int16}


def scan_tables(store: Store) -> dict[str, pl.LazyFrame]:
    """Each table that has files, as a lazy scan with its hive partition columns (model, layer).

    ``activations.values`` is a fixed-size list of d_mlp in the files; d_mlp differs between models,
    so that table is scanned per model and exposed as a variable-length list.
    """
    tables = {}
    for table in store.tables():
        hive = {k: HIVE_TYPES[k] for k in partition_keys(table)}
        if table == "activations":
            models = sorted({f.split("/model=")[1].split("/")[0] for f in store.list_files(table)})
            scans = [store.scan(f"{table}/model={m}", **hive) for m in models]
            # float16 unless every model was stored in float32 (--activations-dtype), so nothing is rounded.
            inner = {s.collect_schema()["values"].inner for s in scans}
            dtype = pl.Float32 if inner == {pl.Float32} else pl.Float16
            tables[table] = pl.concat([s.with_columns(pl.col("values").cast(pl.List(dtype))) for s in scans])
        else:
            tables[table] = store.scan(table, **hive)
    return tables


def open_run(uri: str) -> Store:
    store = Store(uri)
    if not store.exists("manifest.json"):
        raise UsageError(f"{uri} holds no run (no manifest.json): give the --out folder of a probe run")
    return store


def run_query(uri: str, sql: str) -> pl.DataFrame:
    store = open_run(uri)
    context = pl.SQLContext(scan_tables(store))
    try:
        return context.execute(sql).collect()
    except Exception as e:  # polars raises several error types for bad SQL or unknown tables
        names = ", ".join(sorted(context.tables()))
        raise UsageError(f"query failed: {str(e).splitlines()[0]} (tables: {names})") from None


def make_report(store: Store, manifest: dict | None = None) -> str:
    """Render every figure under OUT/figures and write OUT/report.html; returns the report's path."""
    from jobs.figures import render_all
    from jobs.report import write_report

    manifest = manifest or store.read_json("manifest.json")
    tables = scan_tables(store)
    with tempfile.TemporaryDirectory() as tmp:
        local = store.root if store.is_local else tmp
        figures = render_all(tables, os.path.join(local, "figures"))
        path = write_report(local, manifest, tables, figures)
        if not store.is_local:
            for root, _, files in os.walk(local):
                for name in files:
                    full = os.path.join(root, name)
                    with open(full, "rb") as f:
                        store.write_bytes(os.path.relpath(full, local), f.read())
            path = store.path("report.html")
    return path
