"""Reading a finished run: every table as a lazy polars scan, SQL over them, the figures and report."""
import os
import tempfile

import polars as pl
import pyarrow.parquet as pq

from jobs.errors import UsageError, one_line
from jobs.manifest import read_manifest
from jobs.schema import partition_keys
from jobs.store import Store

HIVE_TYPES = {"model": pl.String, "layer": pl.Int16, "shard": pl.Int32}
# The tokens view: the per-model file columns joined with the run's corpus table, in the order users know.
TOKEN_COLUMNS = ["chunk", "pos", "row", "token_id", "token", "next_token_id", "next_token_logit", "is_proper_noun", "model"]


def scan_tables(store: Store) -> dict[str, pl.LazyFrame]:
    """Each table that has files, as a lazy scan with its hive partition columns (model, layer, shard).

    ``tokens`` is a view: each model's own columns (next_token_logit) joined on (chunk, pos) with the
    run's ``corpus`` table (token_id, token, row, next_token_id, is_proper_noun), so queries written
    for the full tokens table work unchanged.

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
    if "tokens" in tables and "corpus" in tables and "token_id" not in tables["tokens"].collect_schema().names():
        # tokens files without token_id: the columns all models share live in the corpus table, join them back
        # (a run whose tokens files hold every column is read as it is).
        tables["tokens"] = tables["tokens"].join(tables["corpus"].drop("shard", "source_file"), on=["chunk", "pos"],
                                                 how="left").select(TOKEN_COLUMNS)
    return tables


def open_store(uri: str, what: str) -> Store:
    """Store(uri), with a URI pyarrow cannot open (unknown scheme, bad bucket) as one line."""
    try:
        return Store(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for URIs it cannot open
        raise UsageError(f"{what} {uri} cannot be opened ({one_line(e)[:200]})") from None


def open_run(uri: str) -> Store:
    store = open_store(uri, "the run folder")
    if not store.exists("manifest.json"):
        raise UsageError(f"{uri} holds no run (no manifest.json): give the --out folder of a probe run")
    read_manifest(store)
    check_footers(store)
    return store


def check_footers(store: Store) -> None:
    """UsageError naming the first Parquet file whose footer cannot be read (a truncated shard)."""
    for table in store.tables():
        for path in store.list_files(table):
            try:
                pq.read_metadata(path, filesystem=store.fs)
            except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a cut-short file
                raise UsageError(f"{path} is damaged ({one_line(e)}): finish the run again with "
                                 f"probe run --resume --run-id <id> --out {store.uri}") from None


def run_query(uri: str, sql: str) -> pl.DataFrame:
    store = open_run(uri)
    context = pl.SQLContext(scan_tables(store))
    try:
        return context.execute(sql).collect()
    except Exception as e:  # polars raises several error types for bad SQL or unknown tables
        names = ", ".join(sorted(context.tables()))
        raise UsageError(f"query failed: {one_line(e)} (tables: {names})") from None


def make_report(store: Store, manifest: dict | None = None) -> str:
    """Render every figure under OUT/figures and write OUT/report.html; returns the report's path."""
    # Here, not at the top: matplotlib is only for the report, and probe query should not pay its import.
    from jobs.across_sizes import model_info
    from jobs.figures import render_all
    from jobs.report import write_report

    manifest = manifest or store.read_json("manifest.json")
    tables = scan_tables(store)
    with tempfile.TemporaryDirectory() as tmp:
        local = store.root if store.is_local else tmp
        info = model_info(manifest, tables)
        n_layers = {m: n for m, n in zip(info["model"], info["n_layer"]) if n is not None}
        figures = render_all(tables, os.path.join(local, "figures"), n_layers=n_layers)
        path = write_report(local, manifest, tables, figures)
        if not store.is_local:
            for root, _, files in os.walk(local):
                for name in files:
                    full = os.path.join(root, name)
                    with open(full, "rb") as f:
                        store.write_bytes(os.path.relpath(full, local), f.read())
            path = store.path("report.html")
    return path
