"""`probe run --out s3://...` for real, against an S3-compatible server on 127.0.0.1 (moto)."""
import os

import polars as pl
import pytest
import ray

from jobs.cli import main
from jobs.api import run_query
from tests.conftest import save_tiny_model
from tests.corpus import write_corpus
from tests.s3server import s3_server

pytestmark = pytest.mark.slow  # runs the job on Ray against an S3 server


@pytest.fixture(scope="module")
def s3_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3")
    model, data = save_tiny_model(root / "tiny-s3"), write_corpus(root / "c.txt", n_rows=30)
    saved = dict(os.environ)
    with s3_server() as s3:
        # Set before Ray starts so the actors and tasks, which open s3:// themselves, inherit it.
        os.environ.update(s3.env)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            out = s3.url("runs/r1")
            code = main(["run", "--models", model, "--data", data, "--out", out, "--chunk-tokens", "64",
                         "--max-tokens", "400", "--max-samples", "20", "--mi-tokens", "64"])
            yield {"s3": s3, "out": out, "code": code, "local": str(root / "local-run"), "model": model, "data": data}
        finally:
            ray.shutdown()
            os.environ.clear()
            os.environ.update(saved)


def test_run_writes_tables_to_s3(s3_run):
    assert s3_run["code"] == 0
    s3 = s3_run["s3"]
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="runs/r1/").get("Contents", [])]
    assert "runs/r1/manifest.json" in keys and "runs/r1/report.html" in keys
    assert any(k.startswith("runs/r1/layer_metrics/model=tiny-s3/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith("runs/r1/figures/") and k.endswith(".png") for k in keys)
    assert not any(".tmp" in k for k in keys)


def test_query_reads_back_from_s3(s3_run):
    counts = run_query(s3_run["out"], "SELECT model, count(*) AS n FROM layer_metrics GROUP BY model")
    assert counts.to_dicts() == [{"model": "tiny-s3", "n": 6 * 64 * 3}]
    acts = run_query(s3_run["out"], "SELECT * FROM activations")
    assert acts.height > 0 and acts["values"].dtype == pl.List(pl.Float16)


def test_existing_s3_run_is_refused(s3_run, capsys):
    code = main(["run", "--models", s3_run["model"], "--data", s3_run["data"], "--out", s3_run["out"], "--chunk-tokens", "64"])
    assert code == 2 and "existing run" in capsys.readouterr().err
