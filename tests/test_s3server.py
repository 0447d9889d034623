"""The local S3 server and what pyarrow 26 / polars 2.1 accept against a custom endpoint.

Each test pins one finding documented in docs/cluster.md, so a library upgrade that changes the
behaviour shows up here rather than on a cluster.
"""
import os
import socket
import subprocess
import sys
import textwrap

import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from s3server import s3_server, s3_server_fixture

s3 = pytest.fixture(scope="module")(s3_server_fixture)

TABLE = pa.table({"tok": pa.array([0, 1, 2, 3], pa.int32()), "value": pa.array([0.5, 1.5, 2.5, 3.5])})


def _keys(s3, prefix):
    return sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", []))


def test_filesystem_write_move_read(s3):
    fs = s3.filesystem
    pq.write_table(TABLE, s3.path("move/tmp.parquet"), filesystem=fs)
    fs.move(s3.path("move/tmp.parquet"), s3.path("move/final.parquet"))
    assert fs.get_file_info(s3.path("move/tmp.parquet")).type == pafs.FileType.NotFound
    assert pq.read_table(s3.path("move/final.parquet"), filesystem=fs).equals(TABLE)
    # A file move is CopyObject + DeleteObject; it also leaves a "move/" directory marker object.
    assert _keys(s3, "move/") == ["move/", "move/final.parquet"]


def test_directory_move_is_not_supported(s3):
    fs = s3.filesystem
    fs.create_dir(s3.path("dirmove/a"), recursive=True)
    pq.write_table(TABLE, s3.path("dirmove/a/x.parquet"), filesystem=fs)
    with pytest.raises(OSError):
        fs.move(s3.path("dirmove/a"), s3.path("dirmove/b"))
    assert fs.get_file_info(s3.path("dirmove/a/x.parquet")).type == pafs.FileType.File


def test_object_invisible_until_stream_closes(s3):
    """Why writing in place is safe on S3: a reader never sees a half-written object."""
    fs = s3.filesystem
    stream = fs.open_output_stream(s3.path("pending/blob.bin"))
    stream.write(b"x" * 4096)
    assert fs.get_file_info(s3.path("pending/blob.bin")).type == pafs.FileType.NotFound
    stream.close()
    assert fs.get_file_info(s3.path("pending/blob.bin")).size == 4096


def _set_credentials(monkeypatch, s3):
    # Keys only: the endpoint must come from the URI. Without any keys pyarrow sends anonymous
    # aws-chunked uploads, which moto stores undecoded (a corrupt Parquet file).
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.setenv(k, s3.env[k])
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)


def test_from_uri_with_endpoint_in_query(s3, monkeypatch):
    _set_credentials(monkeypatch, s3)
    fs, root = pafs.FileSystem.from_uri(s3.uri("viauri"))
    assert isinstance(fs, pafs.S3FileSystem) and root == s3.path("viauri")
    pq.write_table(TABLE, f"{root}/t.parquet", filesystem=fs)
    assert pq.read_table(s3.path("viauri/t.parquet"), filesystem=s3.filesystem).equals(TABLE)


def test_from_uri_refuses_credentials_in_query(s3):
    with pytest.raises(pa.ArrowInvalid, match="access_key"):
        pafs.FileSystem.from_uri(s3.uri("x") + f"&access_key={s3.access_key}")


def test_from_uri_with_credentials_in_userinfo(s3):
    uri = s3.uri("userinfo").replace("s3://", f"s3://{s3.access_key}:{s3.secret_key}@")
    fs, root = pafs.FileSystem.from_uri(uri)
    pq.write_table(TABLE, f"{root}/t.parquet", filesystem=fs)
    assert _keys(s3, "userinfo/") == ["userinfo/t.parquet"]


