"""The driver of ``probe run``, stage by stage: inputs, Ray (jobs/cluster.py), corpus (Ray Data) and plan,
capture (model actors; jobs/capture.py), statistics (Ray tasks), report."""
import collections
import errno
import os
import time

import ray

from jobs import analyses, capture, cluster
from jobs.analysis import StatsContext
from jobs import corpus as corpus_stage
from jobs.cluster import log
from jobs.config import RunConfig
from jobs.dispatch import ReplicaSet
from jobs.errors import UsageError, innermost_cause, plain_error
from jobs.manifest import Manifest, own_run_id
from jobs.plan import Inputs, Plan, check_free_space, check_inputs, make_plan
from jobs.progress import EVERY_S, StageBar
from jobs.query import make_report
from jobs.store import LEASE, Lease, Store


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


def _run_leased(cfg: RunConfig, inputs: Inputs, store: Store) -> str:
    manifest = Manifest(store, inputs)
    log(inputs.describe())
    local = not (cfg.address or os.environ.get("RAY_ADDRESS"))  # a local instance never grows
    log(f"[plan] cluster: {cluster.start_ray(cfg)}")
    cluster.wait_for_resources(cfg, local)
    manifest.stage("plan", "done")  # the first write: a failure above leaves --out as it was
    stage, plan = "corpus", None
    try:
        plan, shares, task_gpu = corpus_and_plan(inputs, store, manifest, local, fresh=not cfg.resume)
        log(plan.describe())
        stage, t0 = "capture", time.perf_counter()
        workers = capture.start_workers(plan, store, shares)
        per_model = ", ".join(f"{m} x{len(s)}" + (f" ({s[0]:g} GPU each)" if s and s[0] else "") for m, s in shares.items())
        log(f"[capture] {sum(map(len, shares.values()))} model actors ({per_model}), {len(plan.batches())} batches of up to {plan.batch_size} chunks")
        manifest.stage("capture", "running")
        capture.wait_loaded(workers)
        skipped = capture.capture_until_complete(plan, store, workers)
        removed = store.remove_temporaries()  # every batch has returned and flushed: no writer is running
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
        path = ray.get(ray.remote(num_cpus=1)(make_report).remote(store, manifest.data))
        log(f"[report] wrote {path} ({time.perf_counter() - t2:.0f}s)")
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


def corpus_and_plan(inputs: Inputs, store: Store, manifest: Manifest, local: bool, fresh: bool) -> tuple[Plan, dict, float]:
    """The corpus stage, the frozen plan (each analysis's part: its checks that need the tokens, its sample) and the
    replicas' GPU shares: (plan, {model: [share per replica]}, share per statistics task).

    A corpus that turns out unusable (no text, shorter than a chunk, no proper nouns, no target) or
    GPU slots too small for a model are a UsageError; a fresh run then removes what it wrote, so
    --out is as it was."""
    cfg = inputs.cfg
    try:
        t0 = time.perf_counter()
        manifest.stage("corpus", "running")
        corpus = corpus_stage.run_corpus_stage(inputs.source, inputs.tokenizer, inputs.decode, cfg, store, log=log)
        manifest.set_corpus(corpus)
        # Batches are fixed per run (part names depend on them): a resumed run keeps the original size.
        plan = make_plan(inputs, corpus, store, on_gpu=cluster.gpu_shares(cfg, len(inputs.models))[0] > 0,
                         batch_size=manifest.previous.get("batch_size"))
        check_free_space(plan, store)  # the first moment the estimate is known: before any model loads
        shares, task_gpu = cluster.replica_shares(cfg, plan)  # may refuse: GPU slots too small for a model
        if cfg.actor_resources:  # every replica of a pinned model needs the model's resources
            cluster.wait_for_resources(cfg, local, replicas={m: len(s) for m, s in shares.items()})
    except UsageError:
        if fresh:
            store.remove_all()
        raise
    manifest.stage("corpus", "done", time.perf_counter() - t0)
    manifest.data["batch_size"] = plan.batch_size
    return plan, shares, task_gpu


def disk_full_message(e: BaseException, cfg: RunConfig, plan: Plan | None) -> str | None:
    """One line for a run stopped by a full disk (ENOSPC anywhere in the chain), else None."""
    cause = innermost_cause(e)
    if not (isinstance(cause, OSError) and cause.errno == errno.ENOSPC) and "No space left on device" not in str(cause):
        return None
    estimate = f" (the plan estimated ~{sum(plan.disk_estimate().values()) / 2**30:.2f} GiB for the whole run)" if plan else ""
    return (f"no space left on the device of {cfg.out}{estimate}: "
            f"free space, then resume with probe run --resume --run-id {own_run_id(cfg)} --out {cfg.out}")


def run_stats(plan: Plan, store: Store, workers: ReplicaSet, task_gpu: float) -> None:
    """Launch every analysis's statistics tasks for every model at once, then wait for all of them. An analysis's
    ``stats`` returns refs or (label, ref) pairs; a ref's label is then e.g. ``mi gpt2-medium layer 7/24``."""
    ctx = StatsContext(plan, store, workers, {"num_gpus": task_gpu} if task_gpu > 0 else {})
    tasks = []
    for m in plan.models:
        for a in analyses.selected(plan.cfg.analyses):
            items = a.stats(ctx, m) if a.stats else []
            for i, item in enumerate(items):
                what, ref = item if isinstance(item, tuple) else (f"task {i + 1}/{len(items)}", item)
                tasks.append((a.name, f"{a.name} {m.name} {what}", ref))
    wait_stats(tasks)


def wait_stats(tasks: list[tuple[str, str, ray.ObjectRef]], every: float = EVERY_S) -> None:
    """Wait for (analysis, label, ref) tasks, showing tasks done of total per analysis and the slowest still running
    (the earliest launched of those left: tasks start in launch order). The first failure raises."""
    label = {ref: (name, what) for name, what, ref in tasks}
    totals, done = collections.Counter(name for name, _, _ in tasks), collections.Counter()
    pending = [ref for _, _, ref in tasks]

    def status() -> str:
        counts = ", ".join(f"{name} {done[name]}/{n}" for name, n in totals.items())
        return f"{counts}; slowest: {label[pending[0]][1]}" if pending else counts

    with StageBar("stats", "tasks done", len(pending), "tasks", every=every, postfix=status()) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
            done[label[ready[0]][0]] += 1
            bar.set_postfix_str(status(), refresh=False)
            bar.update(1)
