"""The driver of ``probe run``: inputs, corpus stage (Ray Data), plan, capture (Ray actors: replicas of each model),
statistics (Ray tasks), report."""
import math
import os
import signal
import threading
import time

import numpy as np
import ray

from jobs import analyses
from jobs.analyses.base import StatsContext
from jobs import corpus as corpus_stage
from jobs.config import RunConfig
from jobs.errors import UsageError
from jobs.dispatch import ReplicaSet, dispatch
from jobs.manifest import Manifest
from jobs.plan import Inputs, Plan, check_inputs, make_plan
from jobs.store import LEASE, Lease, Store
from jobs.query import make_report
from jobs.worker import ModelWorker, WorkerConfig, part_name


def log(message: str) -> None:
    print(message, flush=True)


CONNECT_TIMEOUT_S = 30.0


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """For a host:port address, a TCP connect to the GCS port with a timeout: Ray itself retries for minutes."""
    import socket

    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise UsageError(f"--address {address}: no Ray cluster answers there ({e}); check the head node's address and port") from None


def start_ray(cfg: RunConfig) -> str:
    """Connect to --address (or RAY_ADDRESS), else start a private local instance; returns which, in words."""
    if ray.is_initialized():
        return "the Ray instance already initialised in this process"
    # ray.init installs a C++ failure handler for SIGTERM that dumps a stack and aborts; the caller's
    # Python handler (probe run: stop cleanly, exit 143) is put back once Ray has started.
    handler = signal.getsignal(signal.SIGTERM)
    try:
        return _init_ray(cfg)
    finally:
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


def _init_ray(cfg: RunConfig) -> str:
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as e:  # e.g. --address auto with no cluster on this machine
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UsageError(f"cannot connect to the Ray cluster at {address} ({first}): start it, or drop --address for a local instance") from None
        return f"the Ray cluster at {address}"
    # A new local instance, never a cluster that `ray start` left on this machine; dashboard on loopback only.
    ray.init(address="local", dashboard_host="127.0.0.1", log_to_driver=True)
    return "a new local Ray instance"


def wanted_resources(cfg: RunConfig, replicas: dict[str, int] | None = None) -> dict[str, float]:
    """Resources some model actor needs that a cluster may lack: a GPU for --device cuda, and the largest
    amount of each --actor-resources name; with ``replicas`` ({model: actors}), what all of a model's
    replicas need together (each replica asks for the model's --actor-resources)."""
    wanted = {"GPU": 1.0} if cfg.device == "cuda" else {}
    for model, extra in cfg.actor_resources.items():
        for name, amount in extra.items():
            wanted[name] = max(wanted.get(name, 0.0), float(amount) * (replicas or {}).get(model, 1))
    return wanted


def wait_for_resources(cfg: RunConfig, local: bool, poll_s: float = 5.0, clock=time.monotonic, sleep=time.sleep,
                       replicas: dict[str, int] | None = None) -> None:
    """Fail with a UsageError instead of waiting forever for resources no node offers.

    Ray queues an actor whose resources no node has until the autoscaler adds such a node, so a
    local instance (which never grows) fails at once; a cluster gets --placement-timeout seconds to
    show them, and the pending resources are printed while it waits.
    """
    def missing() -> dict[str, float]:
        have = ray.cluster_resources()
        return {k: v for k, v in wanted_resources(cfg, replicas).items() if have.get(k, 0.0) < v}

    lack = missing()
    if not lack:
        return
    what = ", ".join(f"{k}: {v:g}" for k, v in sorted(lack.items()))
    if local:
        raise UsageError(f"the local Ray instance offers no {what} (--device cuda / --actor-resources): "
                         "change them, or pass --address of a cluster that has such nodes")
    deadline, last_log = clock() + cfg.placement_timeout, float("-inf")
    while lack and clock() < deadline:
        if clock() - last_log >= 30:
            log(f"[plan] waiting up to {deadline - clock():.0f}s more for the cluster to offer {what}")
            last_log = clock()
        sleep(poll_s)
        lack = missing()
    if lack:
        raise UsageError(f"the cluster offered no {what} within --placement-timeout {cfg.placement_timeout:g}s: "
                         "add such nodes (cluster.yaml), change --device/--actor-resources, or raise --placement-timeout")


