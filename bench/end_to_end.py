"""Benchmark: the whole job (``probe run``, the default analyses or ``--analyses``) over the WikiText-2 raw test split.

    python bench/end_to_end.py [--sizes tiny] [--device cpu|cuda] [--dtype float32] [--max-tokens N]
                               [--chunk-tokens 1024] [--together] [--analyses LIST] [--keep DIR]

Random GPT-2s of the given sizes are saved to a temporary folder (``save_pretrained`` plus the real
tokenizer); by default each size is its own run so the stage times are per model, and ``--together``
runs all sizes in one job (one actor each, as ``make run`` does). Each run is a fresh driver process
(``common.py job``); the wall time of each stage comes from the run's ``manifest.json`` (``stages`` ->
seconds), ``other`` is the rest of the wall time (tokenizing, Ray start-up, imports). Ends with one
JSON line.
"""
import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CORPUS, build_tokenizer, emit, load_average, parse_sizes, probe_cli, run_job, save_model_dir  # noqa: E402


def job_args(models: list[str], out: str, args) -> list[str]:
    cli = ["run", "--models", ",".join(models), "--data", CORPUS, "--out", out, "--device", args.device,
           "--dtype", args.dtype, "--chunk-tokens", str(args.chunk_tokens)]
    if args.max_tokens:
        cli += ["--max-tokens", str(args.max_tokens)]
    if args.analyses:
        cli += ["--analyses", args.analyses]
    return cli


def run_one(label: str, models: list[str], root: str, args) -> dict:
    out = os.path.join(root, f"run-{label}")
    cli = job_args(models, out, args)
    result = run_job(cli, os.path.join(root, f"{label}.json"), log_path=os.path.join(root, f"{label}.log"))
    stages = result["stages_s"]
    print(f"{label:>12}: {result['tokens']:,} tokens in {result['chunks']} chunks (batch {result['batch_size']}) | "
          + " | ".join(f"{k} {v:.1f}s" for k, v in stages.items())
          + f" | other {result['other_s']:.1f}s | total {result['wall_s']:.1f}s | capture {result['tokens'] / stages['capture']:,.0f} tok/s"
          f" | driver peak RSS {result['driver_peak_rss_mb']:.0f} MiB", flush=True)
    busy = ", ".join(f"{m} {b['seconds']:.1f}s ({result['tokens'] / b['seconds']:,.0f} tok/s; {b['batches']} batches, first {b['first_batch_s']:.2f}s)"
                     for m, b in result["actor_compute_s"].items())
    print(f"{'':>12}  actor compute (ModelWorker.__call__ less its background writes, summed over batches): {busy}", flush=True)
    print(f"{'':>12}  {probe_cli(cli)}", flush=True)
    return {**result, "capture_tok_s": round(result["tokens"] / stages["capture"], 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="comma list of tiny,gpt2,medium,large,xl; default tiny on CPU, all four GPT-2 sizes on CUDA")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--max-tokens", type=int, default=None, help="cap the corpus (default: the whole file)")
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--together", action="store_true", help="one job over all sizes instead of one job per size")
    p.add_argument("--analyses", default=None, help="probe run --analyses (default: the default analyses)")
    p.add_argument("--keep", default=None, help="keep the models, runs and logs in this folder (default: a temporary one)")
    args = p.parse_args(argv)
    sizes = parse_sizes(args.sizes or ("tiny" if args.device == "cpu" else "gpt2,medium,large,xl"))
    root = args.keep or tempfile.mkdtemp(prefix="bench-e2e-")
    os.makedirs(root, exist_ok=True)
    try:
        tokenizer = build_tokenizer()
        models = {s: save_model_dir(s, os.path.join(root, "models"), tokenizer=tokenizer) for s in sizes}
        print(f"end_to_end: {args.device}, {args.dtype}, load average {load_average()}, corpus {CORPUS}"
              f"{f' (first {args.max_tokens:,} tokens)' if args.max_tokens else ''}", flush=True)
        groups = {"+".join(sizes): sizes} if args.together else {s: [s] for s in sizes}
        runs = {label: run_one(label, [models[s] for s in group], root, args) for label, group in groups.items()}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    emit({"bench": "end_to_end", "device": args.device, "dtype": args.dtype, "max_tokens": args.max_tokens, "analyses": args.analyses,
          "chunk_tokens": args.chunk_tokens, "load_avg_1m_end": load_average(), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
