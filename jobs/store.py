"""The I/O layer: a run folder on any pyarrow filesystem, atomic Parquet shards, the manifest, lazy scans.

Layout: ``OUT/<table>/model=<name>[/layer=<l>]/<part>.parquet``, ``OUT/manifest.json``,
``OUT/_progress/model=<name>/<part>.json`` (a batch's marker, written after all its shards), ``OUT/figures/``.
"""
import json
import os
import posixpath
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.errors import UsageError


@dataclass(frozen=True)
class Table:
    """One Parquet table: its file schema and the hive partition keys of its folders."""

    name: str
    schema: pa.Schema
    partitions: tuple[str, ...] = ("model",)


def size_text(b: float) -> str:
    """Bytes for plan lines and size refusals: GiB from 256 MiB up, MiB from 64 KiB, else bytes."""
    if b < 2**16:  # a free-space figure can be this small; "0.0 MiB" would hide it
        return f"{b:.0f} B"
    return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"


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

    def is_empty_or_missing(self, ignore: tuple[str, ...] = ()) -> bool:
        """The folder is missing or holds nothing but the names in ``ignore``."""
        info = self.info()
        if info.type == pafs.FileType.NotFound:
            return True
        if info.type != pafs.FileType.Directory:
            return False
        entries = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))
        return all(os.path.basename(e.path) in ignore for e in entries)

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

    def table_dir(self, table, **partitions) -> str:
        """The folder of one partition of ``table``."""
        missing = [k for k in table.partitions if k not in partitions]
        if missing:
            raise ValueError(f"table {table.name} needs partition values for {missing}")
        return self.path(table.name, *[f"{k}={partitions[k]}" for k in table.partitions])

    def write_table(self, table, part: str, data: pa.Table, schema: pa.Schema | None = None, **partitions) -> str:
        """Cast ``data`` to the table's schema (or ``schema``) and write it as ``<part>.parquet`` in its partition."""
        schema = schema or table.schema
        data = data.select(schema.names).cast(schema)
        final = posixpath.join(self.table_dir(table, **partitions), f"{part}.parquet")
        self._atomic_write(final, lambda p: pq.write_table(data, p, filesystem=self.fs, compression="zstd"))
        return final

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str):
        with self.fs.open_input_stream(self.path(rel)) as f:
            return json.loads(f.read())

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def remove_folder(self, folder_rel: str) -> None:
        """Delete a folder and everything under it (nothing if it does not exist)."""
        if self.exists(folder_rel):
            self.fs.delete_dir(self.path(folder_rel))

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

    def verified_parts(self, folder_rel: str) -> set[str]:
        """The markers in ``folder_rel`` whose listed shards all exist with a readable footer and the
        recorded row count."""
        good = set()
        for part in self.list_parts(folder_rel, ".json"):
            try:
                shards = self.read_json(f"{folder_rel}/{part}.json")["shards"]
                if all(pq.read_metadata(self.path(rel), filesystem=self.fs).num_rows == rows for rel, rows in shards.items()):
                    good.add(part)
            except Exception:  # a missing or truncated shard or marker: the batch is recomputed
                continue
        return good

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

    def remove_all(self, keep: tuple[str, ...] = ("_lease.json",)) -> None:
        """Delete everything in the run folder but ``keep``: a fresh run whose input proved unusable
        leaves --out as it was."""
        for entry in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False, allow_not_found=True)):
            if posixpath.basename(entry.path) in keep:
                continue
            if entry.type == pafs.FileType.Directory:
                self.fs.delete_dir(entry.path)
            else:
                self.fs.delete_file(entry.path)

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

    def scan(self, folder_rel: str, **hive_schema) -> pl.LazyFrame:
        return pl.scan_parquet(self.urls(folder_rel), hive_partitioning=bool(hive_schema), hive_schema=hive_schema or None,
                               storage_options=self.storage_options())

    def scan_model(self, table, model: str) -> "pl.LazyFrame":
        """One model's partition of ``table`` as a lazy scan, without the partition columns."""
        return self.scan(f"{table.name}/model={model}")

    def tables(self) -> list[str]:
        """The tables that have files: top-level folders holding Parquet files (``_progress``, ``figures`` do not)."""
        top = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False, allow_not_found=True))
        names = sorted(posixpath.basename(i.path) for i in top if i.type == pafs.FileType.Directory)
        return [n for n in names if not n.startswith(("_", ".")) and self.list_files(n)]

    def list_files(self, table: str) -> list[str]:
        selector = pafs.FileSelector(self.path(table), recursive=True, allow_not_found=True)
        return sorted(
            i.path for i in self.fs.get_file_info(selector)
            if i.path.endswith(".parquet") and not posixpath.basename(i.path).startswith(".")
        )


