"""The capture progress display: rate from a model's first finished batch, frozen once it is done."""
from jobs.capture import Progress


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
    import io
    import time

    from jobs.progress import StageBar

    out = io.StringIO()
    with StageBar("stats", "tasks done", 4, "tasks", every=0.2, file=out) as bar:
        time.sleep(0.5)  # nothing finishes: the heartbeat still prints
        bar.update(4)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("[stats] tasks done: 0/4 tasks") and len([x for x in lines if " 0/4 " in x]) >= 2
    assert lines[-1].startswith("[stats] tasks done: 4/4 tasks,") and "tasks/s" in lines[-1] and "ETA 00:00" in lines[-1]
