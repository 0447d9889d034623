"""The I/O layer: a run folder on any pyarrow filesystem, atomic Parquet shards, the manifest, lazy scans.

Layout: ``OUT/<table>/model=<name>[/layer=<l>]/<part>.parquet``, ``OUT/manifest.json``,
``OUT/_progress/model=<name>/<part>.json`` (a batch's marker, written after all its shards), ``OUT/figures/``.
"""
import json
import os
import posixpath
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.schema import TABLES, file_schema, partition_keys


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) for a local path or any URI pyarrow understands (s3://, gs://, file://)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


class Store:
    """A run folder. Picklable (it reopens its filesystem), so Ray actors write their own shards."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = open_filesystem(uri)

    def __reduce__(self):
        return (Store, (self.uri,))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts) -> str:
        return posixpath.join(self.root, *[str(p) for p in parts])

    def info(self, rel: str = "") -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(rel) if rel else self.root)

    def exists(self, rel: str) -> bool:
        return self.info(rel).type != pafs.FileType.NotFound

    def is_empty_or_missing(self) -> bool:
        info = self.info()
        if info.type == pafs.FileType.NotFound:
            return True
        if info.type != pafs.FileType.Directory:
            return False
        return not self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))

    def _atomic_write(self, final: str, write):
        """Write through a hidden temporary name, then rename: a reader never sees a partial file.

        Object stores have no rename, but a PUT appears whole when it completes, so we write in place there.
        """
        self.fs.create_dir(posixpath.dirname(final), recursive=True)
        if not self.is_local:
            write(final)
            return
        tmp = posixpath.join(posixpath.dirname(final), f".{posixpath.basename(final)}.{uuid.uuid4().hex}.tmp")
        try:
            write(tmp)
            self.fs.move(tmp, final)
        finally:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)

    def table_dir(self, table: str, **partitions) -> str:
        keys = partition_keys(table)
        missing = [k for k in keys if k not in partitions]
        if missing:
            raise ValueError(f"table {table} needs partition values for {missing}")
        return self.path(table, *[f"{k}={partitions[k]}" for k in keys])

    def write_table(self, table: str, part: str, data: pa.Table, d_mlp: int | None = None, values_dtype: str = "float16",
                    **partitions) -> str:
        """Cast ``data`` to the table's schema and write it as ``<part>.parquet`` in its partition."""
        schema = file_schema(table, d_mlp, values_dtype)
        data = data.select(schema.names).cast(schema)
        final = posixpath.join(self.table_dir(table, **partitions), f"{part}.parquet")
        self._atomic_write(final, lambda p: pq.write_table(data, p, filesystem=self.fs, compression="zstd"))
        return final

    def write_json(self, rel: str, obj) -> None:
        payload = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()

        def write(p):
            with self.fs.open_output_stream(p) as f:
                f.write(payload)

        self._atomic_write(self.path(rel), write)

    def read_json(self, rel: str):
        with self.fs.open_input_stream(self.path(rel)) as f:
            return json.loads(f.read())

    def write_bytes(self, rel: str, payload: bytes) -> None:
        def write(p):
            with self.fs.open_output_stream(p) as f:
                f.write(payload)

        self._atomic_write(self.path(rel), write)

    def list_parts(self, folder_rel: str, suffix: str) -> set[str]:
        """Names (without suffix) of the finished files in a folder; temporaries are hidden and skipped."""
        selector = pafs.FileSelector(self.path(folder_rel), allow_not_found=True)
        names = (posixpath.basename(i.path) for i in self.fs.get_file_info(selector))
        return {n[: -len(suffix)] for n in names if n.endswith(suffix) and not n.startswith(".")}

    def remove_temporaries(self) -> int:
        """Delete the hidden temporaries of writers that died mid-write; call only while no writer runs."""
        if not self.is_local:
            return 0
        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        stale = [i.path for i in self.fs.get_file_info(selector)
                 if i.type == pafs.FileType.File and posixpath.basename(i.path).startswith(".") and i.path.endswith(".tmp")]
        for path in stale:
            self.fs.delete_file(path)
        return len(stale)

    def urls(self, folder_rel: str) -> list[str]:
        """The finished Parquet files under a folder as URLs polars opens (scheme added off local disk)."""
        files = self.list_files(folder_rel)
        if self.is_local:
            return files
        scheme = self.uri.split("://", 1)[0]
        return [f"{scheme}://{f}" for f in files]

    def storage_options(self) -> dict | None:
        """polars' object-store options for a non-local run, from the standard AWS environment
        (polars itself does not read AWS_ENDPOINT_URL_S3)."""
        if self.is_local:
            return None
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if not endpoint:
            return None
        opts = {"aws_endpoint_url": endpoint}
        if endpoint.startswith("http://"):
            opts["aws_allow_http"] = "true"
        return opts

    def scan(self, folder_rel: str, **hive_schema) -> "pl.LazyFrame":
        import polars as pl

        return pl.scan_parquet(self.urls(folder_rel), hive_partitioning=bool(hive_schema), hive_schema=hive_schema or None,
                               storage_options=self.storage_options())

    def tables(self) -> list[str]:
        return [t for t in TABLES if self.list_files(t)]

    def list_files(self, table: str) -> list[str]:
        selector = pafs.FileSelector(self.path(table), recursive=True, allow_not_found=True)
        return sorted(
            i.path for i in self.fs.get_file_info(selector)
            if i.path.endswith(".parquet") and not posixpath.basename(i.path).startswith(".")
        )
