"""The capture progress display: rate from a model's first finished batch, frozen once it is done."""
import io
import time

import pytest

from jobs.capture import Progress
from jobs.progress import StageBar


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_rate_eta_and_done(capsys):
    clock = Clock()
    progress = Progress({"a": 4, "b": 4}, {"a": 0, "b": 1}, chunk_tokens=100, every=0.0, clock=clock)
    assert progress.lines() == ["[capture] a: 0/4 chunks, - tok/s, ETA unknown (no batch finished yet)",
                                "[capture] b: 1/4 chunks, - tok/s, ETA unknown (no batch finished yet)"]
    clock.now = 30.0  # the first batch arrives after loading weights: only its compute time counts
    progress.update("a", 2, 200, seconds=2.0)
    assert progress.rate("a") == 100.0 and progress.lines()[0] == "[capture] a: 2/4 chunks, 100 tok/s, ETA 2s"
    clock.now = 31.0  # from here on the wall clock between batches: 200 tokens in 1 s
    progress.update("a", 2, 200, seconds=0.5)
    assert progress.rate("a") == 200.0 and progress.lines()[0] == "[capture] a: 4/4 chunks, 200 tok/s, done"
    clock.now = 100.0  # a finished model's rate no longer decays while others run
    progress.update("b", 3, 300, seconds=3.0)
    assert progress.lines() == ["[capture] a: 4/4 chunks, 200 tok/s, done", "[capture] b: 4/4 chunks, 100 tok/s, done"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == progress.lines()


def test_prints_at_most_every_interval(capsys):
    clock = Clock()
    progress = Progress({"a": 10}, {"a": 0}, chunk_tokens=10, every=5.0, clock=clock)
    for t in range(9):
        clock.now = float(t)
        progress.update("a", 1, 10, seconds=0.1)
    assert len(capsys.readouterr().out.splitlines()) == 2  # at t = 0 and t = 5
    clock.now = 9.0
    progress.update("a", 1, 10, seconds=0.1)  # the last batch always prints
    assert capsys.readouterr().out.splitlines() == ["[capture] a: 10/10 chunks, 10 tok/s, done"]


def test_stage_bar_lines_rate_eta_and_heartbeat():
    """Off a terminal every update is one line with counts, rate and ETA; a line repeats while nothing finishes."""
    out = io.StringIO()
    with StageBar("stats", "tasks done", 4, "tasks", every=0.2, file=out) as bar:
        time.sleep(0.5)  # nothing finishes: the heartbeat still prints
        bar.update(4)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("[stats] tasks done: 0/4 tasks") and len([x for x in lines if " 0/4 " in x]) >= 2
    assert lines[-1].startswith("[stats] tasks done: 4/4 tasks,") and "tasks/s" in lines[-1] and "ETA 00:00" in lines[-1]


def test_heartbeat_prints_before_the_first_batch_and_while_none_returns(capsys):
    clock = Clock()
    progress = Progress({"a": 4}, {"a": 0}, chunk_tokens=100, every=10.0, clock=clock)
    progress.tick()  # at the start: nothing has returned yet, the line shows anyway
    assert capsys.readouterr().out.splitlines() == ["[capture] a: 0/4 chunks, - tok/s, ETA unknown (no batch finished yet)"]
    clock.now = 9.0
    progress.tick()
    assert capsys.readouterr().out == ""
    clock.now = 10.0  # a slow first batch: the line repeats every 10 s
    progress.tick()
    assert capsys.readouterr().out.splitlines() == ["[capture] a: 0/4 chunks, - tok/s, ETA unknown (no batch finished yet)"]


@pytest.mark.slow
def test_model_loading_is_shown(ray_local, capsys):
    import ray

    from jobs.capture import wait_loaded
    from jobs.dispatch import ReplicaSet

    class SlowLoader:  # defined here, so Ray pickles it by value
        def __init__(self, seconds: float):
            time.sleep(seconds)

        def ready(self) -> bool:
            return True

    actor = ray.remote(num_cpus=0)(SlowLoader)
    workers = ReplicaSet({"a": [actor.remote(0.0)], "b": [actor.remote(4.0)]}, n_chunks=1)
    wait_loaded(workers, every=0.3)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[capture] models loaded: 0/2 actors") and "loading a replica 0" in lines[0]
    assert any("1/2 actors" in line and "loading b replica 0" in line for line in lines)  # the heartbeat while b loads
    assert lines[-1].startswith("[capture] models loaded: 2/2 actors") and "loading" not in lines[-1]


@pytest.mark.slow
def test_stats_progress_names_tasks_per_analysis_and_the_slowest(ray_local, capsys):
    import ray

    from jobs.run import wait_stats

    def sleep(seconds: float) -> None:
        time.sleep(seconds)

    nap = ray.remote(num_cpus=0)(sleep)
    tasks = [("mi", "mi tiny layer 0/1", nap.remote(2.0)), ("mi", "mi tiny layer 1/1", nap.remote(0.0)),
             ("path", "path tiny task 1/1", nap.remote(0.0))]
    wait_stats(tasks, every=0.3)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[stats] tasks done: 0/3 tasks") and lines[0].endswith("mi 0/2, path 0/1; slowest: mi tiny layer 0/1")
    assert any(line.endswith("mi 1/2, path 1/1; slowest: mi tiny layer 0/1") for line in lines)  # the heartbeat while it runs
    assert lines[-1].startswith("[stats] tasks done: 3/3 tasks,") and lines[-1].endswith("mi 2/2, path 1/1")
