"""Issue #18, "Nothing mixed, nothing lost late": a resume never mixes weights or settings, and what would fail
late (a long --sentences line, degenerate chunks, a model folder as --data, a full disk, a dead --address auto)
fails early, in one line, exit 2."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from jobs import cluster
from jobs.cli import main
from jobs.config import RunConfig, build_config
from jobs.errors import UsageError
from jobs.manifest import SPEED_SETTINGS, Manifest
from jobs.plan import check_inputs
from jobs.sources import resolve_source
from jobs.store import LEASE, Store
from tests.conftest import noise, refused_line, save_tiny_model
from tests.corpus import write_corpus


class RayStarted(Exception):
    """Raised instead of starting Ray: the checks before it all passed."""


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(cfg):
        raise RayStarted()

    monkeypatch.setattr(cluster, "start_ray", refuse)


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the weights' hash cache stays in the test's folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    return {"root": root, "model": save_tiny_model(root / "tiny"), "data": write_corpus(root / "c.txt", n_rows=30)}


def base_args(small, out, *extra):
    return ["run", "--models", small["model"], "--data", small["data"], "--out", str(out), "--chunk-tokens", "64", *extra]


def first_run(small, out, **kw):
    """A run's manifest as `probe run` writes it at its plan stage."""
    cfg = {"models": small["model"], "data": small["data"], "out": str(out), "run_id": "orig", "chunk_tokens": 64,
           "analyses": "path", **kw}
    Manifest(Store(str(out)), check_inputs(build_config(cfg))).stage("plan", "done")


# ---------------------------------------------------------------- weights on resume
def test_resume_with_other_weights_is_refused_naming_the_model(small, tmp_path, capsys, no_ray):
    model = save_tiny_model(tmp_path / "mine", seed=1)
    out = tmp_path / "run"
    first_run(small, out, models=model)
    before = (out / "manifest.json").read_text()
    assert json.loads(before)["models"]["mine"]["weights"]
    with pytest.raises(RayStarted):  # unchanged weights: the resume goes on
        main(["run", "--models", model, "--data", small["data"], "--out", str(out), "--run-id", "orig", "--resume",
              "--analyses", "path", "--chunk-tokens", "64"])
    save_tiny_model(tmp_path / "mine", seed=2)  # same config, other weights
    capsys.readouterr()
    line = refused_line(capsys, ["run", "--models", model, "--data", small["data"], "--out", str(out), "--run-id", "orig",
                             "--resume", "--analyses", "path", "--chunk-tokens", "64"])
    assert "mine" in line and "weights" in line, line
    assert (out / "manifest.json").read_text() == before
    assert not (out / LEASE).exists()


def test_weights_hash_is_cached_on_path_size_and_mtime(tmp_path, monkeypatch):
    from jobs import models

    folder = save_tiny_model(tmp_path / "m")
    reads = []
    real = models.hash_file
    monkeypatch.setattr(models, "hash_file", lambda path: reads.append(path) or real(path))
    first = models.weights_fingerprint(folder)
    assert reads and models.weights_fingerprint(folder) == first and len(reads) == 1  # the second reads nothing
    assert os.path.isfile(tmp_path / "cache" / "gpt2-probe" / "weights.json")
    save_tiny_model(tmp_path / "m", seed=3)
    assert models.weights_fingerprint(folder) != first and len(reads) == 2


# ---------------------------------------------------------------- --sentences in the plan
def test_sentences_longer_than_n_positions_or_without_the_target_name_the_line(small, tmp_path, capsys, no_ray):
    long = tmp_path / "long.txt"
    long.write_text("Mary thanked her brother.\n\n" + "Alice called her" * 200 + ".\n")  # line 3: ~600 tokens > 256
    line = refused_line(capsys, base_args(small, tmp_path / "o1", "--analyses", "path,rotation", "--sentences", str(long)))
    assert "line 3" in line and "n_positions 256" in line and "tiny" in line, line
    none = tmp_path / "none.txt"
    none.write_text(" her brother thanked John.\n")  # the target only as the first token: nothing to compare it with
    line = refused_line(capsys, base_args(small, tmp_path / "o2", "--analyses", "path,rotation", "--sentences", str(none)))
    assert "line 1" in line and "' her'" in line, line
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_sentence_without_the_target_is_named_in_the_plan(small, tmp_path, gpt2_tokenizer):
    from jobs.analyses import rotation
    from jobs.models import resolve_model

    some = tmp_path / "some.txt"
    some.write_text("Mary thanked her brother.\n\nHer brother thanked John.\n")  # line 3: "Her" is another token
    cfg = RunConfig(sentences=str(some), analyses=("path", "rotation"))
    part = rotation.inputs(cfg, gpt2_tokenizer, [resolve_model(small["model"])])
    assert part.idle_lines == (3,) and part.sentences[0].shape[0] == 2
    assert "line 3 of --sentences without the target" in rotation.describe(type("P", (), {"cfg": cfg}), part)[0]


