"""Benchmark: how the job's time and the driver's memory scale with corpus tokens and model width.

    python bench/scaling.py [--tokens 131072,262144,524288] [--widths tiny,w128] [--device cpu]
                            [--analyses path,rotation,neurons,mi,attn_ar] [--chunk-tokens 1024]

Every (width, tokens) pair is one ``probe run`` over the first N tokens of a temporary corpus (the
WikiText-2 test split repeated as often as N needs) in a fresh driver process (``common.py job``), so
its peak RSS (``getrusage``, the driver alone) is its own.
Widths are 3-layer tiny GPT-2s: ``tiny`` (d=32) and ``wN`` (d=N, d_mlp=2N). Reported per width:

- log-log slopes of time vs tokens for the whole run, the capture stage, the actors' compute
  time (``ModelWorker.__call__`` less its background writes, summed over batches) and that time less the first batch (a fresh actor's
  warm-up): ~1 means linear; fixed costs (Ray start-up, actor start, the report) pull the whole-run
  slope below 1 while N is small, so also
- a linear fit ``time = fixed + per_token * N`` of the whole run (fixed seconds, microseconds/token);
- the driver's peak RSS per run and its growth from the smallest to the largest N (should be flat).

Across widths at the largest N: the log-log slope of actor time vs non-embedding parameters.
Ends with one JSON line.
"""
import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_tokenizer, emit, gpt2_config, load_average, parse_sizes, probe_cli, run_job, save_model_dir, slope, write_repeated_corpus  # noqa: E402

TOKENS_PER_COPY = 283_287  # GPT-2 BPE tokens of the WikiText-2 raw test split, as the job tokenizes it


def one_run(model_dir: str, corpus: str, tokens: int, root: str, label: str, args) -> dict:
    out = os.path.join(root, f"run-{label}")
    cli = ["run", "--models", model_dir, "--data", corpus, "--out", out, "--device", args.device,
           "--max-tokens", str(tokens), "--chunk-tokens", str(args.chunk_tokens), "--analyses", args.analyses]
    r = run_job(cli, os.path.join(root, f"{label}.json"), log_path=os.path.join(root, f"{label}.log"))
    busy = sum(b["seconds"] for b in r["actor_compute_s"].values())
    steady = busy - sum(b["first_batch_s"] for b in r["actor_compute_s"].values())
    print(f"  {label:>14}: total {r['wall_s']:6.1f}s | capture {r['stages_s']['capture']:5.1f}s | actor compute {busy:5.1f}s "
          f"(after 1st batch {steady:5.1f}s) | stats {r['stages_s'].get('stats', 0):5.1f}s | report {r['stages_s'].get('report', 0):4.1f}s | "
          f"driver peak RSS {r['driver_peak_rss_mb']:6.0f} MiB", flush=True)
    return {"tokens": r["tokens"], "wall_s": r["wall_s"], "capture_s": r["stages_s"]["capture"], "actor_compute_s": round(busy, 3),
            "actor_steady_s": round(steady, 3), "stats_s": r["stages_s"].get("stats"), "report_s": r["stages_s"].get("report"),
            "driver_peak_rss_mb": r["driver_peak_rss_mb"], "command": probe_cli(cli)}


def summarise(runs: list[dict]) -> dict:
    n = [r["tokens"] for r in runs]
    wall = [r["wall_s"] for r in runs]
    per_token, fixed = np.polyfit(n, wall, 1)
    rss = [r["driver_peak_rss_mb"] for r in runs]
    return {
        "slope_wall": round(slope(n, wall), 3),
        "slope_capture": round(slope(n, [r["capture_s"] for r in runs]), 3),
        "slope_actor_compute": round(slope(n, [r["actor_compute_s"] for r in runs]), 3),
        "slope_actor_steady": round(slope(n, [r["actor_steady_s"] for r in runs]), 3),
        "slope_stats": round(slope(n, [r["stats_s"] for r in runs]), 3),
        "fixed_s": round(float(fixed), 2), "us_per_token": round(float(per_token) * 1e6, 2),
        "driver_peak_rss_mb": rss, "rss_growth_mb": round(rss[-1] - rss[0], 1),
        "rss_bytes_per_token": round((rss[-1] - rss[0]) * 2**20 / (n[-1] - n[0]), 1),
    }


def non_embedding_params(size: str) -> int:
    c = gpt2_config(size)
    d_mlp = c.n_inner or 4 * c.n_embd
    return c.n_layer * (4 * c.n_embd**2 + 2 * c.n_embd * d_mlp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="131072,262144,524288", help="comma list of --max-tokens values (1x, 2x, 4x)")
    p.add_argument("--widths", default="tiny,w128", help="comma list of tiny or wN (3 layers, d=N)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--analyses", default="path,rotation,neurons,mi,attn_ar")
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--keep", default=None, help="keep models, runs and logs in this folder")
    args = p.parse_args(argv)
    tokens = sorted(int(t) for t in args.tokens.split(","))
    widths = parse_sizes(args.widths)
    if len(tokens) < 2 or tokens[0] < args.chunk_tokens:
        p.error(f"--tokens needs at least two values, each >= --chunk-tokens {args.chunk_tokens}")
    root = args.keep or tempfile.mkdtemp(prefix="bench-scaling-")
    os.makedirs(root, exist_ok=True)
    print(f"scaling: {args.device}, load average {load_average()}, tokens {tokens}, widths {widths}, analyses {args.analyses}", flush=True)
    results = {}
    try:
        tokenizer = build_tokenizer()
        corpora = {}
        for n in tokens:  # as few copies of the test split (283,287 tokens each) as N needs: tokenizing is per run
            copies = -(-n // TOKENS_PER_COPY)
            corpora[n] = os.path.join(root, f"corpus-x{copies}.raw")
            write_repeated_corpus(corpora[n], copies)
        for width in widths:
            model_dir = save_model_dir(width, os.path.join(root, "models"), tokenizer=tokenizer)
            print(f"{width} (d={gpt2_config(width).n_embd}, {non_embedding_params(width):,} non-embedding params):", flush=True)
            runs = [one_run(model_dir, corpora[n], n, root, f"{width}-{n}", args) for n in tokens]
            results[width] = {"runs": runs, **summarise(runs)}
            s = results[width]
            print(f"  slopes vs tokens: wall {s['slope_wall']:.2f}, capture {s['slope_capture']:.2f}, actor compute {s['slope_actor_compute']:.2f}"
                  f" (after 1st batch {s['slope_actor_steady']:.2f}), stats {s['slope_stats']:.2f} | wall = {s['fixed_s']:.1f}s + "
                  f"{s['us_per_token']:.1f} us/token | driver peak RSS {s['rss_growth_mb']:+.0f} MiB ({s['rss_bytes_per_token']:.0f} B/token)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    summary = {"bench": "scaling", "device": args.device, "tokens": tokens, "analyses": args.analyses,
               "load_avg_1m_end": load_average(), "widths": {w: {k: v for k, v in r.items() if k != "runs"} for w, r in results.items()},
               "runs": {w: [{k: v for k, v in run.items() if k != "command"} for run in r["runs"]] for w, r in results.items()}}
    if len(widths) >= 2:
        params = [non_embedding_params(w) for w in widths]
        summary["slope_actor_compute_vs_params"] = round(slope(params, [results[w]["runs"][-1]["actor_compute_s"] for w in widths]), 3)
        print(f"across widths at {tokens[-1]:,} tokens: slope of actor compute time vs non-embedding params {summary['slope_actor_compute_vs_params']:.2f}")
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