def gpu_shares(cfg: RunConfig, n_models: int) -> tuple[float, float]:
    """(GPU per model actor, GPU per statistics task); 0 means CPU.

    Actors stay alive during the statistics stage (the heatmap traces need them), so a GPU slot must
    stay free for the tasks: each GPU is cut into k = ceil((n_models + 1) / gpus) equal slots, an actor
    takes one slot, and a task at most one slot (0.25 at most), which then fits on some GPU.
    With --device cuda a GPU is asked for even when the cluster shows none yet, so an autoscaling
    cluster that starts with zero GPU workers launches them.
    """
    gpus = int(ray.cluster_resources().get("GPU", 0.0))
    if cfg.device == "cpu" or (cfg.device == "auto" and gpus == 0):
        return 0.0, 0.0
    if gpus == 0:
        return 1.0, 0.0
    slot = 1.0 / math.ceil((n_models + 1) / gpus)
    return round(slot, 4), round(min(0.25, slot), 4)


def actor_resources(cfg: RunConfig, n_models: int) -> dict:
    """Ray options per model actor. Actors reserve no CPU: their torch threads are set explicitly,
    and a CPU reservation would starve the statistics tasks that run while they are alive. SPREAD
    spreads them over nodes on a best-effort basis; --actor-resources pins them reliably."""
    return {"num_cpus": 0, "num_gpus": gpu_shares(cfg, n_models)[0], "scheduling_strategy": "SPREAD"}


GPU_MEMORY_FALLBACK = 16 * 2**30  # bytes assumed per GPU when no task can read it: the smallest common data-centre GPU


def gpu_memory_bytes(timeout: float = 120.0) -> float:
    """Total memory of a cluster GPU, read by a tiny task on a sliver of one (GPUs are assumed alike)."""
    def total() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0

    try:
        value = ray.get(ray.remote(num_gpus=0.01, num_cpus=0)(total).remote(), timeout=timeout)
    except ray.exceptions.RayError:
        value = 0
    if not value:
        log(f"[plan] could not read a GPU's memory; assuming {GPU_MEMORY_FALLBACK / 2**30:.0f} GiB")
    return float(value or GPU_MEMORY_FALLBACK)


def replica_shares(cfg: RunConfig, plan: Plan) -> tuple[dict[str, list[float]], float]:
    """({model: [GPU share per replica]}, GPU share per statistics task), from --replicas
    (jobs/replicas.py: the cost rule, the free slot and the memory floor)."""
    from jobs.replicas import parse_replicas, plan_replicas, task_share

    requested = parse_replicas(cfg.replicas)
    gpus = int(ray.cluster_resources().get("GPU", 0.0))
    if gpu_shares(cfg, len(plan.models))[0] == 0:
        return plan_replicas(plan.models, 0, requested), 0.0
    if gpus == 0:  # --device cuda before an autoscaler started GPU workers: a whole GPU per actor, as before
        return {n: [1.0] * len(v) for n, v in plan_replicas(plan.models, 0, requested).items()}, 0.0
    shares = plan_replicas(plan.models, gpus, requested, gpu_memory=gpu_memory_bytes(), dtype=cfg.dtype,
                           chunk_tokens=cfg.chunk_tokens, batch_chunks=plan.batch_size)
    return shares, task_share(shares)