# ---------------------------------------------------------------- degenerate chunk sizes
@pytest.mark.parametrize("tokens, analyses, minimum, who", [("2", "path", 5, "path"), ("4", "path", 5, "path"),
                                                           ("6", "path,attn_ar", 7, "attn_ar")])
def test_chunk_tokens_below_what_the_analyses_need(small, tmp_path, capsys, no_ray, tokens, analyses, minimum, who):
    args = ["run", "--models", small["model"], "--data", small["data"], "--out", str(tmp_path / "o"), "--chunk-tokens", tokens,
            "--analyses", analyses]
    line = refused_line(capsys, args)
    assert f"--chunk-tokens {tokens}" in line and f"at least {minimum}" in line and who in line, line
    with pytest.raises(UsageError):
        RunConfig(chunk_tokens=int(tokens), analyses=tuple(analyses.split(",")))
    RunConfig(chunk_tokens=minimum, analyses=tuple(analyses.split(",")))


# ---------------------------------------------------------------- --data: what was taken, a model folder
def test_plan_counts_files_taken_and_skipped_by_kind(tmp_path):
    folder = tmp_path / "corpus"
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref")
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text("some text\n")
    (folder / "notes.md").write_text("notes\n")
    (folder / "_SUCCESS").write_text("")
    (folder / "x.csv").write_text("a,b\n")
    source = resolve_source(str(folder))
    assert source.description.startswith(f"2 .txt files under {folder}"), source.description
    assert "skipped 2 of other types (.csv, .md) and 2 hidden or bookkeeping" in source.description, source.description


def test_a_model_folder_as_data_is_refused(small, tmp_path, capsys, no_ray):
    folder = tmp_path / "model"
    shutil.copytree(small["model"], folder)
    (folder / "merges.txt").write_text("#version: 0.2\nĠ t\n")  # as a slow tokenizer saves it: a .txt file
    line = refused_line(capsys, ["run", "--models", small["model"], "--data", str(folder), "--out", str(tmp_path / "o"),
                             "--chunk-tokens", "64"])
    assert "a model folder, not a corpus" in line, line


# ---------------------------------------------------------------- resume friction
def test_resume_takes_the_same_data_spelled_relative(small, tmp_path, monkeypatch, no_ray):
    out = tmp_path / "run"
    first_run(small, out)  # --data absolute
    monkeypatch.chdir(small["root"])
    with pytest.raises(RayStarted):
        main(["run", "--models", small["model"], "--data", "c.txt", "--out", str(out), "--run-id", "orig", "--resume",
              "--analyses", "path", "--chunk-tokens", "64"])


def test_rerun_suggests_the_runs_own_id_and_resume_keeps_it(small, tmp_path, capsys):
    out = tmp_path / "run"
    first_run(small, out)
    line = refused_line(capsys, base_args(small, out, "--analyses", "path"))
    assert "--resume --run-id orig" in line, line
    cfg = build_config({"models": small["model"], "data": small["data"], "out": str(out), "chunk_tokens": 64,
                        "analyses": "path", "resume": True})  # no --run-id: a fresh timestamp
    assert cfg.run_id != "orig"
    Manifest(Store(str(out)), check_inputs(cfg)).stage("plan", "done")
    assert json.loads((out / "manifest.json").read_text())["run_id"] == "orig"


