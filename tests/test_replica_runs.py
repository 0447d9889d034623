"""End to end with --replicas on a local Ray instance (2 CPUs): two replicas per model give the tables of
one replica per model; a replica killed for good mid-run (ray.kill, no_restart) hands its batches to the
other replica; a run interrupted with replicas resumes to the same tables."""
import numpy as np
import pytest
import ray

from jobs import capture
from jobs.cli import main
from tests.conftest import two_model_inputs
from tests.raycluster import PER_TOKEN, assert_one_row_per_key, assert_same_tables, markers, read_tables

pytestmark = pytest.mark.slow  # runs the job on Ray

CHUNK, N_CHUNKS = 64, 8
LAYERS = {"tiny-a": 3, "tiny-b": 2}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return two_model_inputs(tmp_path_factory.mktemp("replicas"))


def args(inputs, name, *extra) -> list[str]:
    # Batches of one chunk: 8 batches per model, so both replicas get several.
    return ["run", "--models", ",".join(inputs["models"]), "--data", inputs["data"], "--out", str(inputs["root"] / name),
            "--run-id", name, "--chunk-tokens", str(CHUNK), "--max-tokens", str(CHUNK * N_CHUNKS), "--batch-size", "1",
            "--max-samples", "30", "--mi-tokens", "100", "--seed", "3", *extra]


@pytest.fixture
def spy(monkeypatch):
    """The ReplicaSet of the next run, and a hook called after each finished batch (model, done so far)."""
    seen = {"sets": [], "hook": None, "done": {}}
    start = capture.start_workers

    def start_workers(*a, **kw):
        workers = start(*a, **kw)
        seen["sets"].append(workers)
        return workers

    update = capture.Progress.update

    def progress_update(self, model, *a, **kw):
        update(self, model, *a, **kw)
        seen["done"][model] = seen["done"].get(model, 0) + 1
        if seen["hook"]:
            seen["hook"](model, seen["done"][model])

    monkeypatch.setattr(capture, "start_workers", start_workers)
    monkeypatch.setattr(capture.Progress, "update", progress_update)
    return seen


def assert_close_tables(got: str, want: str, tol: float = 1e-6) -> None:
    """Per-token tables bit for bit; statistics equal within ``tol`` (relative and absolute): a replica that
    recomputes lost neuron samples runs other batches than the one that first computed them."""
    from polars.testing import assert_frame_equal

    a, b = read_tables(got), read_tables(want)
    assert sorted(a) == sorted(b)
    inexact = []
    for name in a:
        assert_frame_equal(a[name], b[name], check_exact=name in PER_TOKEN, rtol=tol, atol=tol)
        if not a[name].equals(b[name]):
            inexact.append(name)
    print(f"{got}: tables equal bit for bit except {inexact or 'none'} (those within {tol:g})")


@pytest.fixture(scope="module")
def one_replica(ray_local, inputs):
    assert main(args(inputs, "r1", "--replicas", "1")) == 0
    return str(inputs["root"] / "r1")


def test_two_replicas_give_the_tables_of_one(one_replica, inputs, spy, capsys):
    assert main(args(inputs, "r2", "--replicas", "2")) == 0
    out = capsys.readouterr().out
    assert "4 model actors (tiny-a x2, tiny-b x2)" in out
    (workers,) = spy["sets"]
    for model in LAYERS:
        owner = workers.owner[model]
        assert (owner >= 0).all() and set(owner.tolist()) == {0, 1}, owner  # both replicas computed batches
    assert_one_row_per_key(str(inputs["root"] / "r2"), N_CHUNKS, CHUNK, LAYERS)
    # Equal, not just close: the same batches, the same arithmetic (1 torch thread per actor both ways); the
    # statistics to 1e-9 relative only for polars' and numpy's reductions, as between any two runs.
    assert_same_tables(str(inputs["root"] / "r2"), one_replica)


def test_replica_killed_for_good_hands_its_batches_over(one_replica, inputs, spy, capsys):
    killed = []

    def kill(model, done):
        if model == "tiny-a" and done == 2 and not killed:
            victim = spy["sets"][0].actors["tiny-a"][1]
            ray.kill(victim, no_restart=True)
            killed.append(victim)

    spy["hook"] = kill
    assert main(args(inputs, "r2-kill", "--replicas", "2")) == 0
    out = capsys.readouterr().out
    assert killed and "[capture] tiny-a replica 1 died for good" in out
    (workers,) = spy["sets"]
    assert workers.alive == {"tiny-a": [True, False], "tiny-b": [True, True]}
    run = str(inputs["root"] / "r2-kill")
    assert markers(run) == markers(one_replica)
    assert_one_row_per_key(run, N_CHUNKS, CHUNK, LAYERS)
    assert_close_tables(run, one_replica)


def test_json_replicas_naming_an_unknown_model_is_refused(inputs, capsys):
    assert main(args(inputs, "r-bad", "--replicas", '{"tiny-c": 2}')) == 2
    err = capsys.readouterr().err
    assert "--replicas names ['tiny-c'], which are not among the models" in err and err.count("\n") == 1


def test_interrupted_run_with_replicas_resumes(one_replica, inputs, spy):
    """Interrupted (Ctrl-C: the CLI shuts Ray down) after a few batches with --replicas 2, then resumed
    with another --replicas (a speed setting): the skipped batches' samples are recomputed by replica 0."""
    def interrupt(model, done):
        if sum(spy["done"].values()) == 5:
            raise KeyboardInterrupt

    spy["hook"] = interrupt
    assert main(args(inputs, "r2-resume", "--replicas", "2")) == 130
    assert not ray.is_initialized()
    run = str(inputs["root"] / "r2-resume")
    assert 0 < len(markers(run)) < len(markers(one_replica))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # the cluster shape of the other runs
    spy["hook"] = None
    assert main(args(inputs, "r2-resume", "--resume", "--replicas", '{"tiny-a": 2, "tiny-b": 3}')) == 0
    workers = spy["sets"][-1]
    assert [len(a) for a in workers.actors.values()] == [2, 3]
    assert (np.concatenate(list(workers.owner.values())) == -1).any()  # some batches were skipped, not recomputed
    assert markers(run) == markers(one_replica)
    assert_one_row_per_key(run, N_CHUNKS, CHUNK, LAYERS)
    assert_close_tables(run, one_replica)
