"""Local Ray clusters, `probe run` subprocesses and run-folder checks for the cluster and fault tests.

Isolation: every Ray process started here gets a private ``RAY_TMPDIR`` (so no other ``ray.init()`` on
the machine finds these clusters, and ours find no one else's) and is stopped by process id, found by
that ``RAY_TMPDIR`` in its environment. Never ``ray stop``: it would stop every Ray instance on the machine.
"""
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import polars as pl
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv's bin: `ray` and the workers use its python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError naming ``what``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class RayEnv:
    """A private RAY_TMPDIR (short: Ray's socket paths must stay under 107 characters) and the environment
    for every Ray or probe process of a test; ``stop()`` ends exactly the processes that carry it."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
        env.update(RAY_TMPDIR=self.tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                   PATH=BIN + os.pathsep + env.get("PATH", ""), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self.env = env

    @contextlib.contextmanager
    def applied(self):
        """This process's os.environ set to ``env`` (ray.cluster_utils.Cluster starts nodes from here)."""
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.env)
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def pids(self) -> list[int]:
        tag = f"\0RAY_TMPDIR={self.tmp}\0".encode()
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if tag in b"\0" + f.read() + b"\0":
                        found.append(int(name))
            except OSError:
                continue
        return found

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process of this environment, SIGKILL what is left after ``grace`` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: not self.pids(), wait, "ray processes to exit", interval=0.2)
        shutil.rmtree(self.tmp, ignore_errors=True)


class HeadNode:
    """``ray start --head --block`` with a dashboard on loopback (for ``ray job submit``)."""

    def __init__(self, ray_env: RayEnv, num_cpus: int = 2, log_path: str | None = None):
        self.port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.log = open(log_path or os.path.join(ray_env.tmp, "head.log"), "w")
        cmd = [os.path.join(BIN, "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}", f"--port={self.port}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               # Ray's fixed defaults (agent 52365, client server 10001) may be taken by another Ray on this machine.
               f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
               "--object-store-memory=200000000", "--disable-usage-stats"]
        self.proc = subprocess.Popen(cmd, env=ray_env.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> None:
        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{tail(self.log.name)}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.dashboard + "/api/version", timeout=2) as r:
                    return r.status == 200
            return False

        wait_for(up, timeout, "the head node's dashboard", interval=0.5)


class LocalCluster:
    """A ray.cluster_utils.Cluster (head with a loopback dashboard, one worker node) started from this process."""

    def __init__(self, ray_env: RayEnv, head: dict, worker: dict):
        from ray.cluster_utils import Cluster

        self.env, self.worker_args, self.dashboard_port = ray_env, worker, free_port()
        with ray_env.applied():
            self.cluster = Cluster(initialize_head=True, head_node_args={
                **head, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": self.dashboard_port,
                "dashboard_agent_listen_port": free_port()})
        self.worker = self.add_worker()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(self):
        with self.env.applied():
            return self.cluster.add_node(**self.worker_args, dashboard_agent_listen_port=free_port())

    def remove(self, node) -> None:
        with self.env.applied():
            self.cluster.remove_node(node)

    def shutdown(self) -> None:
        with self.env.applied():
            self.cluster.shutdown()

    def model_actors(self, state: str | None = "ALIVE", detail: bool = False) -> list:
        return model_actors(f"http://127.0.0.1:{self.dashboard_port}", state, detail)


def model_actors(dashboard: str, state: str | None = "ALIVE", detail: bool = False) -> list:
    """The ModelWorker actors (ray.util.state via the dashboard), retried while the dashboard starts."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "ModelWorker")] + ([("state", "=", state)] if state else [])

    def query():
        try:
            return (list_actors(address=dashboard, filters=filters, detail=detail),)
        except Exception:  # the state API answers errors while the dashboard starts
            return None

    return wait_for(query, 60, "the state API", interval=0.5)[0]


def probe_args(models, data, out, run_id, *extra) -> list[str]:
    """``probe run`` arguments for the small runs of these tests (1-token batches of 32-token chunks)."""
    return ["run", "--models", ",".join(models), "--data", data, "--out", out, "--run-id", run_id,
            "--chunk-tokens", "32", "--batch-size", "1", "--max-samples", "20", "--mi-tokens", "64", "--seed", "3", *extra]


def start_probe(args: list[str], ray_env: RayEnv, log_path: str) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=ray_env.env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float, log_path: str) -> str:
    """Wait for a probe subprocess; return its log, failing with the log's tail if it fails or hangs."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"probe run did not finish in {timeout:.0f}s:\n{tail(log_path)}") from None
    text = open(log_path).read()
    assert proc.returncode == 0, f"probe run exited with {proc.returncode}:\n{tail(log_path)}"
    return text


def check_running(proc: subprocess.Popen, log_path: str) -> None:
    """Fail at once, with the log's tail, if a probe subprocess that should still run has ended."""
    if proc.poll() is not None:
        raise AssertionError(f"probe run ended early with {proc.returncode}:\n{tail(log_path)}")


def tail(path: str, n: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def markers(out: str) -> set[str]:
    """Finished batches: ``model=<name>/<part>.json`` under OUT/_progress."""
    root = os.path.join(out, "_progress")
    return {os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "model=*", "part-*.json"))}


