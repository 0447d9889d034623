"""Operating `probe run` on Ray clusters: `ray job submit` to a head node started with `ray start`, and
model actors placed by --actor-resources on a two-node cluster.

Row counts are derived from the inputs (chunks, layers, widths, target occurrences from the tokenizer),
not from the run being checked.
"""
import os
import subprocess
import sys
import uuid

import pytest

from tests.conftest import build_tokenizer, save_tiny_model
from tests.corpus import write_corpus
from tests.raycluster import (
    BIN, REPO, HeadNode, LocalCluster, RayEnv, check_running, finish, markers, model_actors, probe_args, start_probe, wait_for,
)

pytestmark = pytest.mark.slow  # Ray clusters

CHUNK, N_CHUNKS = 32, 12
SHAPES = {"tiny-a": {"n_layer": 3, "n_embd": 32, "n_inner": 64}, "tiny-b": {"n_layer": 2, "n_embd": 48, "n_inner": 96}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-ops")
    models = [save_tiny_model(root / name, seed=i, **shape) for i, (name, shape) in enumerate(SHAPES.items())]
    return {"root": root, "models": models, "data": write_corpus(root / "corpus.txt", n_rows=40)}


def target_occurrences(data: str) -> int:
    """' her' tokens at positions >= 1 of the run's chunks, counted from the text with the tokenizer."""
    tok = build_tokenizer()
    with open(data, encoding="utf-8") as f:
        rows = [line + "\n" for line in f.read().split("\n")[:-1]]
    ids = [t for r in rows if r.strip() for t in tok(r)["input_ids"]][: N_CHUNKS * CHUNK]
    her = tok(" her", add_special_tokens=False)["input_ids"][0]
    return sum(1 for i, t in enumerate(ids) if t == her and i % CHUNK > 0)


def check_row_counts(out: str, data: str, analyses=("path", "rotation", "neurons", "mi", "attn_ar")) -> None:
    from jobs.api import run_query

    def counts(table, by="model"):
        frame = run_query(out, f"SELECT {by}, count(*) AS n FROM {table} GROUP BY {by}")
        return {tuple(r[:-1]) if len(r) > 2 else r[0]: r[-1] for r in frame.rows()}

    tokens = N_CHUNKS * CHUNK
    want = {"tokens": {m: tokens for m in SHAPES}, "layer_metrics": {m: tokens * s["n_layer"] for m, s in SHAPES.items()},
            "path_summary": {m: 1 for m in SHAPES}}
    if "attn_ar" in analyses:
        want["attn_norms"] = want["layer_metrics"]
    if "mi" in analyses:
        want["mi"] = {m: (s["n_layer"] + 1) * s["n_embd"] * (s["n_embd"] - 1) // 2 for m, s in SHAPES.items()}
        want["mi_summary"] = {m: s["n_layer"] + 1 for m, s in SHAPES.items()}
    if "neurons" in analyses:
        want["neuron_logit"] = {m: s["n_layer"] * s["n_inner"] for m, s in SHAPES.items()}
    if "rotation" in analyses:
        k = target_occurrences(data)
        want["rotation_angles"] = {m: 3 * s["n_layer"] * k for m, s in SHAPES.items()}
        want["rotation"] = {m: s["n_layer"] for m, s in SHAPES.items()}
    for table, per_model in want.items():
        assert counts(table) == per_model, table
    if "neurons" in analyses:
        # Every layer holds one row per sampled token, as many as each neuron's fit used.
        n = run_query(out, "SELECT DISTINCT model, n FROM neuron_logit")
        assert n.height == len(SHAPES) and n["n"].n_unique() == 1 and 0 < n["n"][0] <= 40
        acts = counts("activations", by="model, layer")
        assert acts == {(m, layer): n["n"][0] for m, s in SHAPES.items() for layer in range(1, s["n_layer"] + 1)}
    if "attn_ar" in analyses:
        layers = run_query(out, "SELECT DISTINCT model, layer FROM attn_ar")
        assert layers.height == sum(s["n_layer"] for s in SHAPES.values())


def submit(head: HeadNode, ray_env: RayEnv, sid: str, args: list[str]) -> None:
    """`ray job submit --working-dir <repo> --no-wait -- python -m jobs.cli ...`, retried while the job agent starts."""
    cmd = [os.path.join(BIN, "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", REPO,
           "--submission-id", sid, "--no-wait", "--", "python", "-m", "jobs.cli", *args]

    def submitted():
        done = subprocess.run(cmd, env=ray_env.env, capture_output=True, text=True, timeout=120)
        if done.returncode and "No available agent" in done.stderr:  # the job agent starts after the dashboard
            return None
        assert done.returncode == 0, done.stdout + done.stderr
        return True

    wait_for(submitted, 120, "the job agent to take the job", interval=2)


def check_actor_process(client, sid: str, head: HeadNode, ray_env: RayEnv) -> None:
    """A live ModelWorker runs the venv's python in the uploaded working dir (jobs/, probe_core/, no .venv)."""
    def running_actor():
        if client.get_job_status(sid).is_terminal():
            raise AssertionError(f"the job ended before its actors were seen:\n{client.get_job_logs(sid)[-3000:]}")
        return model_actors(head.dashboard)

    pid = wait_for(running_actor, 180, "a model actor", interval=0.5)[0].pid
    with open(f"/proc/{pid}/maps") as f:
        assert os.path.join(sys.prefix, "lib") in f.read(), "the actor does not run the venv's python"
    cwd = os.readlink(f"/proc/{pid}/cwd")
    assert cwd.startswith(ray_env.tmp), f"the actor does not run in the job's working dir: {cwd}"
    assert os.path.isdir(os.path.join(cwd, "jobs")) and os.path.isdir(os.path.join(cwd, "probe_core"))
    assert not os.path.exists(os.path.join(cwd, ".venv")), "the upload should skip what .gitignore names"


def test_ray_job_submit_to_a_ray_start_head(inputs):
    """`ray job submit` to a `ray start --head` node: 2 models on 2 CPUs (actors must not starve the
    statistics tasks of CPUs), the job SUCCEEDS and writes every table with the expected rows."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    ray_env = RayEnv()
    out, sid = str(inputs["root"] / "submitted"), f"probe-{uuid.uuid4().hex[:8]}"
    try:
        head = HeadNode(ray_env, num_cpus=2)
        head.wait_ready()
        submit(head, ray_env, sid, probe_args(inputs["models"], inputs["data"], out, "submitted", "--max-tokens", str(N_CHUNKS * CHUNK)))
        client = JobSubmissionClient(head.dashboard)
        check_actor_process(client, sid, head, ray_env)
        status = wait_for(lambda: (s := client.get_job_status(sid)).is_terminal() and s, 300, "the job to end", interval=1)
        logs = client.get_job_logs(sid)
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
    finally:
        ray_env.stop()
    assert "done: " in logs
    assert len(markers(out)) == N_CHUNKS * len(SHAPES)
    check_row_counts(out, inputs["data"])


def loaded_model(pid: int, models: list[str]) -> str:
    """Which model an actor process holds: safetensors weights stay memory-mapped from their folder."""
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    held = [os.path.basename(m) for m in models if os.path.join(m, "model.safetensors") in maps]
    assert len(held) == 1, f"actor {pid} maps {held} of the model folders"
    return held[0]


def test_actor_resources_place_model_actors_on_named_nodes(inputs):
    """Two nodes with custom resources; --actor-resources pins each model's actor to one of them
    (crossed: tiny-a on the worker, tiny-b on the head, so placement by creation order cannot pass)."""
    ray_env = RayEnv()
    cluster = None
    try:
        cluster = LocalCluster(ray_env, head={"num_cpus": 1, "resources": {"node_a": 1}},
                               worker={"num_cpus": 1, "resources": {"node_b": 1}})
        out, log = str(inputs["root"] / "placed"), str(inputs["root"] / "placed.log")
        pins = '{"tiny-a": {"node_b": 1}, "tiny-b": {"node_a": 1}}'
        proc = start_probe(probe_args(inputs["models"], inputs["data"], out, "placed", "--max-tokens", str(N_CHUNKS * CHUNK),
                                      "--analyses", "path", "--address", cluster.address, "--actor-resources", pins), ray_env, log)
        try:
            def two_actors():
                check_running(proc, log)
                return len(a := cluster.model_actors(detail=True)) == 2 and a

            actors = wait_for(two_actors, 120, "two model actors", interval=0.5)
            placed = {loaded_model(a.pid, inputs["models"]): (a.node_id, a.required_resources) for a in actors}
            finish(proc, 240, log)
        finally:
            proc.kill()
        head, worker = cluster.cluster.head_node.node_id, cluster.worker.node_id
        assert placed["tiny-a"][0] == worker and placed["tiny-a"][1].get("node_b") == 1, placed
        assert placed["tiny-b"][0] == head and placed["tiny-b"][1].get("node_a") == 1, placed
    finally:
        if cluster is not None:
            cluster.shutdown()
        ray_env.stop()
    check_row_counts(out, inputs["data"], analyses=("path",))
