"""Model replicas: how many actors each model gets and the GPU share each holds; pure (no Ray).

Cost model. Every model sees the same tokens, so a model's forward cost is proportional to its
``n_params`` (the driver's unit: one GPU-second per unit of cost). Each GPU is a work-conserving
processor shared equally, in time slices, by the busy actors placed on it; the replicas of a model
drain one shared queue, so the model's rate is the sum of its replicas' rates. ``predicted_makespan``
simulates this fluid model (no batch granularity, no start-up, no transfer costs).

GPU rule (``--replicas auto`` on GPUs). Every actor gets the same share 1/k of a GPU (a uniform slot:
Ray may then place any actor in any free slot without fragmenting GPUs), and one slot of the cluster
stays free for the statistics tasks, which run while the actors are alive. The G*k - 1 actor slots go
to the models in proportion to their cost (D'Hondt: each next slot to the model with the largest cost
per replica, every model at least one). k runs from ``gpu_shares``' ``ceil((models + 1) / G)`` up to
the largest k whose slot still holds the memory floor of every model (``memory_need`` at the run's batch
size), at most ``MAX_ACTORS_PER_GPU``; the smallest k whose predicted makespan is within
``MAKESPAN_TOLERANCE`` (5%) of the best k's wins: every extra actor costs a process, a CUDA context,
a copy of the weights and their loading time, which the fluid model leaves out.
A share is also the actor's memory cap (``torch.cuda.set_per_process_memory_fraction``), so no slot
is ever smaller than its model's floor for one chunk (below that the actor could not run at all).
"""
import json
import math
from collections.abc import Sequence

import numpy as np

from jobs.errors import UsageError

AUTO = "auto"
GiB = 2**30
OVERHEAD_BYTES = 1 * GiB  # per actor: CUDA context, caching-allocator slack, kernels' workspaces
MAX_ACTORS_PER_GPU = 8
MAKESPAN_TOLERANCE = 0.05
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
FORMS = 'auto, a positive integer (actors per model), or JSON such as {"gpt2-xl": 3, "gpt2": 1}'


