"""A throwaway S3-compatible server on 127.0.0.1 (moto in server mode) for tests and demos.

Nothing leaves the machine: moto serves S3 over plain HTTP on a free local port, the bucket lives in
memory, and the server thread stops when the ``with`` block (or the fixture) ends.

    with s3_server() as s3:
        pq.write_table(table, s3.path("run/t.parquet"), filesystem=s3.filesystem)
        fs, root = pafs.FileSystem.from_uri(s3.uri("run"))            # same process, no env needed
        pl.scan_parquet(s3.url("run/"), storage_options=s3.storage_options)
        subprocess.run([...], env={**os.environ, **s3.env})            # plain s3:// URLs in a child

As a pytest fixture: ``s3 = pytest.fixture(scope="module")(s3_server_fixture)``; code that opens
plain ``s3://`` URLs itself (``Store``, ``probe query``) needs ``s3.env`` set, e.g. with monkeypatch.
Always pass credentials (any value): without them pyarrow uploads anonymously with aws-chunked
encoding, which moto stores undecoded, so the object is not the bytes written.
What each client accepts for a custom endpoint is written up in docs/cluster.md.
"""
import contextlib
import dataclasses
import logging
import re
import socket
import uuid

import pyarrow.fs as pafs

BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


@dataclasses.dataclass(frozen=True)
class S3Server:
    """A running local S3 endpoint with one empty bucket.

    ``endpoint_url`` is ``http://127.0.0.1:PORT``; ``filesystem`` is a pyarrow ``S3FileSystem`` bound to
    it, whose paths are ``<bucket>/<key>`` (see ``path``).
    """

    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str
    region: str
    filesystem: pafs.S3FileSystem

    @property
    def host_port(self) -> str:
        """``127.0.0.1:PORT``: the form pyarrow's ``endpoint_override`` takes together with ``scheme=http``."""
        return self.endpoint_url.split("://", 1)[1]

    def path(self, key: str = "") -> str:
        """``<bucket>/<key>``: a path for ``self.filesystem``."""
        return f"{self.bucket}/{key.lstrip('/')}" if key else self.bucket

    def url(self, key: str = "") -> str:
        """Plain ``s3://<bucket>/<key>``: resolves to this server only with ``env`` or ``storage_options``."""
        return f"s3://{self.path(key)}"

    def uri(self, key: str = "") -> str:
        """``s3://<bucket>/<key>?endpoint_override=127.0.0.1:PORT&scheme=http`` for ``FileSystem.from_uri``.

        Credentials cannot go in the query (pyarrow refuses ``access_key``/``secret_key`` there); they
        come from the environment, or as ``s3://KEY:SECRET@bucket/...`` in the URI itself.
        """
        return f"{self.url(key)}?endpoint_override={self.host_port}&scheme=http"

    @property
    def env(self) -> dict[str, str]:
        """Environment that points boto3, pyarrow and polars in another process at this server.

        pyarrow reads ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``; polars reads only
        ``AWS_ENDPOINT_URL``, so both are set. Metadata lookups are off so nothing probes 169.254.169.254.
        """
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    @property
    def storage_options(self) -> dict[str, str]:
        """polars ``storage_options`` for ``scan_parquet("s3://...")`` against this server."""
        return {
            "aws_endpoint_url": self.endpoint_url,
            "aws_allow_http": "true",
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "aws_region": self.region,
        }

    def client(self):
        """A boto3 S3 client for this server (for checks that pyarrow cannot express, e.g. raw keys)."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto():
    """Start moto's threaded server on 127.0.0.1; returns (server, port)."""
    from moto.server import ThreadedMotoServer

    if hasattr(ThreadedMotoServer, "get_host_and_port"):
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        return server, server.get_host_and_port()[1]
    # Older moto cannot report the port it bound, so pick a free one (a small race, fine for tests).
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, port


@contextlib.contextmanager
def s3_server(bucket: str | None = None, region: str = "us-east-1",
              access_key: str = "testing", secret_key: str = "testing"):
    """Run a local S3 server with one new bucket; yields an ``S3Server`` and stops the server on exit.

    ``bucket`` defaults to a unique ``probe-test-<hex>`` name: all moto servers in one process share
    one in-memory backend, so unique names keep concurrent servers from seeing each other's objects.
    """
    bucket = bucket or f"probe-test-{uuid.uuid4().hex[:12]}"
    if not BUCKET_NAME.match(bucket):
        raise ValueError(f"bucket {bucket!r} is not a valid S3 bucket name (3-63 of a-z, 0-9, '-')")
    werkzeug = logging.getLogger("werkzeug")
    old_level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)  # moto's server logs every request at INFO
    server, port = _start_moto()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        srv = S3Server(
            endpoint_url=endpoint, bucket=bucket, access_key=access_key, secret_key=secret_key, region=region,
            filesystem=pafs.S3FileSystem(
                endpoint_override=f"127.0.0.1:{port}", scheme="http",
                access_key=access_key, secret_key=secret_key, region=region,
            ),
        )
        location = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        srv.client().create_bucket(Bucket=bucket, **location)
        yield srv
    finally:
        server.stop()
        werkzeug.setLevel(old_level)


def s3_server_fixture():
    """Generator form of ``s3_server()`` for ``pytest.fixture(s3_server_fixture)``."""
    with s3_server() as srv:
        yield srv
