"""Benchmark: vectorized all-pairs histogram MI vs the notebook's per-pair loop.

    python bench/mi.py [--dims 768] [--tokens 128,1024] [--device cpu] [--pairs 300] [--bins 15] [--threads N] [--layers 13]
                       [--kernel auto|bincount|onehot]

Data: float32 Gaussian "hidden states" where a third of the dims are noisy mixtures of others
(so MI is not all near zero) plus a few heavy-tailed dims. The notebook function runs on a random
subset of pairs and its time is scaled to all d*(d-1)/2 pairs; values are compared on the subset.
Both timings are the best of --repeats runs (the machine may be shared). When other processes load
the cores, torch's 2-thread OpenMP GEMM stalls at every block (~5-10 ms each); --threads 1 (what a
Ray task with num_cpus=1 gets) is then several times faster. ``--layers L`` also times the kernel over L
distinct layers of the largest token count in a row, as the job's MI stage for one model (gpt2: 13
hidden_states, the GPU target). ``--kernel`` forces how a CPU counts joint tables: ``bincount`` (what a
CPU without a fast int8 GEMM runs) or ``onehot`` (one-hot products: int8 where fast, else float32);
``auto`` is the job's choice on this CPU. Ends with one JSON line.
"""
import argparse
import json
import time

import numpy as np
import torch

from probe_core.mutual_info import histogram_mi_matrix, notebook_pair_mi
from jobs.analyses.mi import NULL_PAIRS, histogram_null
from probe_core import mutual_info
from probe_core.mutual_info import bin_codes, bin_edges, histogram_mi_codes


def job_layer(x: np.ndarray, bins: int, device: str):
    """What the job's layer_mi computes: codes, plug-in and Miller-Madow for every pair, the sampled null."""
    codes = bin_codes(x, bin_edges(x.min(0), x.max(0), bins))
    plug, mm = histogram_mi_codes(codes, bins=bins, device=device)
    return plug, mm, histogram_null(codes, bins, seed=0)[2]


def hidden_states(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    mixed = rng.choice(d, size=d // 3, replace=False)
    sources = rng.integers(0, d, size=(d // 3, 2))
    x[:, mixed] = x[:, sources[:, 0]] + 0.5 * x[:, sources[:, 1]] + 0.3 * rng.standard_normal((n, d // 3))
    x[:, : d // 20] = rng.standard_t(2, size=(n, d // 20))  # heavy tails
    return x.astype(np.float32)


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, result


def run_one(n: int, d: int, bins: int, device: str, n_pairs: int, repeats: int) -> dict:
    x = hidden_states(n, d, seed=n)
    histogram_mi_matrix(x[:, : min(d, 64)], bins=bins, device=device)  # warm-up (allocator, kernels)
    t_vec, mat = best_time(lambda: histogram_mi_matrix(x, bins=bins, device=device), repeats)
    rng = np.random.default_rng(1)
    i = rng.integers(0, d, size=n_pairs)
    j = (i + rng.integers(1, d, size=n_pairs)) % d  # j != i
    t_sub, ref = best_time(lambda: np.array([notebook_pair_mi(x[:, a], x[:, b], bins=bins) for a, b in zip(i, j)]),
                           repeats)
    t_pair = t_sub / n_pairs
    all_pairs = d * (d - 1) // 2
    t_loop = t_pair * all_pairs
    diff = float(np.abs(mat[i, j] - ref).max())
    print(f"tokens={n:5d} d={d} pairs={all_pairs}: vectorized {t_vec:.3f} s | notebook {t_pair * 1e6:.1f} us/pair "
          f"-> {t_loop:.1f} s for all pairs (from {n_pairs}) | speedup {t_loop / t_vec:.1f}x | "
          f"max |diff| {diff:.2e} | mean MI {mat[np.triu_indices(d, 1)].mean():.4f} bits")
    return {"seconds_vectorized": t_vec, "seconds_notebook_scaled": t_loop, "ratio": t_loop / t_vec, "diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, default=768)
    ap.add_argument("--tokens", default="128,1024")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--bins", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--layers", type=int, default=1, help="also time this many layers in a row (gpt2: 13)")
    ap.add_argument("--kernel", choices=("auto", "bincount", "onehot"), default="auto",
                    help="CPU joint counts: the job's choice, or force bincount / one-hot products")
    args = ap.parse_args()
    if args.kernel != "auto":
        mutual_info._use_bincount = lambda device, n, force=args.kernel == "bincount": device.type == "cpu" and force
    if args.threads:
        torch.set_num_threads(args.threads)
    kernel = "bincount" if mutual_info._use_bincount(torch.device(args.device), 2**16) else "one-hot"
    if kernel == "one-hot" and args.device == "cpu":
        kernel += " int8" if mutual_info._cpu_int8_gemm_is_fast() else " float32"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, joint counts by {kernel}")
    summary = {"bench": "mi"}
    diffs = []
    for n in (int(t) for t in args.tokens.split(",")):
        r = run_one(n, args.dims, args.bins, args.device, args.pairs, args.repeats)
        summary[f"ratio_{n}"] = round(r["ratio"], 2)
        summary[f"seconds_vectorized_{n}"] = round(r["seconds_vectorized"], 4)
        summary[f"seconds_notebook_scaled_{n}"] = round(r["seconds_notebook_scaled"], 2)
        diffs.append(r["diff"])
    if args.layers > 1:
        n = max(int(t) for t in args.tokens.split(","))
        layers = [hidden_states(n, args.dims, seed=100 + k) for k in range(args.layers)]
        t_layers, out = best_time(lambda: [job_layer(x, args.bins, args.device) for x in layers], args.repeats)
        rng = np.random.default_rng(2)
        i = rng.integers(0, args.dims, size=20)
        j = (i + rng.integers(1, args.dims, size=20)) % args.dims
        layer_diff = max(abs(out[0][0][a, b] - notebook_pair_mi(layers[0][:, a], layers[0][:, b], bins=args.bins)) for a, b in zip(i, j))
        diffs.append(float(layer_diff))
        print(f"{args.layers} layers x {n} tokens, every pair + Miller-Madow + null ({NULL_PAIRS} pairs): {t_layers:.1f} s; "
              f"max |diff| vs notebook on 20 pairs of layer 0: {layer_diff:.2e}; null mean layer 0: {out[0][2].mean():.4f} bits")
        summary[f"seconds_{args.layers}_layers_{n}"] = round(t_layers, 4)
    summary.update(max_abs_diff=max(diffs), dims=args.dims, device=args.device, bins=args.bins, pairs=args.pairs,
                   threads=torch.get_num_threads(), kernel=kernel)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
