"""Benchmark: model replicas (``--replicas``).

    python bench/replicas.py [--size w256] [--chunks 64] [--chunk-tokens 512] [--batch-size 2] [--repeats 2]

(a) The GPU assignment of ``--replicas auto`` (jobs/replicas.py) for 1, 2, 4 and 8 GPUs of 80 GB
    (H100-like) and the four GPT-2 sizes with their real shapes (124M/355M/774M/1558M params; n_layer
    12/24/36/48; d 768/1024/1280/1600), at the GPU default batch (8 GiB of stacked float32 hidden states
    for gpt2-xl at 1024 tokens: 26 chunks): per model the replicas and their GPU share, and the
    predicted makespan of the capture stage against one actor per model (today's rule), from the fluid
    cost model, in units of the whole work on one GPU. Pure arithmetic: no GPU is used.
(b) Measured: the capture stage of ``probe run --analyses path`` on a local two-node Ray cluster
    (``ray.cluster_utils.Cluster``, a head and a worker of 1 CPU each) with one random 3-layer GPT-2 of
    width ``--size`` (default w256: d=256, big enough that compute dominates a batch), ``--replicas 1``
    vs ``2`` (interleaved, ``--repeats`` times; each run in a fresh driver process). Torch threads per
    actor follow the driver's rule (cluster CPUs // actors): 2 with one replica, 1 each with two. As a
    reference with equal threads per actor, ``--replicas 1`` also runs on a one-node cluster of 1 CPU
    (1 thread). Besides the capture stage's wall time, the actors' summed per-batch compute seconds
    (progress markers) show how much of a difference is the per-thread speed on a shared machine.
Ends with one JSON line.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CORPUS, REPO, build_tokenizer, emit, load_average, probe_cli, run_job, save_model_dir  # noqa: E402

sys.path.insert(0, REPO)
from jobs import replicas as rp  # noqa: E402

SIZES = [SimpleNamespace(name="gpt2", n_params=124_000_000, n_layer=12, n_embd=768),
         SimpleNamespace(name="gpt2-medium", n_params=355_000_000, n_layer=24, n_embd=1024),
         SimpleNamespace(name="gpt2-large", n_params=774_000_000, n_layer=36, n_embd=1280),
         SimpleNamespace(name="gpt2-xl", n_params=1_558_000_000, n_layer=48, n_embd=1600)]
GPU_MEMORY = 80e9
GPU_BATCH = 26  # auto_batch_size on a GPU for these four at 1024 tokens: 8 GiB // gpt2-xl's 49 x 1024 x 1600 x 4 bytes


def assignment(gpus: int) -> dict:
    shares = rp.plan_replicas(SIZES, gpus, "auto", gpu_memory=GPU_MEMORY, dtype="float32", chunk_tokens=1024, batch_chunks=GPU_BATCH)
    costs = {m.name: float(m.n_params) for m in SIZES}
    total = sum(costs.values())
    counts = {n: len(v) for n, v in shares.items()}
    one = {n: 1 for n in costs}
    base = rp.predicted_makespan(costs, one, gpus) / total
    new = rp.predicted_makespan(costs, counts, gpus) / total
    slot = next(iter(shares.values()))[0]
    need = {m.name: rp.memory_need(m, "float32", 1024, GPU_BATCH) / 2**30 for m in SIZES}
    print(f"  {gpus} GPU(s): slot {slot:g} GPU ({slot * GPU_MEMORY / 2**30:.1f} GiB), {sum(counts.values())} actors + 1 free slot; "
          f"predicted makespan {new:.3f} vs {base:.3f} with one actor per model ({base / new:.2f}x); ideal {1 / gpus:.3f}", flush=True)
    for m in SIZES:
        print(f"      {m.name:12s} {counts[m.name]:2d} x {slot:g} GPU  (floor {need[m.name]:.1f} GiB)", flush=True)
    return {"replicas": counts, "share": slot, "task_share": rp.task_share(shares), "makespan": round(new, 4),
            "makespan_one_per_model": round(base, 4), "speedup": round(base / new, 3)}


def local_cluster(nodes: int):
    """``nodes`` nodes of 1 CPU each (a head and workers), private RAY_TMPDIR (tests/raycluster.py's RayEnv)."""
    from ray.cluster_utils import Cluster

    from tests.raycluster import RayEnv

    env = RayEnv()
    with env.applied():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
    return env, cluster


def measured(args, root: str) -> dict:
    tokenizer = build_tokenizer()
    model = save_model_dir(args.size, os.path.join(root, "models"), tokenizer=tokenizer)
    variants = {"1": (2, 1, 2), "2": (2, 2, 1), "1_one_node_1_thread": (1, 1, 1)}  # name: (nodes, replicas, threads)
    runs = {name: [] for name in variants}
    commands = {}
    tokens = args.chunks * args.chunk_tokens
    for nodes in (2, 1):
        env, cluster = local_cluster(nodes)
        try:
            for rep in range(args.repeats if nodes == 2 else 1):
                for name, (n_nodes, n, threads) in variants.items():
                    if n_nodes != nodes:
                        continue
                    out = os.path.join(root, f"run-{name}-{rep}")
                    cli = ["run", "--models", model, "--data", CORPUS, "--out", out, "--analyses", "path", "--device", "cpu",
                           "--chunk-tokens", str(args.chunk_tokens), "--max-tokens", str(tokens),
                           "--batch-size", str(args.batch_size), "--replicas", str(n), "--address", cluster.address]
                    load = load_average()
                    r = run_job(cli, os.path.join(root, f"{name}-{rep}.json"), os.path.join(root, f"{name}-{rep}.log"), env=env.env)
                    compute = sum(b["seconds"] for b in r["actor_compute_s"].values())
                    runs[name].append({"capture_s": r["stages_s"]["capture"], "wall_s": r["wall_s"], "actor_compute_s": round(compute, 3),
                                       "load_before": load, "load_after": load_average()})
                    commands[name] = probe_cli([c if c != cluster.address else "ADDRESS" for c in cli])
                    print(f"  {nodes} node(s), --replicas {n}, {threads} torch thread(s) per actor: capture {r['stages_s']['capture']:.2f}s, "
                          f"actors' summed batch compute {compute:.2f}s, whole run {r['wall_s']:.1f}s, load {load} -> {load_average()}", flush=True)
        finally:
            with env.applied():
                cluster.shutdown()
            env.stop()
    med = {name: statistics.median(x["capture_s"] for x in v) for name, v in runs.items()}
    print(f"  capture, median: --replicas 1 {med['1']:.2f}s ({tokens / med['1']:,.0f} tok/s), --replicas 2 {med['2']:.2f}s "
          f"({tokens / med['2']:,.0f} tok/s): {med['1'] / med['2']:.2f}x; one node, one actor, 1 thread: {med['1_one_node_1_thread']:.2f}s "
          f"({med['1_one_node_1_thread'] / med['2']:.2f}x of --replicas 2)", flush=True)
    return {"size": args.size, "tokens": tokens, "threads": {k: v[2] for k, v in variants.items()},
            "capture_s": {k: round(v, 3) for k, v in med.items()}, "speedup": round(med["1"] / med["2"], 3),
            "speedup_vs_1_thread": round(med["1_one_node_1_thread"] / med["2"], 3), "runs": runs, "commands": commands}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="w256", help="wN: a random 3-layer GPT-2 of width N (bench/common.py)")
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-measured", action="store_true", help="only the GPU assignment (a)")
    p.add_argument("--keep", default=None, help="keep models, runs and logs in this folder")
    args = p.parse_args(argv)
    print(f"replicas: load average {load_average()}", flush=True)
    print("(a) --replicas auto on 80 GB GPUs, gpt2/medium/large/xl (makespan in units of the whole work on one GPU):", flush=True)
    result = {"bench": "replicas", "gpu_assignment": {str(g): assignment(g) for g in (1, 2, 4, 8)}}
    if not args.skip_measured:
        root = args.keep or tempfile.mkdtemp(prefix="bench-replicas-")
        os.makedirs(root, exist_ok=True)
        print(f"(b) measured capture on a two-node CPU cluster (1 CPU each), {args.size}, {args.chunks} chunks of {args.chunk_tokens}:", flush=True)
        try:
            result["measured"] = measured(args, root)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    result["load_avg_1m_end"] = load_average()
    emit({k: v for k, v in result.items()} | {"measured": {k: v for k, v in result.get("measured", {}).items() if k not in ("runs", "commands")}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
