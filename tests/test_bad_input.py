"""Every bad input on every command: exit 2, one `probe: error:` line, no traceback, --out untouched."""
import json
import os
import shutil

import pytest

from jobs.config import RunConfig
from jobs.errors import UsageError
from jobs.manifest import STAGES
from tests.conftest import refused_line, save_tiny_model
from tests.corpus import write_corpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return {"root": root, "model": save_tiny_model(root / "tiny"), "data": write_corpus(root / "c.txt", n_rows=30)}


def run_bad(capsys, setup, *extra, out=None):
    out = out or str(setup["root"] / "never-written")
    line = refused_line(capsys, ["run", "--models", setup["model"], "--data", setup["data"], "--out", out, "--chunk-tokens", "64", *extra])
    assert not os.path.exists(setup["root"] / "never-written")
    return line


def model_copy(setup, tmp_path, name="m"):
    folder = tmp_path / name
    shutil.copytree(setup["model"], folder)
    return folder


@pytest.mark.parametrize("yaml_text, key", [
    ("data: [a, b]\n", "--data"), ("seed: '7'\n", "--seed"), ("target: 5\n", "--target"), ("alpha: '0.05'\n", "--alpha"),
    ("resume: 'false'\n", "--resume"), ("max_samples: true\n", "--max-samples"), ("models: [1, 2]\n", "--models"),
    ("actor_resources: [1]\n", "--actor-resources"),
])
def test_yaml_values_of_the_wrong_type(capsys, setup, tmp_path, yaml_text, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    out = setup["root"] / "never-written"
    assert key in refused_line(capsys, ["run", "--config", str(cfg), "--out", str(out)])  # a flag would win over the YAML value
    assert not out.exists()


def test_every_field_is_type_checked():
    # Table-driven: a bool is not an int, a str is not a float, an int is a float (stored as float).
    with pytest.raises(UsageError, match="--chunk-tokens"):
        RunConfig(chunk_tokens=True)
    with pytest.raises(UsageError, match="--allow-pickle"):
        RunConfig(allow_pickle="false")
    with pytest.raises(UsageError, match="--analyses"):
        RunConfig(analyses=["path"])
    with pytest.raises(UsageError, match="--actor-resources"):
        RunConfig(actor_resources='{"a": {"x": 1}}')


def test_alpha_int_becomes_float():
    with pytest.raises(UsageError, match="--alpha must be in"):
        RunConfig(alpha=1)


def test_flag_values(capsys, setup):
    assert "--seed" in run_bad(capsys, setup, "--seed", "-1")
    assert "--seed" in run_bad(capsys, setup, "--seed", "abc")  # argparse errors are one line too
    assert "--max-tokens" in run_bad(capsys, setup, "--max-tokens", "10")
    for address in ("not an address", "host:notaport", "ftp://x:1"):
        assert "--address" in run_bad(capsys, setup, "--address", address)
    assert "--sentences" in run_bad(capsys, setup, "--analyses", "path", "--sentences", setup["data"])


@pytest.mark.parametrize("address", ["auto", "local", "10.0.0.1:6379", "ray://head:10001", "http://127.0.0.1:8265"])
def test_valid_addresses(address):
    assert RunConfig(address=address).address == address


def test_out_unknown_scheme_and_below_a_file(capsys, setup, tmp_path):
    assert "foo" in run_bad(capsys, setup, out="foo://x")
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in run_bad(capsys, setup, out=str(f / "run"))
    assert f.read_text() == "x"


def test_truncated_empty_and_misshaped_weights(capsys, setup, tmp_path):
    folder = model_copy(setup, tmp_path)
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[:-100])
    assert "not a complete safetensors" in run_bad(capsys, setup, "--models", str(folder))
    weights.write_bytes(b"")
    assert "is empty" in run_bad(capsys, setup, "--models", str(folder))
    weights.write_bytes(raw)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_inner": 128}))
    assert "mlp.c_fc.weight" in run_bad(capsys, setup, "--models", str(folder))
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": 4}))
    assert "h.3." in run_bad(capsys, setup, "--models", str(folder))


def test_missing_tokenizer_says_so(capsys, setup, tmp_path):
    folder = model_copy(setup, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    assert "no tokenizer" in run_bad(capsys, setup, "--models", str(folder))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")  # reaches the corpus stage, on Ray
def test_parquet_text_not_strings_and_corrupt(capsys, setup, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    assert "not strings" in run_bad(capsys, setup, "--data", str(tmp_path / "ints.parquet"))
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": [open(setup["data"]).read()] * 4}), good, compression="zstd")
    raw = bytearray(good.read_bytes())
    raw[10:200] = bytes(190)  # zero the first data page, keep the footer
    (tmp_path / "bad.parquet").write_bytes(bytes(raw))
    assert "bad.parquet" in run_bad(capsys, setup, "--data", str(tmp_path / "bad.parquet"))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")  # reaches the corpus stage, on Ray
def test_jsonl_bad_line_named(capsys, setup, tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "Mary met her friend."}\n[1, 2]\n')
    assert "line 2" in run_bad(capsys, setup, "--data", str(p))
    p.write_text('{"text": "Mary met her friend."}\n{"text": 3}\n')
    assert "line 2" in run_bad(capsys, setup, "--data", str(p))
    p.write_text('{"text": "a"}\nnot json\n')
    assert "line 2" in run_bad(capsys, setup, "--data", str(p))


def test_unknown_data_suffix(capsys, setup, tmp_path):
    (tmp_path / "c.csv").write_text("text\nMary\n")
    assert "unknown file type" in run_bad(capsys, setup, "--data", str(tmp_path / "c.csv"))


def test_query_output_errors(capsys, setup, tmp_path):
    run = tmp_path / "run"
    (run / "activations" / "model=m" / "layer=1").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"stages": {s: {"status": "done"} for s in STAGES}}))  # a finished run
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"chunk": pa.array([0], pa.int32()), "pos": pa.array([0], pa.int32()), "label": [True],
                             "values": pa.array([[1.0, 2.0]], pa.list_(pa.float16(), 2))}),
                   run / "activations" / "model=m" / "layer=1" / "p.parquet")
    assert "does not exist" in refused_line(capsys, ["query", str(run), "SELECT 1 AS x", "--output", str(tmp_path / "no" / "x.csv")])
    out = tmp_path / "x.csv"
    assert "nested" in refused_line(capsys, ["query", str(run), "SELECT * FROM activations", "--output", str(out)])
    assert not out.exists()


def test_query_and_report_on_a_non_run(capsys, tmp_path):
    assert "no manifest.json" in refused_line(capsys, ["query", str(tmp_path), "SELECT 1"])
    assert "no manifest.json" in refused_line(capsys, ["report", str(tmp_path)])
    assert "cannot be opened" in refused_line(capsys, ["query", "foo://x", "SELECT 1"])


def test_a_run_of_another_layout_is_refused_where_it_is_opened(capsys, tmp_path):
    """One check where a run is opened replaces per-table shims: a rotation table without its ``source``
    column (as runs before per-source tests wrote it) is named with what it lacks, for query and report."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = tmp_path / "run"
    (run / "rotation" / "model=m").mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    old = {"target": [" her"], "layer": pa.array([1], pa.int16()), "t": [1.0]}
    pq.write_table(pa.table(old), run / "rotation" / "model=m" / "all.parquet")
    for command in (["query", str(run), "SELECT * FROM rotation"], ["report", str(run)]):
        line = refused_line(capsys, command)
        assert "another version" in line and "table rotation lacks" in line and "source" in line, line
