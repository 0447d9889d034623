"""Benchmark: memory and time of ``consecutive_steps`` (one layer at a time) against the same metrics
taken on all layers at once, on one batch of stacked hidden states.

    python bench/path_steps.py [--layers 13 --batch 4 --tokens 1024 --width 768] [--variant both|layers|stacked]

Each variant runs in its own subprocess, so its peak RSS above the inputs (``ru_maxrss``) is its own.
Values must be equal (checked in-process on a smaller batch). Ends with one JSON line.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from probe_core.path_length import angle_between, consecutive_steps  # noqa: E402


def all_layers_at_once(hidden: torch.Tensor):
    """The same three metrics with (L, ..., d) temporaries: the formula before the per-layer loop."""
    h = hidden.float()
    step = torch.linalg.vector_norm(h[1:] - h[:-1], dim=-1)
    return step, torch.cumsum(step, dim=0), angle_between(h[:-1], h[1:])


def measure(args, variant: str) -> dict:
    torch.manual_seed(0)
    hidden = torch.randn(args.layers, args.batch, args.tokens, args.width)
    fn = consecutive_steps if variant == "layers" else all_layers_at_once
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = fn(hidden)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    return {"variant": variant, "median_ms": round(1000 * statistics.median(times), 1),
            "extra_peak_mib": round((peak - base) / 1024, 1), "hidden_mib": round(hidden.numel() * 4 / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=13, help="stacked hidden states (n_layer + 1)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variant", default="both", choices=("both", "layers", "stacked"))
    args = ap.parse_args()
    if args.variant != "both":
        print(json.dumps(measure(args, args.variant)))
        return
    flags = [f"--{k}={v}" for k, v in vars(args).items() if k != "variant"]
    res = {}
    for variant in ("layers", "stacked"):
        out = subprocess.run([sys.executable, __file__, *flags, f"--variant={variant}"], check=True, capture_output=True, text=True)
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = res[variant]
        print(f"{variant:8s}: {r['median_ms']:8.1f} ms median, peak +{r['extra_peak_mib']:.0f} MiB over {r['hidden_mib']:.0f} MiB of hidden states")
    torch.manual_seed(1)
    sample = torch.randn(args.layers, 1, 256, args.width)
    diff = max(float((a - b).abs().max()) for a, b in zip(consecutive_steps(sample), all_layers_at_once(sample)))
    print(json.dumps({"bench": "path_steps", "ratio": round(res["stacked"]["median_ms"] / res["layers"]["median_ms"], 2),
                      "peak_mib_layers": res["layers"]["extra_peak_mib"], "peak_mib_stacked": res["stacked"]["extra_peak_mib"],
                      "max_abs_diff": diff, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
