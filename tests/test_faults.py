"""Faults during `probe run` on a local two-node Ray cluster: a model actor killed, a worker node removed,
the driver killed and the run resumed. Each faulted run must end with exactly the tables of an
undisturbed run on the same inputs; readers must never see a partial file.

The cluster (ray.cluster_utils.Cluster: a head with 2 CPUs and a worker node with 1) is shared by the
module, and every run uses the same cluster shape: the driver sizes torch threads from the cluster's
CPUs, and equal tables need equal arithmetic.
"""
import os
import re
import signal
import time

import pytest

from tests.conftest import noise, two_model_inputs
from tests.raycluster import (
    ConcurrentReader, LocalCluster, RayEnv, assert_one_row_per_key, assert_readable, assert_same_tables, check_running,
    finish, markers, probe_args, start_probe, temporaries, wait_for,
)

pytestmark = pytest.mark.slow  # Ray clusters and killed processes

CHUNK, N_CHUNKS = 32, 24
LAYERS = {"tiny-a": 3, "tiny-b": 2}
TOTAL = N_CHUNKS * len(LAYERS)  # _progress markers of a finished run (batch size 1)
RUN_TIMEOUT = 240


@pytest.fixture(scope="module")
def cluster():
    ray_env = RayEnv()
    c = None
    try:
        c = LocalCluster(ray_env, head={"num_cpus": 2}, worker={"num_cpus": 1, "resources": {"node_b": 1}})
        yield c
    finally:
        if c is not None:
            c.shutdown()
        ray_env.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return two_model_inputs(tmp_path_factory.mktemp("faults"))


def run_args(cluster, inputs, out, run_id, *extra):
    return probe_args(inputs["models"], inputs["data"], out, run_id, "--max-tokens", str(N_CHUNKS * CHUNK),
                      "--address", cluster.address, *extra)


def launch(cluster, inputs, name, *extra):
    out, log = str(inputs["root"] / name), str(inputs["root"] / f"{name}.log")
    return out, log, start_probe(run_args(cluster, inputs, out, name, *extra), cluster.env, log)


def in_progress(out: str, proc, log: str, per_model: int = 2):
    """A predicate: every model has finished ``per_model`` batches, and the run is far from done."""
    def check():
        check_running(proc, log)
        done = markers(out)
        assert len(done) < TOTAL, f"the run finished all {TOTAL} batches before the fault could be injected"
        return all(sum(p.startswith(f"model={m}/") for p in done) >= per_model for m in LAYERS)
    return check


@pytest.fixture(scope="module")
def baseline(cluster, inputs):
    """An undisturbed run, read the whole time by a concurrent reader."""
    start = time.perf_counter()
    out, log, proc = launch(cluster, inputs, "baseline")
    reader = ConcurrentReader(out)
    reader.start()
    try:
        text = finish(proc, RUN_TIMEOUT, log)
    finally:
        reader.stop()
    return {"out": out, "reader": reader, "seconds": time.perf_counter() - start, "log": text}


def test_a_healthy_run_on_a_cluster_prints_no_native_warnings(baseline):
    """`--address` to a running two-node cluster: no Ray C++ warning or Python warning reaches the log."""
    assert noise(baseline["log"]) == []


def test_undisturbed_run_is_complete_and_never_partially_visible(baseline):
    out, reader = baseline["out"], baseline["reader"]
    assert reader.errors == [], reader.errors[:3]
    assert reader.reads > 0
    assert len(markers(out)) == TOTAL
    assert_one_row_per_key(out, N_CHUNKS, CHUNK, LAYERS)
    assert assert_readable(out) > 0
    assert temporaries(out) == []


def test_actor_killed_mid_run(cluster, inputs, baseline):
    out, log, proc = launch(cluster, inputs, "actor-kill")
    try:
        wait_for(in_progress(out, proc, log), 120, "the first batches")
        victim = cluster.model_actors()[0]
        os.kill(victim.pid, signal.SIGKILL)
        done_at_kill = len(markers(out))
        finish(proc, RUN_TIMEOUT, log)
    finally:
        proc.kill()
    assert done_at_kill < TOTAL
    restarted = [a for a in cluster.model_actors(state=None, detail=True) if a.actor_id == victim.actor_id]
    assert restarted and restarted[0].num_restarts >= 1, "the killed actor was not restarted"
    assert markers(out) == markers(baseline["out"])
    assert_one_row_per_key(out, N_CHUNKS, CHUNK, LAYERS)
    assert_same_tables(out, baseline["out"])
    assert_readable(out)


