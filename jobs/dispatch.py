"""The model actors of a run (several replicas per model) and the loop that feeds them batches.

Each model has one queue of batches; every live replica of the model holds at most ``max_in_flight``
of them, and a replica whose batch returns takes the next one of its model's queue. A replica that
dies for good (its restarts spent: Ray raises ``ActorDiedError``) is dropped and its in-flight batches
go back to the front of the queue, for the other replicas; the run fails only when no replica of a
model is left. The driver remembers which replica computed each chunk (``owner``), so the statistics
stage can ask each replica for the neuron samples it holds.
"""
import collections
from collections.abc import Callable

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, RayActorError


def died_for_good(e: BaseException) -> bool:
    """An actor error that no retry will fix: the actor is dead (restarts spent, or killed with
    no_restart). ActorUnavailableError is transient (the actor is restarting)."""
    return isinstance(e, RayActorError) and not isinstance(e, ActorUnavailableError)


class ReplicaSet:
    """actors: {model: [actor handle per replica]}; ``self[model]`` is the model's "replica 0": its
    first live replica (MI, heatmap traces, sentence rotation and resumed samples use it).

    owner[model]: (n_chunks,) int, the replica that last computed each chunk in this run, -1 for none.
    """

    def __init__(self, actors: dict[str, list], n_chunks: int):
        self.actors = actors
        self.alive = {m: [True] * len(a) for m, a in actors.items()}
        self.owner = {m: np.full(n_chunks, -1, np.int64) for m in actors}

    def live(self, model: str) -> list[int]:
        return [i for i, ok in enumerate(self.alive[model]) if ok]

    def __getitem__(self, model: str):
        live = self.live(model)
        if not live:
            raise RuntimeError(f"every replica of {model} has died")
        return self.actors[model][live[0]]

    def all_actors(self) -> list:
        return [a for actors in self.actors.values() for a in actors]

    def mark_dead(self, model: str, replica: int, error: BaseException, log: Callable[[str], None]) -> None:
        if self.alive[model][replica]:
            self.alive[model][replica] = False
            left = len(self.live(model))
            log(f"[capture] {model} replica {replica} died for good ({type(error).__name__}); {left} replica(s) left")
            if not left:
                raise RuntimeError(f"every replica of {model} has died; rerun with --resume") from error

    def flush(self, log: Callable[[str], None]) -> None:
        """Wait for every live replica's outstanding write. A replica that died meanwhile is dropped (a
        write lost with it leaves its batch without a marker: the driver recomputes such batches)."""
        calls = [(m, i, self.actors[m][i].flush.remote()) for m in self.actors for i in self.live(m)]
        for m, i, ref in calls:
            try:
                ray.get(ref)
            except Exception as e:
                if not died_for_good(e):
                    raise
                self.mark_dead(m, i, e, log)


def dispatch(replicas: ReplicaSet, todo: dict[str, list[np.ndarray]], payload: Callable[[np.ndarray], ray.ObjectRef],
             done: Callable[[str, np.ndarray, dict], None], max_in_flight: int, log: Callable[[str], None],
             tick: Callable[[], None] | None = None, tick_s: float = 1.0) -> None:
    """Run every batch of ``todo`` ({model: [chunk ids (B,)]}) on the model's replicas.

    payload(chunk_ids) -> the batch's object ref (the caller shares one object across models);
    done(model, chunk_ids, result) is called once per batch, when a replica returns it;
    tick() at least every ``tick_s`` seconds while batches run (the progress heartbeat).
    """
    queues = {m: collections.deque(batches) for m, batches in todo.items()}
    load = {m: [0] * len(replicas.actors[m]) for m in todo}
    in_flight: dict[ray.ObjectRef, tuple[str, int, np.ndarray]] = {}

    def fill(model: str) -> None:
        """Hand queued batches to the least-loaded live replicas with room."""
        while queues[model]:
            room = [i for i in replicas.live(model) if load[model][i] < max_in_flight]
            if not room:
                return
            i = min(room, key=lambda r: (load[model][r], r))
            chunk_ids = queues[model].popleft()
            in_flight[replicas.actors[model][i].__call__.remote(payload(chunk_ids))] = (model, i, chunk_ids)
            load[model][i] += 1

    for model in todo:
        fill(model)
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=tick_s if tick else None)
        if tick:
            tick()
        if not ready:
            continue
        model, i, chunk_ids = in_flight.pop(ready[0])
        load[model][i] -= 1
        try:
            result = ray.get(ready[0])
        except Exception as e:
            if not died_for_good(e):
                raise
            replicas.mark_dead(model, i, e, log)  # raises when no replica of the model is left
            queues[model].appendleft(chunk_ids)
        else:
            replicas.owner[model][np.asarray(chunk_ids)] = i
            done(model, chunk_ids, result)
        fill(model)
