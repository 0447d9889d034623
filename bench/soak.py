"""Soak test: a corpus 10x WikiText-2 test through the tiny model while sampling memory.

    python bench/soak.py [--repeat 10] [--analyses path,attn_ar | --all] [--max-tokens N]
                         [--interval 2] [--device cpu] [--size tiny]

The corpus is a temporary file holding the test split ``--repeat`` times (deleted afterwards, never in
the repo). ``probe run`` runs in a fresh driver process (``common.py job``); a background thread samples,
every ``--interval`` seconds, the driver's RSS and the RSS of that run's ``ray::ModelWorker`` actors (the
driver's descendants whose command line says so, so other Ray instances on the machine are not counted).

Memory is judged over the window in which the actors are alive (capture, then stats), from ``--settle``
seconds after the first actor appears: ``start``/``end`` are the medians of the window's first/last
three samples, ``peak`` the largest; a series is flat when it grows by at most max(32 MiB, 5% of start)
from start to end. ``trend`` is the least-squares slope over the window (MiB/min): on a short window
it says more than the verdict. The driver's peak before the window
(reading and tokenizing the corpus) is reported apart. Ends with one JSON line.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, descendants_matching, emit, job_command, load_average, parse_sizes, probe_cli, rss_parts_mb, save_model_dir, write_repeated_corpus  # noqa: E402

ALL = "path,rotation,neurons,mi,attn_ar"
FLAT_MB, FLAT_FRACTION = 32.0, 0.05  # a series is flat when it grows by at most max(32 MiB, 5% of start)


class Sampler(threading.Thread):
    """Samples the RSS parts of one driver process and of its actors until ``stop`` is set.

    ``samples``: dicts {t, driver: {rss, anon, file, shmem}, actors: [{...} per live actor]} (MiB).
    """

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self.stop.is_set():
            driver = rss_parts_mb(self.pid)
            if driver is None:
                break
            actors = [a for a in (rss_parts_mb(p) for p in descendants_matching(self.pid, "ray::ModelWorker")) if a]
            self.samples.append({"t": round(time.perf_counter() - t0, 2), "driver": driver, "actors": actors})
            self.stop.wait(self.interval)


def series_summary(t: np.ndarray, mib: np.ndarray) -> dict:
    """start/end: medians of the first and last 3 samples (one sample can catch a transient batch)."""
    start, end = float(np.median(mib[:3])), float(np.median(mib[-3:]))
    growth = end - start
    trend = float(np.polyfit(t, mib, 1)[0] * 60) if len(t) >= 3 else float("nan")
    return {"start_mb": round(start, 1), "peak_mb": round(float(mib.max()), 1), "end_mb": round(end, 1),
            "growth_mb": round(growth, 1), "trend_mb_per_min": round(trend, 2), "flat": bool(growth <= max(FLAT_MB, FLAT_FRACTION * start))}


def summarise(samples: list[dict], settle: float) -> dict:
    """Summaries over the samples where actors are alive, from ``settle`` seconds after the first one."""
    t = np.array([s["t"] for s in samples])
    live = np.array([len(s["actors"]) > 0 for s in samples])
    if live.sum() < 2:
        return {"error": f"only {int(live.sum())} samples saw a ModelWorker actor: lower --interval"}
    first = t[np.argmax(live)]
    window = live & (t >= first + settle)
    window = window if window.sum() >= 2 else live
    driver = {k: np.array([s["driver"].get(k, 0.0) for s in samples]) for k in ("rss", "anon", "shmem")}
    actors = {k: np.array([sum(a.get(k, 0.0) for a in s["actors"]) for s in samples]) for k in ("rss", "anon", "shmem")}
    out = {"samples": len(samples), "n_actors": max(len(s["actors"]) for s in samples),
           "window_s": [round(float(t[window][0]), 1), round(float(t[window][-1]), 1)],
           "driver_peak_before_capture_mb": round(float(driver["rss"][t <= first].max()), 1)}
    for name, series in (("driver", driver), ("actors", actors)):
        out[name] = series_summary(t[window], series["rss"][window])
        out[name]["anon"] = series_summary(t[window], series["anon"][window])
        out[name]["shmem"] = series_summary(t[window], series["shmem"][window])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=10, help="copies of the test split in the corpus")
    p.add_argument("--analyses", default="path,attn_ar")
    p.add_argument("--all", action="store_true", help=f"run every analysis ({ALL})")
    p.add_argument("--max-tokens", type=int, default=None, help="cap the corpus tokens (default: all of it)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between memory samples")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--size", default="tiny")
    p.add_argument("--settle", type=float, default=10.0, help="seconds after the actor appears before the window starts (model load, first batches)")
    p.add_argument("--series", default=None, help="also write every memory sample to this JSON file")
    p.add_argument("--keep", default=None, help="keep corpus, model, run and log in this folder")
    args = p.parse_args(argv)
    analyses = ALL if args.all else args.analyses
    size = parse_sizes(args.size)[0]
    if args.repeat < 1 or args.interval <= 0:
        p.error("--repeat must be >= 1 and --interval > 0")
    root = args.keep or tempfile.mkdtemp(prefix="bench-soak-")
    os.makedirs(root, exist_ok=True)
    try:
        corpus = os.path.join(root, f"wiki.test.x{args.repeat}.raw")
        n_bytes = write_repeated_corpus(corpus, args.repeat)
        model_dir = save_model_dir(size, os.path.join(root, "models"))
        cli = ["run", "--models", model_dir, "--data", corpus, "--out", os.path.join(root, "run"), "--device", args.device,
               "--analyses", analyses] + (["--max-tokens", str(args.max_tokens)] if args.max_tokens else [])
        print(f"soak: {args.device}, load average {load_average()}, {size}, corpus {args.repeat}x test split ({n_bytes / 2**20:.1f} MiB), "
              f"analyses {analyses}{f', max {args.max_tokens:,} tokens' if args.max_tokens else ''}\n  {probe_cli(cli)}", flush=True)
        result_json, log_path = os.path.join(root, "result.json"), os.path.join(root, "job.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(job_command(cli, result_json), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            sampler = Sampler(proc.pid, args.interval)
            sampler.start()
            code = proc.wait()
            sampler.stop.set()
            sampler.join()
        if code != 0:
            raise RuntimeError(f"the job exited with {code}:\n{open(log_path).read()[-3000:]}")
        with open(result_json) as f:
            job = json.load(f)
        memory = summarise(sampler.samples, args.settle)
        if args.series:
            with open(args.series, "w") as f:
                json.dump(sampler.samples, f)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    busy = sum(b["seconds"] for b in job["actor_compute_s"].values())
    print(f"  {job['tokens']:,} tokens | total {job['wall_s']:.1f}s | " + " | ".join(f"{k} {v:.1f}s" for k, v in job["stages_s"].items())
          + f" | actor compute {busy:.1f}s | capture {job['tokens'] / job['stages_s']['capture']:,.0f} tok/s", flush=True)
    for name in ("driver", "actors"):
        m = memory.get(name)
        if m:
            a, sh = m["anon"], m["shmem"]
            print(f"  {name:>7} RSS ({memory['window_s'][0]:.0f}-{memory['window_s'][1]:.0f}s): start {m['start_mb']:.0f} | peak {m['peak_mb']:.0f} | "
                  f"end {m['end_mb']:.0f} MiB | growth {m['growth_mb']:+.0f} MiB, trend {m['trend_mb_per_min']:+.1f} MiB/min -> "
                  f"{'flat' if m['flat'] else 'NOT flat'} (anon {a['start_mb']:.0f}->{a['end_mb']:.0f}, peak {a['peak_mb']:.0f};"
                  f" shmem {sh['start_mb']:.0f}->{sh['end_mb']:.0f}, peak {sh['peak_mb']:.0f})", flush=True)
    if "driver_peak_before_capture_mb" in memory:
        print(f"  driver peak before capture (reading + tokenizing): {memory['driver_peak_before_capture_mb']:.0f} MiB; "
              f"driver peak overall (getrusage): {job['driver_peak_rss_mb']:.0f} MiB", flush=True)
    emit({"bench": "soak", "device": args.device, "size": size, "repeat": args.repeat, "analyses": analyses,
          "max_tokens": args.max_tokens, "load_avg_1m_end": load_average(), "tokens": job["tokens"], "wall_s": job["wall_s"],
          "stages_s": job["stages_s"], "actor_compute_s": round(busy, 2), "driver_peak_rss_mb": job["driver_peak_rss_mb"], "memory": memory})
    return 0


if __name__ == "__main__":
    sys.exit(main())
