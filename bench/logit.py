"""Benchmark: batched per-neuron logistic regression vs a loop of statsmodels Logit, same data, same process.

    python bench/logit.py [--neurons 4096 --samples 2000 --device cpu --subset 64 --repeats 3 --threads N]

The batched solver fits every neuron; statsmodels fits a random subset and its time is scaled to all
neurons (its cost per neuron does not depend on the number of neurons). Each side is timed ``repeats``
times and the fastest run counts, so a busy machine penalises neither side. Ends with one JSON line.
"""
import argparse
import json
import os
import time
import warnings

import numpy as np
import statsmodels.api as sm
import torch

from probe_core.neurons import fit_logit_per_neuron


def make_data(n_samples: int, n_neurons: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 activations whose class shift varies by neuron (0 to 1.5 SD), balanced 0/1 labels."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n_samples) < 0.5).astype(np.float64)
    shift = rng.uniform(0.0, 1.5, n_neurons) * rng.choice([-1.0, 1.0], n_neurons)
    scale, offset = rng.uniform(0.2, 3.0, n_neurons), rng.normal(0.0, 2.0, n_neurons)
    x = (rng.standard_normal((n_samples, n_neurons)) + y[:, None] * shift) * scale + offset
    return x.astype(np.float32), y


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def statsmodels_loop(x: np.ndarray, y: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(len(cols), 3) params[1], bse[1], pvalues[1] of one statsmodels Logit per neuron."""
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j in cols:
            res = sm.Logit(y, sm.add_constant(x[:, j].astype(np.float64))).fit(disp=0)
            rows.append((res.params[1], res.bse[1], res.pvalues[1]))
    return np.array(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neurons", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--subset", type=int, default=64, help="neurons fitted by statsmodels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    x, y = make_data(args.samples, args.neurons, args.seed)
    subset = min(args.subset, args.neurons)
    cols = np.sort(np.random.default_rng(args.seed + 1).choice(args.neurons, subset, replace=False))
    fit_logit_per_neuron(x[:, :64], y, device=args.device)  # warm-up: first-call torch overheads
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def batched():
        out = fit_logit_per_neuron(x, y, device=args.device)
        sync()
        return out

    batched_s, fit = best_time(batched, args.repeats)
    sm_s, ref = best_time(lambda: statsmodels_loop(x, y, cols), args.repeats)
    sm_scaled = sm_s * args.neurons / len(cols)
    ours = np.stack([fit["beta"][cols], fit["se"][cols], fit["p"][cols]], axis=1)
    max_rel = float(np.max(np.abs(ours - ref) / np.abs(ref)))

    statuses, counts = np.unique(fit["status"], return_counts=True)
    print(f"data: {args.samples} samples x {args.neurons} neurons, torch threads={torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (2 threads suffer when it is high)")
    print(f"status: {dict(zip(statuses.tolist(), counts.tolist()))}, Newton steps: "
          f"median {np.median(fit['n_iter']):.0f}, max {fit['n_iter'].max()}")
    print(f"batched ({args.device}): {batched_s:.3f} s for all {args.neurons} neurons")
    print(f"statsmodels: {sm_s:.3f} s for {len(cols)} neurons -> {sm_scaled:.3f} s scaled to all")
    print(f"speed-up: {sm_scaled / batched_s:.1f}x, max relative diff (beta, se, p): {max_rel:.2e}")
    print(json.dumps({
        "bench": "logit", "ratio": round(sm_scaled / batched_s, 2), "max_rel_diff": max_rel,
        "neurons": args.neurons, "samples": args.samples, "device": args.device,
        "threads": torch.get_num_threads(), "batched_s": round(batched_s, 4),
        "statsmodels_s_scaled": round(sm_scaled, 4),
    }))


if __name__ == "__main__":
    main()
