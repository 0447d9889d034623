"""Run safety without a Ray cluster: resume settings, the run-folder lease, damaged manifests and shards,
unreachable addresses."""
import json
import os
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.config import RunConfig
from jobs.errors import UsageError
from jobs.manifest import SPEED_SETTINGS, differing_settings, result_settings
from jobs.store import LEASE, LEASE_STALE_S, Lease, Store
from tests.conftest import error_lines


def config(**kw) -> dict:
    return json.loads(json.dumps(RunConfig(run_id="r", out="o", **kw).to_dict()))


def test_result_settings_are_every_field_but_the_speed_set():
    keys = set(result_settings(config()))
    assert {"seed", "final_hidden", "chunk_tokens", "target", "mi_bins", "mi_method", "mi_tokens", "analyses"} <= keys
    assert not keys & SPEED_SETTINGS


def test_resume_names_each_differing_setting_and_both_values():
    old = config()
    assert differing_settings(old, config(batch_size=4, max_in_flight=5, device="cpu", placement_timeout=5.0)) == []
    diff = differing_settings(old, config(seed=7, final_hidden="pre_ln_f", analyses=("path", "mi")))
    assert len(diff) == 3
    assert any(d.startswith("--seed 0 (run) vs 7 (now)") for d in diff)
    assert any("--final-hidden 'hf'" in d and "'pre_ln_f'" in d for d in diff)
    assert any(d.startswith("--analyses") for d in diff)


def test_lease_excludes_a_second_writer_and_names_the_holder(tmp_path):
    store = Store(str(tmp_path / "run"))
    first = Lease(store)
    first.acquire()
    try:
        with pytest.raises(UsageError, match=f"pid {os.getpid()}"):
            Lease(store).acquire()
    finally:
        first.release()
    assert not store.exists(LEASE)
    with Lease(store):  # free again after release
        assert store.exists(LEASE)


def test_stale_lease_is_taken_over(tmp_path):
    store = Store(str(tmp_path / "run"))
    now = [1000.0]
    dead = Lease(store, clock=lambda: now[0])
    dead.acquire()
    dead._stop.set()  # its holder died: no more refreshes
    now[0] += LEASE_STALE_S + 1
    taker = Lease(store, clock=lambda: now[0])
    taker.acquire()
    assert store.read_json(LEASE)["token"] == taker.token
    taker.release()


def write_run(tmp_path, manifest_text: str | None = None):
    out = tmp_path / "run"
    (out / "tokens" / "model=m").mkdir(parents=True)
    pq.write_table(pa.table({"chunk": [0, 1]}), out / "tokens" / "model=m" / "part-000000-000000.parquet")
    (out / "manifest.json").write_text(manifest_text if manifest_text is not None else json.dumps({"run_id": "r", "stages": {}}))
    return out


