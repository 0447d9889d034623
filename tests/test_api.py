"""Reading a run: the Python API (``jobs.api``), and the warnings and absent-table answers that it,
``probe query`` and ``probe report`` share."""
import contextlib
import io
import shutil

import numpy as np
import polars as pl
import pytest

from jobs.api import open_run, run_query
from jobs.cli import main
from jobs.errors import UsageError
from jobs.store import Lease, Store
from tests.conftest import save_tiny_model
from tests.corpus import write_corpus

pytestmark = pytest.mark.slow
CHUNK = 32


@pytest.fixture(scope="module")
def run_dir(ray_local, tmp_path_factory):
    """A finished run of two analyses (path and neurons: no mi, rotation, attn_ar tables)."""
    root = tmp_path_factory.mktemp("api")
    model, data = save_tiny_model(root / "tiny"), write_corpus(root / "c.txt", n_rows=40)
    out, err = str(root / "run"), io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", "--models", model, "--data", data, "--out", out, "--chunk-tokens", str(CHUNK), "--max-tokens",
                     str(CHUNK * 6), "--batch-size", "2", "--max-samples", "20", "--analyses", "path,neurons", "--run-id", "r1"])
    assert code == 0
    (root / "run.err").write_text(err.getvalue())
    return out


def test_every_stage_shows_progress(run_dir):
    lines = open(f"{run_dir}.err").read().splitlines()
    for start in ("[corpus] units tokenized: 0/1 units", "[corpus] shards written: 1/1 shards", "[capture] models loaded: 1/1 actors",
                  "[stats] tasks done: 0/5 tasks"):
        assert any(line.startswith(start) for line in lines), start
    # per analysis: path's one task, neurons' fit per layer (3) and heatmap
    last = [line for line in lines if line.startswith("[stats] ")][-1]
    assert last.startswith("[stats] tasks done: 5/5 tasks,") and last.endswith("path 1/1, neurons 4/4")


@pytest.fixture
def cut_short(run_dir, tmp_path):
    """A copy of the run that stopped in statistics: stats failed, no report, one batch marker of capture lost."""
    out = str(tmp_path / "run")
    shutil.copytree(run_dir, out)
    store = Store(out)
    manifest = store.read_json("manifest.json")
    manifest["stages"]["stats"] = {"status": "failed", "error": "OSError: boom"}
    del manifest["stages"]["report"]
    store.write_json("manifest.json", manifest)
    marker = sorted(store.list_parts("_progress/model=tiny", ".json"))[0]
    store.fs.delete_file(store.path(f"_progress/model=tiny/{marker}.json"))
    shutil.rmtree(store.path("neuron_logit"))
    return out


def test_open_run_tables_and_activations(run_dir, capsys):
    run = open_run(run_dir)
    assert capsys.readouterr().err == ""  # a finished run: no warning
    tables = run.tables()
    assert {"tokens", "layer_metrics", "activations", "neuron_logit"} <= set(tables)
    assert all(isinstance(t, pl.LazyFrame) for t in tables.values())
    assert {"token", "is_proper_noun", "next_token_logit"} <= set(run.table("tokens").collect_schema().names())
    x = run.activations("tiny", 2)
    frame = run.table("activations").filter(model="tiny", layer=2).sort("chunk", "pos").collect()
    assert isinstance(x, np.ndarray) and x.shape == (frame.height, 64) and x.dtype == np.float16
    np.testing.assert_array_equal(x, np.array(frame["values"].to_list(), dtype=np.float16))
    with pytest.raises(UsageError, match="no activations for model other"):
        run.activations("other", 1)
    with pytest.raises(UsageError, match=r"^no table `layer_metric` in any run \(tables: .*layer_metrics"):
        run.sql("SELECT * FROM layer_metric")


def test_a_table_of_an_analysis_not_run_says_so(run_dir, capsys):
    with pytest.raises(UsageError, match=r"^table `mi_summary` is absent: analysis `mi` was not run$"):
        open_run(run_dir).table("mi_summary")
    with pytest.raises(UsageError, match=r"^table `attn_ar` is absent: analysis `attn_ar` was not run$"):
        run_query(run_dir, "SELECT * FROM attn_ar")
    assert main(["query", run_dir, "SELECT layer FROM rotation"]) == 2
    assert capsys.readouterr().err.strip() == "probe: error: table `rotation` is absent: analysis `rotation` was not run"


def test_incomplete_run_warns_and_names_the_resume_command(cut_short, capsys):
    run = open_run(cut_short)
    err = capsys.readouterr().err.splitlines()
    resume = f"probe run --resume --run-id r1 --out {cut_short}"
    assert len(err) == 1 and err[0].startswith(f"probe: warning: {cut_short} is incomplete (")
    assert "statistics failed" in err[0] and "the report not run" in err[0] and "tiny 1 of 3 batches missing" in err[0]
    assert err[0].endswith(f"resume with {resume}")
    with pytest.raises(UsageError, match=f"^table `neuron_logit` is absent: the run stopped before statistics; resume with {resume}$"):
        run.table("neuron_logit")
    assert main(["query", cut_short, "SELECT count(*) FROM layer_metrics"]) == 0  # still readable, with the warning
    assert capsys.readouterr().err.startswith(f"probe: warning: {cut_short} is incomplete")


def test_run_in_progress_warns(cut_short, capsys):
    lease = Lease(Store(cut_short))
    lease.acquire()  # a live lease: this process, refreshed now
    try:
        open_run(cut_short)
    finally:
        lease.release()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"probe: warning: {cut_short} is in progress (probe run on host ")
    assert err[0].endswith("; statistics failed; the report not run): its tables are incomplete until it finishes")


def test_probe_report_warns_and_shows_progress(cut_short, capsys):
    assert main(["report", cut_short]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"probe: warning: {cut_short} is incomplete")
    figures = [line for line in err if line.startswith("[report] figures: ")]
    assert figures and ", ETA " in figures[-1] and figures[-1].split()[2].split("/")[0] == figures[-1].split()[2].split("/")[1]
