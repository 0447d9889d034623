"""The capture stage: start the model actors, stream every batch to them (``jobs/dispatch.py``), print
progress, and recompute the batches whose shards were lost."""
import collections
import time

import numpy as np
import ray

from jobs.cluster import actor_resources, log
from jobs.corpus import CorpusReader
from jobs.dispatch import ReplicaSet, died_for_good, dispatch
from jobs.plan import Plan
from jobs.progress import EVERY_S, StageBar
from jobs.store import Store
from jobs.worker import ModelWorker, WorkerConfig, part_name


class Progress:
    """Per model: chunks done of total, tokens/s and ETA, printed at most every ``every`` seconds, and at least
    that often through ``tick`` (the dispatch loop's heartbeat), from before the first batch returns.

    A model's rate runs from its first finished batch (so loading weights does not dilute it) to its
    latest one, and so stops when the model is done; until a second batch is in, it is the worker's
    own compute rate. ``clock`` is injectable for tests.
    """

    def __init__(self, totals: dict[str, int], skipped: dict[str, int], chunk_tokens: int, every: float = EVERY_S,
                 clock=time.perf_counter):
        self.totals, self.done, self.chunk_tokens = totals, dict(skipped), chunk_tokens
        self.clock, self.every, self.last = clock, every, float("-inf")
        self.first, self.latest, self.tokens_since_first, self.compute_rate = {}, {}, {m: 0 for m in totals}, {}

    def update(self, model: str, chunks: int, tokens: int, seconds: float) -> None:
        now = self.clock()
        if model in self.first:
            self.tokens_since_first[model] += tokens
        else:
            self.first[model] = now
        self.latest[model] = now
        self.compute_rate[model] = tokens / max(seconds, 1e-9)
        self.done[model] += chunks
        if now - self.last >= self.every or all(self.done[m] >= self.totals[m] for m in self.totals):
            self.show(now)

    def tick(self) -> None:
        """The heartbeat: print if nothing was printed for ``every`` seconds (also before the first batch)."""
        now = self.clock()
        if now - self.last >= self.every:
            self.show(now)

    def show(self, now: float) -> None:
        self.last = now
        for line in self.lines():
            log(line)

    def rate(self, model: str) -> float | None:
        if model in self.first and self.latest[model] > self.first[model]:
            return self.tokens_since_first[model] / (self.latest[model] - self.first[model])
        return self.compute_rate.get(model)

    def lines(self) -> list[str]:
        out = []
        for m in self.totals:
            rate, left = self.rate(m), (self.totals[m] - self.done[m]) * self.chunk_tokens
            eta = "done" if left <= 0 else f"ETA {left / rate:,.0f}s" if rate else "ETA unknown (no batch finished yet)"
            speed = f"{rate:,.0f} tok/s" if rate else "- tok/s"
            out.append(f"[capture] {m}: {self.done[m]}/{self.totals[m]} chunks, {speed}, {eta}")
        return out


