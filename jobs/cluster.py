"""Ray for the driver: start or join it, wait for the resources the model actors need, and cut GPUs
into shares for the actors and the statistics tasks (``jobs/replicas.py`` holds the pure rules)."""
import math
import os
import signal
import socket
import threading
import time

import ray

from jobs.config import RunConfig
from jobs.errors import UsageError, one_line
from jobs.plan import Plan
from jobs.replicas import parse_replicas, plan_replicas, task_share

CONNECT_TIMEOUT_S = 30.0
GPU_MEMORY_FALLBACK = 16 * 2**30  # bytes assumed per GPU when no task can read it: the smallest common data-centre GPU


def log(message: str) -> None:
    print(message, flush=True)  # flushed: a log file follows the run


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """For a host:port address, a TCP connect to the GCS port with a timeout: Ray itself retries for minutes."""
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
            raise UsageError(f"cannot connect to the Ray cluster at {address} ({one_line(e)}): start it, or drop --address for a local instance") from None
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


def gpu_memory_bytes(timeout: float = 120.0) -> float:
    """Total memory of a cluster GPU, read by a tiny task on a sliver of one (GPUs are assumed alike)."""
    def total() -> int:
        import torch  # in the task, on the node whose GPU it reads

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
    requested = parse_replicas(cfg.replicas)
    gpus = int(ray.cluster_resources().get("GPU", 0.0))
    if gpu_shares(cfg, len(plan.models))[0] == 0:
        return plan_replicas(plan.models, 0, requested), 0.0
    if gpus == 0:  # --device cuda before an autoscaler started GPU workers: a whole GPU per actor, as gpu_shares asks
        return {n: [1.0] * len(v) for n, v in plan_replicas(plan.models, 0, requested).items()}, 0.0
    shares = plan_replicas(plan.models, gpus, requested, gpu_memory=gpu_memory_bytes(), dtype=cfg.dtype,
                           chunk_tokens=cfg.chunk_tokens, batch_chunks=plan.batch_size)
    return shares, task_share(shares)