# ---------------------------------------------------------------- free space
def test_no_space_check_is_a_speed_setting_that_skips_the_check(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from jobs import plan

    assert "no_space_check" in SPEED_SETTINGS
    monkeypatch.setattr(plan.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    fake = lambda **kw: SimpleNamespace(cfg=RunConfig(out=str(tmp_path / "o"), **kw), disk_estimate=lambda: {"corpus": 1, "m": 10**6})
    with pytest.raises(UsageError, match="has 10 B free"):
        plan.check_free_space(fake(), Store(str(tmp_path / "o")))
    plan.check_free_space(fake(no_space_check=True), Store(str(tmp_path / "o")))


@pytest.mark.slow
def test_too_little_free_space_is_refused_before_capture(small, tmp_path, capsys, monkeypatch):
    import ray

    from jobs import capture, plan

    def reached(*a, **k):
        raise AssertionError("capture started")

    monkeypatch.setattr(capture, "start_workers", reached)
    monkeypatch.setattr(plan.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # the corpus stage runs on it
    capsys.readouterr()
    out = tmp_path / "new" / "run"
    try:
        line = refused_line(capsys, base_args(small, out, "--analyses", "path"))
    finally:
        ray.shutdown()
    assert "has 1000 B free, less than the ~" in line and "before capture" in line and "--no-space-check" in line, line
    assert not out.exists()


# ---------------------------------------------------------------- --address auto
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_address_auto_with_a_stale_address_file_answers_in_one_line(small, tmp_path):
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{closed_port()}\n")
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "jobs.cli", *base_args(small, tmp_path / "o", "--analyses", "path",
                                                                         "--address", "auto")],
                           capture_output=True, text=True, timeout=90, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("--address auto with a stale address file did not answer within 90 s")
    assert p.returncode == 2 and time.monotonic() - t0 < 60, p.stderr[-2000:]
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "--address auto" in lines[0] and "ray_current_cluster" in lines[0], p.stderr[-2000:]


def test_address_auto_at_an_instance_that_does_not_answer_times_out(tmp_path, monkeypatch):
    """A port that accepts and then says nothing (a dying GCS): the probe gives up after the timeout."""
    (tmp_path / "ray").mkdir()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{silent.getsockname()[1]}\n")
        monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 4.0)
        monkeypatch.setattr(cluster.ray, "init", lambda *a, **k: pytest.fail("ray.init reached"))
        t0 = time.monotonic()
        with pytest.raises(UsageError, match="did not answer within 4 s"):
            cluster.start_ray(RunConfig(address="auto"))
        assert time.monotonic() - t0 < 15


def test_messages_name_the_runs_own_id_on_a_resume_without_run_id(tmp_path):
    """The interrupted and disk-full lines of a resume without --run-id name the run's id, not this call's timestamp."""
    from jobs.config import RunConfig
    from jobs.manifest import own_run_id
    from jobs.store import Store

    out = str(tmp_path / "run")
    Store(out).write_json("manifest.json", {"run_id": "orig"})
    resumed = RunConfig(out=out, resume=True).resolved()
    assert resumed.run_id != "orig" and own_run_id(resumed) == "orig"
    assert own_run_id(RunConfig(out=out, run_id="new").resolved()) == "new"  # not a resume: its own id
    assert own_run_id(RunConfig(out=str(tmp_path / "none"), resume=True).resolved()).startswith("20")  # no manifest yet


# ---------------------------------------------------------------- a healthy run is quiet

def test_noise_finds_ray_native_and_python_warnings():
    assert noise("[2026-12-06 08:24:31,870 W 1234 5678] gcs_rpc_client.h:151: Failed to connect to GCS within 5 seconds")
    assert noise("(raylet) [2026-12-06 08:24:31,870 E 12 13] worker_pool.cc:1: x")
    assert noise("/x/mi.py:3: UserWarning: The given NumPy array is not writable")
    assert not noise("[2026-12-06 08:24:31,870 I 1234 5678] core_worker.cc:1: started\n[capture] 3/3 batches")


@pytest.mark.slow
def test_a_healthy_local_run_prints_no_warning_a_user_cannot_act_on(small, tmp_path):
    """A whole run in a fresh local Ray instance (a subprocess, as a user starts it): no Ray C++ warning, no
    Python warning (the MI stage once printed NumPy's "not writable" UserWarning)."""
    args = base_args(small, tmp_path / "out", "--analyses", "path,mi,attn_ar", "--max-tokens", "512")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=repo, capture_output=True, text=True,
                          timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert noise(text) == []
