"""Benchmark: driver memory and tokenizing speed of the corpus stage vs today's single-process planning.

    python bench/corpus_scale.py [--repeats 1,10,100] [--workers 1,2] [--capture 1,10]

The corpus is the WikiText-2 raw test split repeated N times in one temporary file. For each N, each
measurement runs in a fresh process, so its peak RSS (``getrusage``: that process alone) is its own:

- ``single``: what the driver did before the corpus stage (``tests.reference.read_rows`` + ``tokenize_rows``,
  chunks and proper-noun labels in the driver), timed from reading to labels.
- ``stage-W``: the corpus stage on a local Ray instance of W CPUs with at most W tokenize tasks
  (``run_corpus_stage(read_tasks=W)``): wall time of the stage (Ray's start excluded) and the driver's
  peak RSS; Ray's workers are other processes and are not in it.
- ``capture`` (only for N in --capture): a whole ``probe run --analyses path`` with the tiny model on
  CPU (``common.py job``), its wall time and driver peak RSS.

Tokens/s are the stream's tokens over the stage's (or single-process) seconds. Reports thread count
(each Ray task runs one tokenizer thread; the single-process tokenizer uses its default threads) and
load. Ends with one JSON line.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, emit, load_average, probe_cli, run_job, save_model_dir, write_repeated_corpus  # noqa: E402


def measure_single(corpus: str) -> dict:
    """In this (fresh) process: today's planning of the stream."""
    sys.path.insert(0, REPO)
    from jobs.models import load_tokenizer
    from probe_core.tokens import chunk_stream, decode_table, proper_noun_labels_from_ids, vocab_flags
    from tests.reference import read_rows, tokenize_rows

    tokenizer = load_tokenizer(os.environ["BENCH_TOKENIZER"])
    decode = decode_table(tokenizer)
    t0 = time.perf_counter()
    stream = tokenize_rows(read_rows(corpus), tokenizer, corpus)
    chunks = chunk_stream(stream.token_ids, 1024)
    proper_noun_labels_from_ids(stream.token_ids, *vocab_flags(decode))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": int(len(stream.token_ids)), "chunks": int(len(chunks))}


def measure_stage(corpus: str, workers: int, out: str) -> dict:
    """In this (fresh) process: the corpus stage on a local Ray instance of ``workers`` CPUs."""
    sys.path.insert(0, REPO)
    import ray

    from jobs import corpus as stage
    from jobs.config import RunConfig
    from jobs.models import load_tokenizer
    from jobs.sources import resolve_source
    from jobs.store import Store
    from probe_core.tokens import decode_table

    tokenizer = load_tokenizer(os.environ["BENCH_TOKENIZER"])
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    cfg = RunConfig(models=("unused",), data=corpus, out=out, chunk_tokens=1024)
    t0 = time.perf_counter()
    source = resolve_source(corpus)
    index = stage.run_corpus_stage(source, tokenizer, decode_table(tokenizer), cfg, Store(out), read_tasks=workers,
                                   log=lambda m: None)
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return {"seconds": seconds, "tokens": index.stream_tokens, "chunks": index.n_chunks, "units": len(source.units),
            "shards": index.n_shards}


def child(kind: str, corpus: str, workers: int, out: str) -> dict:
    """Run one measurement in a fresh interpreter; returns its figures with its peak RSS."""
    code = (f"import json, resource, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import corpus_scale as b; r = b.measure_{kind}({corpus!r}{', ' + str(workers) + ', ' + repr(out) if kind == 'stage' else ''}); "
            "r['driver_peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1); print('RESULT' + json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT"):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", default="1,10,100", help="copies of the WikiText-2 test split")
    p.add_argument("--workers", default="1,2", help="Ray CPUs (and tokenize tasks at once) for the corpus stage")
    p.add_argument("--capture", default="1", help="repeats for which a whole `probe run --analyses path` also runs")
    p.add_argument("--keep", help="folder for the runs (default: a temporary folder, removed)")
    args = p.parse_args()
    repeats = [int(x) for x in args.repeats.split(",")]
    workers = [int(x) for x in args.workers.split(",")]
    capture = [int(x) for x in args.capture.split(",") if x]
    root = args.keep or tempfile.mkdtemp(prefix="corpus-scale-")
    os.makedirs(root, exist_ok=True)
    model = save_model_dir("tiny", os.path.join(root, "models"))
    os.environ["BENCH_TOKENIZER"] = model
    print(f"corpus_scale: load {load_average()}, {os.cpu_count()} CPUs; tokenize tasks run one thread each", flush=True)
    rows = []
    try:
        for n in repeats:
            corpus = os.path.join(root, f"wiki-x{n}.raw")
            size = write_repeated_corpus(corpus, n)
            row = {"repeat": n, "bytes": size, "load_start": load_average()}
            row["single"] = child("single", corpus, 0, "")
            for w in workers:
                out = os.path.join(root, f"stage-x{n}-w{w}")
                row[f"stage_{w}"] = child("stage", corpus, w, out)
                shutil.rmtree(out, ignore_errors=True)
            if n in capture:
                out = os.path.join(root, f"run-x{n}")
                cli = ["run", "--models", model, "--data", corpus, "--out", out, "--analyses", "path", "--device", "cpu"]
                r = run_job(cli, os.path.join(root, f"run-x{n}.json"), log_path=os.path.join(root, f"run-x{n}.log"))
                row["capture"] = {"wall_s": r["wall_s"], "stages_s": r["stages_s"], "driver_peak_rss_mb": r["driver_peak_rss_mb"],
                                  "tokens": r["tokens"], "command": probe_cli(cli)}
                shutil.rmtree(out, ignore_errors=True)
            row["load_end"] = load_average()
            os.remove(corpus)
            tok = row["single"]["tokens"]
            parts = [f"single {row['single']['seconds']:.1f}s ({tok / row['single']['seconds'] / 1e6:.2f} M tok/s, "
                     f"RSS {row['single']['driver_peak_rss_mb']:.0f} MiB)"]
            for w in workers:
                s = row[f"stage_{w}"]
                parts.append(f"stage {w}w {s['seconds']:.1f}s ({s['tokens'] / s['seconds'] / 1e6:.2f} M tok/s, "
                             f"driver RSS {s['driver_peak_rss_mb']:.0f} MiB, {s['units']} units, {s['shards']} shards)")
            if "capture" in row:
                parts.append(f"probe run path {row['capture']['wall_s']:.1f}s (driver RSS {row['capture']['driver_peak_rss_mb']:.0f} MiB)")
            print(f"  x{n}: {tok:,} tokens | " + " | ".join(parts) + f" | load {row['load_start']}-{row['load_end']}", flush=True)
            rows.append(row)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    first, last = rows[0], rows[-1]
    growth = {f"stage_{w}": round(last[f"stage_{w}"]["driver_peak_rss_mb"] - first[f"stage_{w}"]["driver_peak_rss_mb"], 1) for w in workers}
    growth["single"] = round(last["single"]["driver_peak_rss_mb"] - first["single"]["driver_peak_rss_mb"], 1)
    print(f"driver peak RSS growth x{first['repeat']} -> x{last['repeat']} (MiB): {growth} (target: stage <= 64)")
    emit({"rss_growth_mb": growth,
          "tokens_per_s": {f"x{r['repeat']}": {k: round(r[k]["tokens"] / r[k]["seconds"]) for k in r if k == "single" or k.startswith("stage_")}
                           for r in rows},
          "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