def parse_replicas(text: str) -> str | int | dict[str, int]:
    """``--replicas`` text -> "auto", N (every model), or {model: N} (models not named get 1)."""
    value = text.strip()
    if value == AUTO:
        return AUTO
    if value.isdigit():
        if int(value) < 1:
            raise UsageError(f"--replicas must be {FORMS}; got {text!r}")
        return int(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        raise UsageError(f"--replicas must be {FORMS}; got {text!r}") from None
    if not isinstance(parsed, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1 for k, v in parsed.items()):
        raise UsageError(f"--replicas JSON must map model names to integers >= 1, e.g. {{\"gpt2-xl\": 3}}; got {text!r}")
    return parsed


def requested_counts(names: Sequence[str], requested: str | int | dict) -> dict[str, int] | None:
    """Replicas per model for N or JSON, None for auto. JSON names must be among ``names``."""
    if requested == AUTO:
        return None
    if isinstance(requested, int):
        return {n: requested for n in names}
    unknown = sorted(set(requested) - set(names))
    if unknown:
        raise UsageError(f"--replicas names {unknown}, which are not among the models {list(names)}")
    return {n: requested.get(n, 1) for n in names}


def memory_need(model, dtype: str, chunk_tokens: int, batch_chunks: int) -> int:
    """Bytes one actor of ``model`` (n_params, n_layer, n_embd) needs on its GPU for batches of
    ``batch_chunks`` chunks: weights in ``dtype``, plus the batch's stacked hidden states
    (n_layer + 1, B, T, d) in float32 (what ``auto_batch_size`` budgets: they dominate an actor's
    activations; the per-layer transients are freed layer by layer), plus OVERHEAD_BYTES."""
    weights = model.n_params * ITEMSIZE[dtype]
    hidden = (model.n_layer + 1) * batch_chunks * chunk_tokens * model.n_embd * 4
    return int(weights + hidden + OVERHEAD_BYTES)


def dhondt(costs: dict[str, float], slots: int) -> dict[str, int]:
    """Split ``slots`` (>= len(costs)) among models in proportion to cost: one each, then each next
    slot to the model with the largest cost per replica (minimises the largest cost per replica)."""
    counts = {m: 1 for m in costs}
    for _ in range(slots - len(costs)):
        m = max(costs, key=lambda name: (costs[name] / counts[name], name))
        counts[m] += 1
    return counts


def placement(costs: dict[str, float], counts: dict[str, int], n_gpus: int) -> list[tuple[str, int]]:
    """(model, gpu) per actor, in the order the driver creates them: largest model first, dealt
    round-robin over the GPUs (how the cost model assumes Ray spreads equal slots)."""
    order = [m for m in sorted(costs, key=lambda name: (-costs[name], name)) for _ in range(counts[m])]
    return [(m, i % n_gpus) for i, m in enumerate(order)]


def predicted_makespan(costs: dict[str, float], counts: dict[str, int], n_gpus: int) -> float:
    """Time until every model is done, in GPU-seconds per unit of cost (one model alone on one GPU
    takes ``cost``), under the fluid model of the module docstring: each GPU splits its time equally
    among the busy actors on it; a model finishes when its shared queue is drained."""
    actors = placement(costs, counts, n_gpus)
    left = {m: float(c) for m, c in costs.items() if c > 0}
    t = 0.0
    while left:
        busy = np.zeros(n_gpus)
        for m, g in actors:
            busy[g] += m in left
        rate = {m: 0.0 for m in left}
        for m, g in actors:
            if m in left:
                rate[m] += 1.0 / busy[g]
        dt = min(left[m] / rate[m] for m in left)
        t += dt
        left = {m: w - dt * rate[m] for m, w in left.items() if w - dt * rate[m] > 1e-9 * costs[m]}
    return t


def plan_replicas(models: Sequence, n_gpus: int, requested: str | int | dict, *, gpu_memory: float = 80e9,
                  dtype: str = "float32", chunk_tokens: int = 1024, batch_chunks: int = 1) -> dict[str, list[float]]:
    """{model name: [GPU share of each replica]}; share 0.0 means a CPU actor.

    models: objects with name, n_params, n_layer, n_embd (ModelSpec). n_gpus: GPUs of the cluster
    (0: CPU actors; ``auto`` then means one actor per model). gpu_memory: bytes of one GPU.
    Raises UsageError when even one chunk of some model does not fit its slot.
    """
    names = [m.name for m in models]
    counts = requested_counts(names, requested)
    if n_gpus <= 0:
        return {n: [0.0] * (counts[n] if counts else 1) for n in names}
    costs = {m.name: float(m.n_params) for m in models}
    floor_one = {m.name: memory_need(m, dtype, chunk_tokens, 1) for m in models}
    floor_batch = max(memory_need(m, dtype, chunk_tokens, batch_chunks) for m in models)
    if counts is not None:
        k = math.ceil((sum(counts.values()) + 1) / n_gpus)  # gpu_shares' rule, over actors instead of models
    else:
        k_min = math.ceil((len(models) + 1) / n_gpus)
        k_max = max(k_min, min(MAX_ACTORS_PER_GPU, int(gpu_memory // floor_batch)))
        options = [(k_try, dhondt(costs, n_gpus * k_try - 1)) for k_try in range(k_min, k_max + 1)]
        spans = [predicted_makespan(costs, c, n_gpus) for _, c in options]
        k, counts = next(o for o, s in zip(options, spans) if s <= min(spans) * (1 + MAKESPAN_TOLERANCE))
    slot = 1.0 / k
    short = [n for n in names if slot * gpu_memory < floor_one[n]]
    if short:
        n = max(short, key=floor_one.get)
        raise UsageError(f"{sum(counts.values())} model actors on {n_gpus} GPU(s) of {gpu_memory / GiB:.0f} GiB leave "
                         f"{slot * gpu_memory / GiB:.1f} GiB each, below the ~{floor_one[n] / GiB:.1f} GiB {n} needs "
                         f"for one chunk: use fewer --replicas or --models, or more GPUs")
    return {n: [round(slot, 4)] * counts[n] for n in names}


def task_share(shares: dict[str, list[float]]) -> float:
    """GPU share of a statistics task: one slot (the free one), at most a quarter GPU; 0 on CPU."""
    slot = min((s for v in shares.values() for s in v), default=0.0)
    return round(min(0.25, slot), 4) if slot > 0 else 0.0


def split_by_owner(owner: np.ndarray, live: Sequence[int]) -> dict[int, np.ndarray]:
    """Which replica supplies each sample key's pre-activations.

    owner: (n,) replica index that computed each key's batch in this run, -1 where none did (a
    resumed run). live: indices of replicas still alive, first = "replica 0". Keys of dead or unknown
    owners go to live[0] (it recomputes them). Returns {replica: positions (k,) into the keys}, only
    replicas with keys, live[0] always (so n = 0 still asks one replica).
    """
    owner = np.asarray(owner)
    owner = np.where(np.isin(owner, np.asarray(live)), owner, live[0])
    out = {r: np.flatnonzero(owner == r) for r in live}
    return {r: p for r, p in out.items() if len(p) or r == live[0]}


def gather_rows(positions: Sequence[np.ndarray], blocks: Sequence[np.ndarray]) -> np.ndarray:
    """Put replicas' blocks back in key order: block j (k_j, ...) holds the rows at ``positions[j]``;
    the positions together must be a permutation of 0..n-1. Returns (n, ...)."""
    flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in positions])
    n = len(flat)
    if not np.array_equal(np.sort(flat), np.arange(n)):
        raise ValueError("replica positions do not cover every sample key exactly once")
    first = np.asarray(blocks[0])
    out = np.empty((n,) + first.shape[1:], dtype=first.dtype)
    for p, b in zip(positions, blocks):
        out[np.asarray(p, dtype=np.int64)] = b
    return out