LEASE = "_lease.json"
LEASE_STALE_S = 120.0  # a lease not refreshed for this long belongs to a dead run and may be taken over
LEASE_REFRESH_S = 20.0


class Lease:
    """One writer per run folder: OUT/_lease.json (host, pid, start, token, refresh time), refreshed by a
    daemon thread every ``LEASE_REFRESH_S``.

    - Local folders: an atomic create, ``os.open(O_CREAT | O_EXCL)``.
    - S3 (``s3://``): an atomic conditional PUT through boto3 (``If-None-Match: *``; S3 answers 412 when the
      key exists, or 409 to the loser of two simultaneous creates), with the endpoint, region and credentials
      of the run's own pyarrow filesystem. A stale lease is taken over with ``If-Match: <its ETag>``, so of
      two runs taking over the same stale lease exactly one wins; refreshes are ``If-Match`` too, so a run
      whose lease was taken over never overwrites the new holder's.
    - Other object stores (gs://, hdfs://, ...): pyarrow has no conditional write, so a best-effort
      check-then-write followed by a read-back (two runs starting within the same second may both pass).

    A lease whose ``refreshed`` time is older than ``LEASE_STALE_S``, or whose holder is a process on this
    host that no longer exists, is stale and taken over.
    """

    def __init__(self, store: Store, clock=None):
        self.store, self.clock = store, clock or time.time
        self.token = uuid.uuid4().hex
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": self.clock(), "token": self.token}
        self._stop = None
        self._s3 = _S3Key(store) if isinstance(store.fs, pafs.S3FileSystem) else None
        self._etag = None  # S3: the ETag of the lease we last wrote (what a refresh must still find)

    def _payload(self) -> bytes:
        return json.dumps({**self.holder, "refreshed": self.clock()}).encode()

    def _read_tagged(self) -> tuple[dict | None, str | None]:
        """(lease, its S3 ETag or None); lease None if there is none, {} if it is unreadable."""
        if self._s3 is not None:
            body, etag = self._s3.get()
            if body is None:
                return None, None
            try:
                return json.loads(body), etag
            except ValueError:
                return {}, etag
        try:
            return self.store.read_json(LEASE), None
        except FileNotFoundError:
            return None, None
        except (ValueError, OSError):
            return {}, None  # being written or cut short: treat as stale (no refresh time)

    def _read(self) -> dict | None:
        return self._read_tagged()[0]

    def acquire(self) -> None:
        self.store.fs.create_dir(self.store.root, recursive=True)
        for _ in range(3):
            if self._create():
                self._start_refresh()
                return
            held, etag = self._read_tagged()
            if held is None:
                continue  # released between our attempt and the read
            self.check_free(held)
            if self._take_over(etag):  # stale: its holder stopped refreshing
                self._start_refresh()
                return
        raise UsageError(f"could not take the lease {self.store.path(LEASE)}: another run keeps taking it")

    def check_free(self, held: dict | None = None) -> None:
        """Raise a UsageError naming the holder if another run holds a live lease on the folder."""
        held = self._read() if held is None else held
        if self._live(held):
            raise UsageError(
                f"{self.store.uri} is in use by another probe run (host {held.get('host')}, pid {held.get('pid')}, "
                f"started {_utc(held.get('started'))}); wait for it, or remove {LEASE} if that run is gone "
                f"(a lease is stale {LEASE_STALE_S:.0f} s after its last refresh)")

    def live_holder(self) -> dict | None:
        """The lease of a run that holds the folder now (refreshed within ``LEASE_STALE_S``, holder alive), else None."""
        held = self._read()
        return held if self._live(held) else None

    def _live(self, held: dict | None) -> bool:
        return held is not None and self.clock() - float(held.get("refreshed", 0)) < LEASE_STALE_S and not self._holder_dead(held)

    def _holder_dead(self, held: dict) -> bool:
        """A holder on this host whose process is gone (a killed run) leaves a lease that is stale at once."""
        if held.get("host") != self.holder["host"] or not isinstance(held.get("pid"), int):
            return False
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def _create(self) -> bool:
        """Write our lease if there is none; True if we now hold it."""
        path = self.store.path(LEASE)
        if self.store.is_local:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._payload())
            return True
        if self._s3 is not None:
            self._etag = self._s3.put(self._payload(), IfNoneMatch="*")
            return self._etag is not None
        if self.store.exists(LEASE):
            return False
        self.store.write_bytes(LEASE, self._payload())
        back = self._read() or {}
        return back.get("token") == self.token

    def _take_over(self, etag: str | None) -> bool:
        """Replace a stale lease by ours; True if we now hold it. On S3 only if the lease is still the one
        we judged stale (ETag ``etag``); elsewhere by deleting it and creating ours."""
        if self._s3 is not None:
            self._etag = self._s3.put(self._payload(), IfMatch=etag) if etag else None
            return self._etag is not None
        self._delete()
        return self._create()

    def _delete(self) -> None:
        try:
            self.store.fs.delete_file(self.store.path(LEASE))
        except (FileNotFoundError, OSError):
            pass

    def _refresh(self) -> bool:
        """Rewrite our lease with the current time; False once another run has taken it over (S3 only)."""
        if self._s3 is None:
            self.store.write_bytes(LEASE, self._payload())
            return True
        self._etag = self._s3.put(self._payload(), IfMatch=self._etag)
        return self._etag is not None

    def _start_refresh(self) -> None:
        self._stop = threading.Event()

        def refresh():
            while not self._stop.wait(LEASE_REFRESH_S):
                try:
                    if not self._refresh():
                        print(f"warning: the lease {self.store.path(LEASE)} was taken over by another run",
                              file=sys.stderr, flush=True)
                        return
                except OSError:
                    pass  # a missed refresh is retried; the lease stays valid for LEASE_STALE_S

        threading.Thread(target=refresh, daemon=True, name="lease-refresh").start()

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            held = self._read() or {}
            if held.get("token") == self.token:
                self._delete()
            self._stop = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class _S3Key:
    """``OUT/_lease.json`` on S3 through boto3, which has the conditional PUT that pyarrow lacks.

    The client gets the endpoint, scheme, region and explicit credentials of the store's pyarrow
    ``S3FileSystem`` (from the URI's query, or the ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` variables
    pyarrow read); credentials not given in the URI come from boto3's default chain (the same ``AWS_*``
    variables, profile or instance role pyarrow uses).
    """

    def __init__(self, store: Store):
        try:  # here, not at the top: only s3:// needs boto3, which takes a while to import
            import boto3
            import botocore.config
            import botocore.exceptions
        except ImportError:
            raise UsageError("--out s3://... needs boto3 for its run lease: pip install boto3") from None
        self._errors = botocore.exceptions
        # pyarrow exposes the resolved options only through pickling: {endpoint_override, scheme, region, ...}.
        opts = store.fs.__reduce__()[1][0]
        endpoint = opts.get("endpoint_override") or None
        if endpoint and "://" not in endpoint:
            endpoint = f"{opts.get('scheme') or 'https'}://{endpoint}"
        creds = {}
        if opts.get("access_key"):
            creds = {"aws_access_key_id": opts["access_key"], "aws_secret_access_key": opts.get("secret_key"),
                     "aws_session_token": opts.get("session_token") or None}
        config = botocore.config.Config(signature_version=botocore.UNSIGNED) if opts.get("anonymous") else None
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, region_name=store.fs.region or None, config=config,
            verify=opts.get("tls_ca_file_path") or None, **creds)
        self.bucket, _, prefix = store.root.partition("/")
        self.key = posixpath.join(prefix, LEASE) if prefix else LEASE

    def _os_error(self, e) -> OSError:
        return OSError(f"s3://{self.bucket}/{self.key}: {e}")

    def put(self, body: bytes, **condition) -> str | None:
        """PUT under ``condition`` (``IfNoneMatch='*'`` or ``IfMatch=etag``); the new ETag, or None if the
        condition failed (412; 409 when a concurrent conditional write won; 404 when If-Match finds no key)."""
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"]
        except self._errors.ClientError as e:
            if _s3_status(e) in (409, 412) or _s3_code(e) == "NoSuchKey":
                return None
            raise self._os_error(e) from e
        except self._errors.BotoCoreError as e:
            raise self._os_error(e) from e

    def get(self) -> tuple[bytes | None, str | None]:
        """(body, ETag) read in one request, or (None, None) if there is no such key."""
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
            return r["Body"].read(), r["ETag"]
        except self._errors.ClientError as e:
            if _s3_code(e) == "NoSuchKey":
                return None, None
            raise self._os_error(e) from e
        except self._errors.BotoCoreError as e:
            raise self._os_error(e) from e


def _s3_status(e) -> int | None:
    return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _s3_code(e) -> str | None:
    return e.response.get("Error", {}).get("Code")


def _utc(t) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t)))
    except (TypeError, ValueError):
        return "unknown"