def read_tables(out: str) -> dict[str, pl.DataFrame]:
    """Every table of a run, rows sorted by its keys (then its floats) so runs compare row for row."""
    from jobs.api import open_run

    tables = {}
    for name, scan in open_run(out).tables().items():
        frame = scan.collect()
        keys = [c for c, t in frame.schema.items() if not t.is_nested() and not t.is_float()]
        floats = [c for c, t in frame.schema.items() if t.is_float()]
        tables[name] = frame.sort(keys + floats).select(sorted(frame.columns))
    return tables


# Written from one forward pass each: equal inputs give bit-equal values, whatever the batch's history.
PER_TOKEN = ("tokens", "layer_metrics", "attn_norms", "activations", "rotation_angles")


def assert_same_tables(got: str, want: str) -> None:
    """Same tables, same rows, same values: per-token tables bit for bit, statistics to 1e-9 relative
    (polars and numpy reductions may sum in a different order from one run to the next)."""
    from polars.testing import assert_frame_equal

    a, b = read_tables(got), read_tables(want)
    assert sorted(a) == sorted(b), f"tables differ: {sorted(a)} vs {sorted(b)}"
    for name in a:
        assert a[name].height == b[name].height, f"{name}: {a[name].height} rows vs {b[name].height}"
        try:
            if name in PER_TOKEN:
                assert_frame_equal(a[name], b[name], check_exact=True)
            else:
                assert_frame_equal(a[name], b[name], check_exact=False, rtol=1e-9, atol=1e-12)
        except AssertionError as e:
            raise AssertionError(f"table {name} differs: {e}") from None


def assert_one_row_per_key(out: str, n_chunks: int, chunk_tokens: int, n_layer: dict[str, int]) -> None:
    """No shard missing or written twice: every (model, chunk, pos[, layer]) key exactly once."""
    from jobs.api import run_query

    for table, per_token in (("tokens", None), ("layer_metrics", "layer"), ("attn_norms", "layer")):
        keys = ["model", "chunk", "pos"] + ([per_token] if per_token else [])
        counts = run_query(out, f"SELECT {', '.join(keys)}, count(*) AS n FROM {table} GROUP BY {', '.join(keys)}")
        assert counts["n"].max() == 1, f"{table}: a key appears {counts['n'].max()} times"
        for model, layers in n_layer.items():
            want = n_chunks * chunk_tokens * (layers if per_token else 1)
            assert counts.filter(pl.col("model") == model).height == want, f"{table} {model}: keys missing"
    acts = run_query(out, "SELECT model, layer, chunk, pos, count(*) AS n FROM activations GROUP BY model, layer, chunk, pos")
    assert acts["n"].max() == 1, "activations: a sampled token written twice"


def temporaries(out: str) -> list[str]:
    return [os.path.join(r, f) for r, _, files in os.walk(out) for f in files if f.endswith(".tmp")]


def assert_readable(out: str) -> int:
    """Every visible Parquet file opens and every leftover temporary is invisible to readers; returns files read."""
    from jobs.store import Store

    store = Store(out)
    files = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.endswith(".parquet")]
    for path in files:
        pq.read_table(path)
    for tmp in temporaries(out):
        assert os.path.basename(tmp).startswith("."), f"a temporary is not hidden: {tmp}"
    listed = {p for t in store.tables() for p in store.list_files(t)}
    assert not any(p.endswith(".tmp") or os.path.basename(p).startswith(".") for p in listed)
    return len(files)


class ConcurrentReader(threading.Thread):
    """Opens every visible Parquet file of a run folder, over and over, while the run writes it."""

    def __init__(self, out: str):
        super().__init__(daemon=True)
        self.out, self.reads, self.errors = out, 0, []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            for path in glob.glob(os.path.join(self.out, "*", "**", "*.parquet"), recursive=True):
                try:
                    pq.read_table(path)
                    self.reads += 1
                except Exception as e:  # names are only ever renamed over, so any failure is a partial file
                    self.errors.append(f"{path}: {e}")
            time.sleep(0.1)

    def stop(self):
        self.done.set()
        self.join(10)