def test_query_on_a_truncated_shard_names_the_file(tmp_path, capsys):
    out = write_run(tmp_path)
    shard = out / "tokens" / "model=m" / "part-000000-000000.parquet"
    shard.write_bytes(shard.read_bytes()[:-20])
    assert main(["query", str(out), "SELECT * FROM tokens"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "part-000000-000000.parquet" in err and "--resume" in err


def test_cut_short_manifest_says_what_to_do(tmp_path, capsys):
    out = write_run(tmp_path, manifest_text='{"run_id": "r", "sta')
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest.json is damaged" in err


def test_unreachable_address_fails_in_one_line():
    from jobs.cluster import check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(UsageError, match=f"--address 127.0.0.1:{port}: no Ray cluster answers"):
            check_reachable(f"127.0.0.1:{port}", timeout=5)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from tests.conftest import save_tiny_model
    from tests.corpus import write_corpus

    root = tmp_path_factory.mktemp("safe")
    return {"root": root, "model": save_tiny_model(root / "tiny"), "data": write_corpus(root / "c.txt", n_rows=30)}


@pytest.mark.slow
def test_resume_with_other_settings_exits_2_before_writing(small, capsys):
    """The first run's manifest is written as `probe run` writes it (plan stage), then `--resume` with other
    result-changing settings and other speed settings."""
    from jobs.config import build_config
    from jobs.manifest import Manifest
    from jobs.plan import check_inputs

    out = str(small["root"] / "run")
    base = {"models": small["model"], "data": small["data"], "out": out, "run_id": "r", "chunk_tokens": 64, "analyses": "path"}
    inputs = check_inputs(build_config(base))
    Manifest(Store(out), inputs).stage("plan", "done")
    before = open(os.path.join(out, "manifest.json")).read()
    args = ["run", "--models", small["model"], "--data", small["data"], "--out", out, "--run-id", "r", "--resume",
            "--analyses", "path", "--chunk-tokens", "64", "--seed", "5", "--final-hidden", "pre_ln_f", "--batch-size", "3"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--seed 0 (run) vs 5 (now)" in err and "--final-hidden 'hf' (run) vs 'pre_ln_f' (now)" in err
    assert "batch-size 1" not in err and "--batch-size None" not in err
    assert open(os.path.join(out, "manifest.json")).read() == before
    assert not os.path.exists(os.path.join(out, LEASE))  # released on failure


def test_stage_error_is_the_plain_innermost_cause():
    import errno

    from ray.exceptions import RayTaskError

    from jobs.errors import plain_error

    full = OSError(errno.ENOSPC, "No space left on device")
    wrapped = RayTaskError("\x1b[36mModelWorker.__call__()\x1b[39m", "traceback text", full)
    assert plain_error(wrapped) == "OSError: [Errno 28] No space left on device"


def test_resume_verifies_the_shards_a_marker_claims(tmp_path):
    store = Store(str(tmp_path / "run"))
    table = pa.table({"chunk": pa.array([0, 0], pa.int32())})
    for part in ("part-000000-000000", "part-000001-000001", "part-000002-000002"):
        path = store.path("t", "model=m", f"{part}.parquet")
        store.fs.create_dir(os.path.dirname(path), recursive=True)
        pq.write_table(table, path)
        store.write_json(f"_progress/model=m/{part}.json", {"shards": {f"t/model=m/{part}.parquet": 2}})
    damaged = store.path("t", "model=m", "part-000001-000001.parquet")
    with open(damaged, "rb") as f:
        head = f.read()[:-12]
    with open(damaged, "wb") as f:
        f.write(head)
    os.remove(store.path("t", "model=m", "part-000002-000002.parquet"))
    assert store.verified_parts("_progress/model=m") == {"part-000000-000000"}


def test_lease_of_a_killed_process_on_this_host_is_taken_over(tmp_path):
    import subprocess
    import sys

    store = Store(str(tmp_path / "run"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = Lease(store)
    gone.holder["pid"] = int(dead.stdout)
    store.fs.create_dir(store.root, recursive=True)
    assert gone._create()  # written as by a run that was then SIGKILLed: fresh, but its process is gone
    taker = Lease(store)
    taker.acquire()
    assert store.read_json(LEASE)["token"] == taker.token
    taker.release()


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_resources_no_node_offers_fail_at_once_locally_and_after_the_timeout_on_a_cluster(monkeypatch):
    import ray

    from jobs import cluster

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    cfg = RunConfig(run_id="r", out="o", device="cuda", actor_resources={"tiny": {"big_node": 1}})
    assert cluster.wanted_resources(cfg) == {"GPU": 1.0, "big_node": 1.0}
    clock = FakeClock()
    with pytest.raises(UsageError, match="local Ray instance offers no GPU: 1, big_node: 1"):
        cluster.wait_for_resources(cfg, local=True, clock=clock, sleep=clock.sleep)
    assert clock.now == 0.0  # no waiting on an instance that cannot grow
    cfg = RunConfig(run_id="r", out="o", device="cuda", placement_timeout=60.0)
    with pytest.raises(UsageError, match="within --placement-timeout 60s"):
        cluster.wait_for_resources(cfg, local=False, clock=clock, sleep=clock.sleep)
    assert 60.0 <= clock.now <= 70.0
    cluster.wait_for_resources(RunConfig(run_id="r", out="o", device="cpu"), local=True)  # nothing wanted: returns


def test_resources_that_appear_while_waiting_are_accepted(monkeypatch):
    import ray

    from jobs import cluster

    clock = FakeClock()
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, **({"GPU": 1.0} if clock.now >= 20 else {})})
    cluster.wait_for_resources(RunConfig(run_id="r", out="o", device="cuda"), local=False, clock=clock, sleep=clock.sleep)
    assert 20.0 <= clock.now < 30.0


@pytest.mark.slow
def test_device_cuda_without_a_gpu_exits_2_and_writes_nothing(small):
    """A real local Ray instance in a child process: no GPU there, so --device cuda fails before any write."""
    import subprocess
    import sys

    out = small["root"] / "cuda-run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "--models", small["model"], "--data", small["data"],
                        "--out", str(out), "--chunk-tokens", "64", "--analyses", "path", "--device", "cuda"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("probe: error:")]
    assert len(errors) == 1 and "offers no GPU" in errors[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_disk_full_is_one_line_with_the_estimate_and_the_run_stays_resumable(small, capsys, monkeypatch):
    """ENOSPC from an actor's writer (wrapped as Ray wraps it) during capture; Ray and the actors are stubbed."""
    import errno

    import ray
    from ray.exceptions import RayTaskError

    from jobs import capture

    def full_disk(*a, **k):
        raise RayTaskError("\x1b[36mModelWorker.__call__()\x1b[39m", "traceback text", OSError(errno.ENOSPC, "No space left on device"))

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # the corpus stage runs on it
    capsys.readouterr()
    monkeypatch.setattr(capture, "start_workers", lambda plan, store, shares: {})
    monkeypatch.setattr(capture, "wait_loaded", lambda workers: None)
    monkeypatch.setattr(capture, "capture_until_complete", full_disk)
    out = str(small["root"] / "full")
    try:
        assert main(["run", "--models", small["model"], "--data", small["data"], "--out", out, "--run-id", "full",
                     "--chunk-tokens", "64", "--analyses", "path"]) == 2
    finally:
        ray.shutdown()
    err = error_lines(capsys.readouterr().err)  # after the progress lines of the stages that ran
    assert len(err) == 1 and "no space left" in err[0] and "GiB for the whole run" in err[0], err
    assert f"probe run --resume --run-id full --out {out}" in err[0]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["stages"]["capture"] == {"status": "failed", "error": "OSError: [Errno 28] No space left on device"}
    assert not os.path.exists(os.path.join(out, LEASE))


@pytest.mark.ray
@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
@pytest.mark.slow
def test_a_signal_stops_the_run_in_one_line(tmp_path, sig, code):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM during capture: one line, the resume command, exit 130/143."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import save_tiny_model
    from tests.corpus import write_corpus

    model, data = save_tiny_model(tmp_path / "tiny"), write_corpus(tmp_path / "c.txt", n_rows=3000)
    out, log_path = tmp_path / "run", tmp_path / "log.txt"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "w") as log:
        p = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", "--models", model, "--data", data, "--out", str(out),
                              "--run-id", "sig", "--chunk-tokens", "32", "--batch-size", "1", "--analyses", "path"],
                             stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "[capture]" not in log_path.read_text() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert p.poll() is None, log_path.read_text()[-2000:]
        p.send_signal(getattr(signal, sig))
        assert p.wait(timeout=60) == code, log_path.read_text()[-2000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert f"interrupted: resume with probe run --resume --run-id sig --out {out}" in text
    assert "Traceback" not in text and "Fatal Python error" not in text, text[-3000:]


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_holder(small, capsys):
    from jobs.config import build_config
    from jobs.plan import check_output

    out = str(small["root"] / "busy")
    first = Lease(Store(out))
    first.acquire()  # the first run, as it holds the folder while it runs (this live process)
    try:
        assert main(["run", "--models", small["model"], "--data", small["data"], "--out", out, "--chunk-tokens", "64",
                     "--analyses", "path"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another probe run" in err[0] and f"pid {os.getpid()}" in err[0], err
    finally:
        first.release()
    stale = {"host": "elsewhere", "pid": 1, "started": 0, "refreshed": 0}
    Store(out).write_json(LEASE, stale)  # a lease left by a run that died long ago, nothing else
    check_output(build_config({"models": small["model"], "data": small["data"], "out": out}))