def test_worker_node_removed_mid_run(cluster, inputs, baseline):
    """tiny-b is pinned to the worker node (--actor-resources); the node goes mid-run and a replacement
    with the same resources joins (what an autoscaler does): the actor restarts there, the job finishes."""
    out, log, proc = launch(cluster, inputs, "node-removal", "--actor-resources", '{"tiny-b": {"node_b": 1}}')
    lost = cluster.worker
    try:
        wait_for(in_progress(out, proc, log), 120, "the first batches")
        actors = cluster.model_actors(detail=True)
        pinned = [a for a in actors if "node_b" in a.required_resources]
        assert len(actors) == 2 and len(pinned) == 1 and pinned[0].node_id == lost.node_id
        moved = [a.actor_id for a in actors if a.node_id == lost.node_id]
        cluster.remove(lost)
        done_at_removal = len(markers(out))
        cluster.worker = cluster.add_worker()  # also gives the next tests the same cluster shape
        finish(proc, RUN_TIMEOUT, log)
    finally:
        proc.kill()
    assert done_at_removal < TOTAL
    after = {a.actor_id: a for a in cluster.model_actors(state=None, detail=True)}
    assert all(after[a].num_restarts >= 1 for a in moved)
    assert after[pinned[0].actor_id].node_id == cluster.worker.node_id
    assert markers(out) == markers(baseline["out"])
    assert_one_row_per_key(out, N_CHUNKS, CHUNK, LAYERS)
    assert_same_tables(out, baseline["out"])
    assert_readable(out)


@pytest.fixture(scope="module")
def resumed(cluster, inputs):
    """`probe run` SIGKILLed mid-capture, a stale temporary left as by a writer killed mid-write, then --resume."""
    out, log, proc = launch(cluster, inputs, "driver-kill")
    try:
        wait_for(in_progress(out, proc, log, per_model=3), 120, "the first batches")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    # Ray ends a dead driver's actors; wait so that no old actor writes while the resumed run lists markers.
    wait_for(lambda: not cluster.model_actors(), 60, "the killed driver's actors to end", interval=0.5)
    done = {m: sum(1 for p in markers(out) if p.startswith(f"model={m}/")) for m in LAYERS}
    stale = os.path.join(out, "tokens", "model=tiny-a", f".part-000000-000000.parquet.{'0' * 32}.tmp")
    with open(stale, "wb") as f:
        f.write(b"PAR1 half a file")
    log2 = str(inputs["root"] / "driver-kill-resume.log")
    proc2 = start_probe(run_args(cluster, inputs, out, "driver-kill", "--resume"), cluster.env, log2)
    try:
        text = finish(proc2, RUN_TIMEOUT, log2)
    finally:
        proc2.kill()
    return {"out": out, "done": done, "log": text, "stale": stale}


def test_driver_killed_then_resumed(resumed, baseline):
    out, done = resumed["out"], resumed["done"]
    assert 0 < sum(done.values()) < TOTAL
    for model, n in done.items():
        if n:
            assert f"[capture] {model}: {n} of {N_CHUNKS} batches already written, skipped" in resumed["log"]
    import json

    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["stages"]["capture"]["skipped_batches"] == done
    assert all(manifest["stages"][s]["status"] == "done" for s in ("capture", "stats", "report"))
    assert markers(out) == markers(baseline["out"])
    assert_one_row_per_key(out, N_CHUNKS, CHUNK, LAYERS)
    assert_same_tables(out, baseline["out"])
    assert_readable(out)


def test_no_temporaries_left_after_a_resumed_run(resumed):
    assert temporaries(resumed["out"]) == []


PAGES = ("--analyses", "neuron_pages", "--examples-k", "3", "--context-tokens", "2", "--pages-checkpoint-s", "0")


def saved_states(out: str) -> dict[str, list[str]]:
    """The neuron_pages checkpoints under OUT/_state, by model."""
    root = os.path.join(out, "_state", "neuron_pages")
    return {m: [f for f in os.listdir(os.path.join(root, f"model={m}")) if f.endswith(".pt")]
            for m in LAYERS if os.path.isdir(os.path.join(root, f"model={m}"))}


def test_neuron_pages_resumed_after_sigkill_starts_from_its_checkpoints(cluster, inputs):
    """neuron_pages keeps its state in the actors: a SIGKILLed run resumes from the checkpoints (saved before every
    batch here) to the tables of an undisturbed run, recomputing only the batches after the last checkpoint."""
    out, log, proc = launch(cluster, inputs, "pages-baseline", *PAGES)
    finish(proc, RUN_TIMEOUT, log)
    assert not os.path.exists(os.path.join(out, "_state", "neuron_pages", "model=tiny-a"))  # removed once the tables exist
    killed, log, proc = launch(cluster, inputs, "pages-kill", *PAGES)
    try:
        wait_for(in_progress(killed, proc, log, per_model=4), 120, "the first batches")
        wait_for(lambda: len(saved_states(killed)) == len(LAYERS), 60, "a checkpoint of each model")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    wait_for(lambda: not cluster.model_actors(), 60, "the killed driver's actors to end", interval=0.5)
    log2 = str(inputs["root"] / "pages-kill-resume.log")
    proc2 = start_probe(run_args(cluster, inputs, killed, "pages-kill", *PAGES, "--resume"), cluster.env, log2)
    try:
        text = finish(proc2, RUN_TIMEOUT, log2)
    finally:
        proc2.kill()
    assert_same_tables(killed, out)
    for model in LAYERS:
        line = next(line for line in text.splitlines() if f"[stats] neuron_pages {model}: " in line)
        actors, saved, again = (int(n) for n in re.search(r"actors (\d+), from checkpoints (\d+), recomputed (\d+)", line).groups())
        assert saved > 0 and actors + saved + again == N_CHUNKS, line
    assert not saved_states(killed)
