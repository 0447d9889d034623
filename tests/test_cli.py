"""Bad input: exit code 2, one line saying what to do, no traceback, nothing written. Plus --help and config."""
import os
import subprocess
import sys

import pytest

from jobs.cli import main
from jobs.config import build_config
from jobs.errors import UsageError
from tests.conftest import error_lines, save_tiny_model
from tests.corpus import write_corpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"root": root, "model": save_tiny_model(root / "tiny"), "data": write_corpus(root / "c.txt", n_rows=30)}


def run_bad(capsys, setup, *extra, out=None):
    out = out or str(setup["root"] / "never-written")
    args = ["run", "--models", setup["model"], "--data", setup["data"], "--out", out, "--chunk-tokens", "64", *extra]
    # Later flags win in argparse, so extra can override the defaults above.
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = error_lines(err)  # stage progress lines may come first
    assert len(lines) == 1 and lines[0].startswith("probe: error: "), err
    assert "Traceback" not in err
    if out.endswith("never-written"):
        assert not os.path.exists(out)
    return lines[0]


def test_folder_without_config(capsys, setup, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    assert "no config.json" in run_bad(capsys, setup, "--models", str(empty))


def test_missing_model_folder(capsys, setup):
    assert "does not exist" in run_bad(capsys, setup, "--models", "./no/such/model")


def test_not_gpt2(capsys, setup, tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "model.safetensors").write_bytes(b"")
    assert "not GPT-2" in run_bad(capsys, setup, "--models", str(tmp_path / "bert"))


def test_pickle_weights_refused(capsys, setup, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(setup["model"], folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert "--allow-pickle" in run_bad(capsys, setup, "--models", str(folder))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")  # reaches the corpus stage, on Ray
def test_missing_and_empty_data(capsys, setup, tmp_path):
    assert "no such file" in run_bad(capsys, setup, "--data", str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in run_bad(capsys, setup, "--data", str(tmp_path / "empty.txt"))
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    assert "no text" in run_bad(capsys, setup, "--data", str(tmp_path / "blank.txt"))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")  # reaches the corpus stage, on Ray
def test_corpus_shorter_than_a_chunk(capsys, setup, tmp_path):
    (tmp_path / "short.txt").write_text("Mary met her friend.\n")
    assert "fewer than one chunk" in run_bad(capsys, setup, "--data", str(tmp_path / "short.txt"))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")  # reaches the corpus stage, on Ray
def test_invalid_utf8_names_the_line(capsys, setup, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine line\nanother fine line\nbad \xff\xfe here\n")
    assert "line 3" in run_bad(capsys, setup, "--data", str(tmp_path / "bad.txt"))


def test_chunk_tokens_above_n_positions(capsys, setup):
    assert "n_positions 256" in run_bad(capsys, setup, "--chunk-tokens", "512")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")  # reaches the corpus stage, on Ray
def test_target_not_one_token_or_absent(capsys, setup):
    assert "not one" in run_bad(capsys, setup, "--target", " hermeneutics")
    assert "never occurs" in run_bad(capsys, setup, "--target", " cat")


def test_out_is_a_file_or_existing_run(capsys, setup, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in run_bad(capsys, setup, out=str(f))
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text("{}")
    assert "existing run" in run_bad(capsys, setup, out=str(run))
    assert "--resume" in run_bad(capsys, setup, out=str(run))


def test_bad_flags(capsys, setup):
    assert "--analyses" in run_bad(capsys, setup, "--analyses", "path,telepathy")
    assert "--run-id" in run_bad(capsys, setup, "--run-id", "../escape")
    assert "--device" in run_bad(capsys, setup, "--device", "tpu")


def test_yaml_unknown_key_suggests(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("modles: gpt2\nchunk-tokens: 128\n")
    with pytest.raises(UsageError, match="did you mean 'models'"):
        build_config({}, str(cfg))


def test_yaml_then_cli_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models: [a, b]\nchunk_tokens: 128\nseed: 7\n")
    c = build_config({"seed": 9, "models": None}, str(cfg))
    assert c.models == ("a", "b") and c.chunk_tokens == 128 and c.seed == 9
    assert c.out == f"results/{c.run_id}"


@pytest.mark.slow
def test_unknown_hub_model_offline(setup):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "--models", "gpt2-nonexistent-size", "--data", setup["data"],
                        "--out", str(setup["root"] / "offline-run")], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "cannot load model 'gpt2-nonexistent-size'" in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists(setup["root"] / "offline-run")


@pytest.mark.slow
def test_help_documents_every_flag():
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    for flag in ("--models", "--data", "--out", "--run-id", "--analyses", "--max-tokens", "--chunk-tokens", "--batch-size",
                 "--device", "--address", "--seed", "--config", "--final-hidden", "--resume", "--target", "--mi-method"):
        assert flag in p.stdout


def test_unknown_yaml_key_exits_2(capsys, setup, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("chunk-tokens: 64\nmax_sample: 10\n")
    assert "did you mean 'max-samples'" in run_bad(capsys, setup, "--config", str(cfg))