class Progress:
    """Per model: chunks done of total, tokens/s and ETA, printed at most every ``every`` seconds.

    A model's rate runs from its first finished batch (so loading weights does not dilute it) to its
    latest one, and so stops when the model is done; until a second batch is in, it is the worker's
    own compute rate. ``clock`` is injectable for tests.
    """

    def __init__(self, totals: dict[str, int], skipped: dict[str, int], chunk_tokens: int, every: float = 5.0,
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
    needed = {}
    for m in todo:
        for b in todo[m]:
            needed[part_name(b)] = needed.get(part_name(b), 0) + 1
    progress = Progress({m: plan.n_chunks for m in todo}, {m: plan.n_chunks - sum(len(b) for b in todo[m]) for m in todo},
                        plan.cfg.chunk_tokens)
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

    dispatch(workers, todo, payload, done, plan.cfg.max_in_flight, log)
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


def run_stats(plan: Plan, store: Store, workers: ReplicaSet, task_gpu: float) -> None:
    """Launch every analysis's statistics tasks for every model at once, then wait for all of them."""
    ctx = StatsContext(plan, store, workers, {"num_gpus": task_gpu} if task_gpu > 0 else {})
    ray.get([ref for m in plan.models for a in analyses.selected(plan.cfg.analyses) if a.stats for ref in a.stats(ctx, m)])


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
    reader = corpus_stage.CorpusReader(store.uri, plan.corpus.chunk_tokens, plan.corpus.shard_chunks)
    worker_cfg = WorkerConfig.of(cfg)
    # Largest model first, so Ray places its replicas first (the order jobs/replicas.placement assumes).
    order = sorted(plan.models, key=lambda m: -m.n_params)
    actors = {
        m.name: [actor.options(**{**options, "num_gpus": share}, resources=cfg.actor_resources.get(m.name) or None).remote(
            m, worker_cfg, store.uri, reader, plan.parts, threads, share) for share in shares[m.name]]
        for m in order
    }
    return ReplicaSet({m.name: actors[m.name] for m in plan.models}, plan.n_chunks)


def innermost_cause(e: BaseException) -> BaseException:
    """The exception at the bottom of a chain: a Ray task error wraps the worker's own one (``.cause``)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    return e


def disk_full_message(e: BaseException, cfg: RunConfig, plan: Plan | None) -> str | None:
    """One line for a run stopped by a full disk (ENOSPC anywhere in the chain), else None."""
    import errno

    cause = innermost_cause(e)
    if not (isinstance(cause, OSError) and cause.errno == errno.ENOSPC) and "No space left on device" not in str(cause):
        return None
    need = f"~{sum(plan.disk_estimate().values()) / 2**30:.2f} GiB" if plan else "an unknown amount (the corpus was not counted yet)"
    return (f"no space left on the device of {cfg.out} (the plan estimated {need} for the whole run): "
            f"free space, then resume with probe run --resume --run-id {cfg.run_id} --out {cfg.out}")


def plain_error(e: BaseException) -> str:
    """'Type: first line' of the innermost cause: a Ray task error wraps the worker's own exception
    (``.cause``) behind an ANSI-coloured actor repr, which the manifest should not store."""
    import re

    e = innermost_cause(e)
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:500]


def run(cfg: RunConfig) -> str:
    """Run the whole job; returns the run folder. Raises UsageError on bad input before heavy work."""
    log("[plan] checking inputs")
    inputs = check_inputs(cfg)
    store = Store(cfg.out)
    existed = store.exists("")
    started_ray = not ray.is_initialized()
    # Inputs are valid: take the run folder before writing anything (one writer per run folder).
    lease = Lease(store)
    lease.acquire()
    try:
        return _run_leased(cfg, inputs, store)
    except UsageError:
        if not cfg.resume and not existed and store.is_empty_or_missing(ignore=(LEASE,)):
            lease.release()
            store.fs.delete_dir(store.root)  # a new run refused after the lease: --out as it was
        raise
    finally:
        lease.release()
        if started_ray and ray.is_initialized():
            ray.shutdown()  # the instance this run started (or connected to) is not left to the caller


def corpus_and_plan(inputs: Inputs, store: Store, manifest: Manifest, local: bool, fresh: bool) -> tuple[Plan, dict, float]:
    """The corpus stage, the checks that need the tokens, the neuron sample, the frozen plan and the
    replicas' GPU shares: (plan, {model: [share per replica]}, share per statistics task).

    A corpus that turns out unusable (no text, shorter than a chunk, no proper nouns, no target) or
    GPU slots too small for a model are a UsageError; a fresh run then removes what it wrote, so
    --out is as it was."""
    cfg = inputs.cfg
    try:
        t0 = time.perf_counter()
        manifest.stage("corpus", "running")
        corpus = corpus_stage.run_corpus_stage(inputs.source, inputs.tokenizer, inputs.decode, cfg, store, None, log=log)
        manifest.set_corpus(corpus)
        # Batches are fixed per run (part names depend on them): a resumed run keeps the original size.
        plan = make_plan(inputs, corpus, store, on_gpu=gpu_shares(cfg, len(inputs.models))[0] > 0,
                         batch_size=manifest.previous.get("batch_size"))
        shares, task_gpu = replica_shares(cfg, plan)  # may refuse: GPU slots too small for a model
        if cfg.actor_resources:  # every replica of a pinned model needs the model's resources
            wait_for_resources(cfg, local, replicas={m: len(s) for m, s in shares.items()})
    except UsageError:
        if fresh:
            store.remove_all()
        raise
    manifest.stage("corpus", "done", time.perf_counter() - t0)
    manifest.data["batch_size"] = plan.batch_size
    return plan, shares, task_gpu


def _run_leased(cfg: RunConfig, inputs: Inputs, store: Store) -> str:
    manifest = Manifest(store, inputs)
    log(inputs.describe())
    local = not (cfg.address or os.environ.get("RAY_ADDRESS"))  # a local instance never grows
    log(f"[plan] cluster: {start_ray(cfg)}")
    wait_for_resources(cfg, local)
    manifest.stage("plan", "done")  # the first write: a failure above leaves --out as it was
    stage, plan = "corpus", None
    try:
        plan, shares, task_gpu = corpus_and_plan(inputs, store, manifest, local, fresh=not cfg.resume)
        log(plan.describe())
        stage, t0 = "capture", time.perf_counter()
        workers = start_workers(plan, store, shares)
        per_model = ", ".join(f"{m} x{len(s)}" + (f" ({s[0]:g} GPU each)" if s and s[0] else "") for m, s in shares.items())
        log(f"[capture] {sum(map(len, shares.values()))} model actors ({per_model}), {len(plan.batches())} batches of up to {plan.batch_size} chunks")
        manifest.stage("capture", "running")
        skipped = capture_until_complete(plan, store, workers)
        removed = store.remove_temporaries()  # every batch has returned and flushed: no writer runs now
        if removed:
            log(f"[capture] removed {removed} temporaries left by interrupted writers")
        manifest.stage("capture", "done", time.perf_counter() - t0, skipped_batches=skipped)
        stage, t1 = "stats", time.perf_counter()
        log(f"[stats] analyses: {', '.join(a.name for a in analyses.selected(cfg.analyses) if a.stats)}")
        manifest.stage("stats", "running")
        run_stats(plan, store, workers, task_gpu)
        for w in workers.all_actors():
            ray.kill(w)
        manifest.stage("stats", "done", time.perf_counter() - t1)
        stage, t2 = "report", time.perf_counter()
        log("[report] figures and report.html")
        # A task, not the driver: the summaries and figures read whole tables, so their memory grows with the
        # corpus, and the driver's must not (it may be a small head node).
        ray.get(ray.remote(num_cpus=1)(make_report).remote(store, manifest.data))
        manifest.stage("report", "done", time.perf_counter() - t2)
    except UsageError:
        raise
    except BaseException as e:
        # Finished shards stay; the manifest says where the run stopped so --resume can finish it.
        full = disk_full_message(e, cfg, plan)
        try:
            manifest.stage(stage, "failed", error=plain_error(e))
        except OSError:
            if full is None:  # on a full disk the manifest may not be writable either: the line below says why
                raise
        if full is not None:
            raise UsageError(full) from None
        raise
    log(f"done: {cfg.out} (probe query {cfg.out} \"SELECT ...\"; report at {cfg.out}/report.html)")
    return cfg.out