def start_workers(plan: Plan, store: Store, shares: dict[str, list[float]]) -> ReplicaSet:
    """``shares[model]``: one ModelWorker actor per entry, holding that GPU share (0: CPU). Each is
    restarted (and its in-flight batch retried) if its process dies; after its restarts it is dropped
    and its model's other replicas take over (jobs/dispatch.py). Each reads its batches' token ids
    from the corpus table (``CorpusReader``).
    """
    cfg = plan.cfg
    options = actor_resources(cfg, len(plan.models))
    n_actors = sum(map(len, shares.values()))
    threads = max(1, int(ray.cluster_resources().get("CPU", 1) // n_actors))  # actors reserve no CPU: do not oversubscribe
    actor = ray.remote(max_restarts=4, max_task_retries=4)(ModelWorker)
    reader = CorpusReader(store.uri, plan.corpus.chunk_tokens, plan.corpus.shard_chunks)
    worker_cfg = WorkerConfig.of(cfg)
    # Largest model first, so Ray places its replicas first (the order jobs/replicas.placement assumes).
    order = sorted(plan.models, key=lambda m: -m.n_params)
    actors = {
        m.name: [actor.options(**{**options, "num_gpus": share}, resources=cfg.actor_resources.get(m.name) or None).remote(
            m, worker_cfg, store.uri, reader, plan.parts, threads, share) for share in shares[m.name]]
        for m in order
    }
    return ReplicaSet({m.name: actors[m.name] for m in plan.models}, plan.n_chunks)


def wait_loaded(workers: ReplicaSet, every: float = EVERY_S) -> None:
    """Show model loading: actors ready of all, and the first one still loading. An actor that dies while
    loading is left to the dispatch loop (its model's other replicas take over, or the run fails there)."""
    pending = {a.ready.remote(): f"{m} replica {i}" for m, actors in workers.actors.items() for i, a in enumerate(actors)}
    loading = lambda: f"loading {next(iter(pending.values()))}"  # noqa: E731
    with StageBar("capture", "models loaded", len(pending), "actors", every=every, postfix=loading()) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            pending.pop(ready[0])
            try:
                ray.get(ready[0])
            except Exception as e:
                if not died_for_good(e):
                    raise
            bar.set_postfix_str(loading() if pending else "", refresh=False)
            bar.update(1)


def run_capture(plan: Plan, store: Store, workers: ReplicaSet, only: dict | None = None) -> dict:
    """Stream batches to every model's replicas (one queue per model, at most ``max_in_flight`` per
    actor; jobs/dispatch.py); skip finished parts on --resume. ``only``: the batches to (re)compute per model."""
    batches = plan.batches()
    todo, skipped = {}, {}
    for m in plan.models:
        if only is not None:
            todo[m.name], skipped[m.name] = list(only.get(m.name, [])), 0
            continue
        # On --resume every shard a marker claims is verified: a damaged or missing shard's batch is recomputed.
        done = store.verified_parts(f"_progress/model={m.name}") if plan.cfg.resume else set()
        todo[m.name] = [b for b in batches if part_name(b) not in done]
        skipped[m.name] = len(batches) - len(todo[m.name])
        if skipped[m.name]:
            log(f"[capture] {m.name}: {skipped[m.name]} of {len(batches)} batches already written, skipped")
    needed = collections.Counter(part_name(b) for batches in todo.values() for b in batches)  # models still to get each batch
    progress = Progress({m: plan.n_chunks for m in todo}, {m: plan.n_chunks - sum(len(b) for b in todo[m]) for m in todo},
                        plan.cfg.chunk_tokens)
    progress.tick()  # shown before the first batch returns
    refs: dict[str, ray.ObjectRef] = {}

    def payload(chunk_ids: np.ndarray) -> ray.ObjectRef:
        part = part_name(chunk_ids)
        if part not in refs:
            refs[part] = ray.put(np.asarray(chunk_ids, np.int64))
        return refs[part]

    def done(model: str, chunk_ids: np.ndarray, result: dict) -> None:
        part = part_name(chunk_ids)
        needed[part] -= 1
        if needed[part] == 0:
            del refs[part]  # the batch object is freed once every model has it
        progress.update(model, len(chunk_ids), result["tokens"], result["seconds"])

    dispatch(workers, todo, payload, done, plan.cfg.max_in_flight, log, tick=progress.tick)
    workers.flush(log)
    return {m: skipped[m] for m in skipped}


def missing_parts(plan: Plan, store: Store) -> dict[str, list[np.ndarray]]:
    """Batches without a marker, per model: a write lost with a crashed actor, say."""
    missing = {}
    for m in plan.models:
        done = store.list_parts(f"_progress/model={m.name}", ".json")
        lost = [b for b in plan.batches() if part_name(b) not in done]
        if lost:
            missing[m.name] = lost
    return missing


def capture_until_complete(plan: Plan, store: Store, workers: ReplicaSet, attempts: int = 3) -> dict:
    """Stream every batch, then recompute any batch whose marker is missing, until none is."""
    skipped = run_capture(plan, store, workers)
    for _ in range(attempts):
        missing = missing_parts(plan, store)
        if not missing:
            return skipped
        log(f"[capture] recomputing {sum(map(len, missing.values()))} batches whose shards were lost")
        run_capture(plan, store, workers, only=missing)
    if missing_parts(plan, store):
        raise RuntimeError("some batches could not be written after several attempts; rerun with --resume")
    return skipped