def test_hive_dataset_roundtrip(s3):
    layers = pa.array([0, 0, 1, 1], pa.int32())
    data = TABLE.append_column("layer", layers)
    ds.write_dataset(data, s3.path("hive/t"), filesystem=s3.filesystem, format="parquet",
                     partitioning=ds.partitioning(pa.schema([("layer", pa.int32())]), flavor="hive"))
    files = [k for k in _keys(s3, "hive/t/") if k.endswith(".parquet")]
    assert files == ["hive/t/layer=0/part-0.parquet", "hive/t/layer=1/part-0.parquet"]
    back = ds.dataset(s3.path("hive/t"), filesystem=s3.filesystem, format="parquet", partitioning="hive")
    assert back.to_table().sort_by("tok").to_pydict() == data.to_pydict()
    assert back.to_table(filter=ds.field("layer") == 1).column("tok").to_pylist() == [2, 3]


def _write_model_layer_tree(s3, prefix):
    """OUT/<table>/model=<m>/layer=<l>/<part>.parquet, with directory markers as the Store makes them."""
    for layer in (0, 1):
        folder = s3.path(f"{prefix}/model=gpt2/layer={layer}")
        s3.filesystem.create_dir(folder, recursive=True)
        pq.write_table(TABLE.slice(2 * layer, 2), f"{folder}/p0.parquet", filesystem=s3.filesystem)
    return pl.from_arrow(TABLE).with_columns(
        model=pl.lit("gpt2"), layer=pl.Series([0, 0, 1, 1], dtype=pl.Int64))


def test_polars_scan_with_storage_options(s3):
    expected = _write_model_layer_tree(s3, "pl/t")
    got = pl.scan_parquet(s3.url("pl/t/"), storage_options=s3.storage_options).collect()
    assert_frame_equal(got.sort("tok"), expected, check_column_order=False)
    # Without the trailing slash polars asks for an object named "pl/t" and finds none.
    with pytest.raises(FileNotFoundError):
        pl.scan_parquet(s3.url("pl/t"), storage_options=s3.storage_options).collect()


CHILD = textwrap.dedent("""
    import sys, polars as pl, pyarrow as pa, pyarrow.fs as pafs, pyarrow.parquet as pq
    url, uri = sys.argv[1], sys.argv[2]
    fs, root = pafs.FileSystem.from_uri(url)                  # plain s3://: endpoint from the env
    pq.write_table(pa.table({"x": [1, 2]}), root + "/a.parquet", filesystem=fs)
    fs, root = pafs.FileSystem.from_uri(uri)                  # endpoint in the query, keys from the env
    pq.write_table(pa.table({"x": [3]}), root + "/b.parquet", filesystem=fs)
    print(pl.scan_parquet(url + "/").collect()["x"].sum())    # polars with no storage_options
""")


def _clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def test_env_is_enough_in_another_process(s3):
    env = {**_clean_env(), **s3.env}
    out = subprocess.run([sys.executable, "-c", CHILD, s3.url("child"), s3.uri("child")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "6"
    assert _keys(s3, "child/") == ["child/a.parquet", "child/b.parquet"]


def test_env_is_enough_in_process(s3, monkeypatch):
    """What a test of ``Store``/``probe query`` against this server needs: ``s3.env`` via monkeypatch."""
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    fs, root = pafs.FileSystem.from_uri(s3.url("inproc"))
    pq.write_table(TABLE, f"{root}/t.parquet", filesystem=fs)
    assert pq.read_table(s3.path("inproc/t.parquet"), filesystem=s3.filesystem).equals(TABLE)
    assert pl.scan_parquet(s3.url("inproc/")).collect()["tok"].to_list() == [0, 1, 2, 3]


def test_two_servers_get_own_buckets_and_stop():
    with s3_server() as a, s3_server() as b:
        assert a.bucket != b.bucket and a.endpoint_url != b.endpoint_url
        pq.write_table(TABLE, a.path("t.parquet"), filesystem=a.filesystem)
        assert a.filesystem.get_file_info(a.path("t.parquet")).type == pafs.FileType.File
        port = int(a.host_port.split(":")[1])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_bad_bucket_name():
    with pytest.raises(ValueError, match="Bad_Bucket"):
        with s3_server(bucket="Bad_Bucket"):
            pass
