"""Benchmark: tokens/s of the capture stage against a plain Hugging Face forward, per model size.

    python bench/throughput.py [--sizes tiny,gpt2] [--device cpu|cuda] [--dtype float32|bfloat16]
                               [--batch 2] [--tokens 256] [--peak-flops 989e12]

Both sides run in this process on the same random GPT-2, the same batch (B sequences of T WikiText-2
tokens) and dtype, under ``torch.inference_mode``; each is timed as the median of several runs after
warm-up runs (CUDA synchronised). Variants, fastest expected first:

- ``plain``: ``model(ids, output_hidden_states=True)``, the reference (it includes the (B, T, V) LM head).
- ``plain_body``: ``model.transformer(ids, output_hidden_states=True)``: no LM head, as the job runs it.
- ``metrics``: ``forward_metrics`` with every per-token metric (path, angles, next logit, attention
  norms, sampled MLP rows), plus the device->host copies of its small outputs.
- ``capture``: the worker's own pieces as ``ModelWorker.__call__`` runs them (``_compute_fitting``: the
  forward, each analysis's ``Capture.reduce``: Arrow tables, copies to host, kept samples) minus the Parquet writes.
  ``ratio = capture / plain`` (target >= 0.8); ``ratio_body = capture / plain_body``.
- ``worker``: the whole ``ModelWorker.__call__`` plus waiting for its shard writes (to a temporary
  folder), serially; ``worker_pipelined``: back-to-back calls whose writes overlap the next call's
  compute on the worker's background thread, as in the job (one timed run of ``--repeats`` calls).
- ``--breakdown``: the milliseconds of each piece (forward, each analysis's ``reduce_<name>``, the writes run synchronously).
- ``--pages-batches S``: the overhead of the opt-in ``neuron_pages`` analysis (target: at most 15% of capture time on
  CPU, gpt2 shape, 2 threads). Two workers, one with the default analyses and one with ``neuron_pages`` added
  (k=20, W=10), capture the same stream of S distinct batches of consecutive WikiText-2 chunks in one run,
  alternating batch by batch; the second's state grows from empty as in a job. ``pages_overhead`` = its total time
  over the first's - 1, also per quarter of the stream (the first batches fill the state and cost most; a longer
  corpus costs less per batch).

On CUDA, MFU = 2 * n_params * tok/s / peak, n_params = the model's parameters (tied wte counted once).
Ends with one JSON line.
"""
import argparse
import dataclasses
import os
import sys
import tempfile
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_model, build_tokenizer, corpus_tokens, emit, load_average, median_times, parse_sizes  # noqa: E402

# Density of the neurons sample in the real job: 2000 sampled tokens over WikiText-2 test (~283k tokens).
SAMPLE_DENSITY = 2000 / 283_000


def make_plan(tokens: np.ndarray, decode: list[str], b: int, t: int, target_id: int, seed: int = 0):
    """(chunk_ids, ids, parts): chunks 0..B-1 of ``ids`` (B, T) as the driver sends them (the chunks a worker's
    chunk source ``ArrayChunks(ids)`` returns) and the plan's parts (neuron sample, rotation target).

    The chunks are the first B (in corpus order) holding the rotation target after position 0, so the
    rotation path does real work; the neuron sample has the job's density (~7 per 1k tokens).
    """
    from jobs.analyses import rotation

    chunks = tokens[: tokens.size // t * t].reshape(-1, t)
    keep = np.flatnonzero((chunks[:, 1:] == target_id).any(1))[:b]
    if keep.size < b:
        raise ValueError(f"only {keep.size} chunks of {t} tokens hold the target; lower --batch (got {b})")
    ids = chunks[keep].astype(np.int32)
    parts = {"neurons": neuron_sample(ids, decode, seed), "rotation": rotation.Part(target_id, None)}
    return np.arange(b, dtype=np.int64), ids, parts


def neuron_sample(ids: np.ndarray, decode: list[str], seed: int = 0):
    """The neurons analysis's part for chunks ``ids`` (B, T): a sorted (chunk, pos) sample at the job's density."""
    from jobs.analyses import neurons
    from probe_core.tokens import proper_noun_labels

    t = ids.shape[1]
    proper = proper_noun_labels([decode[i] for i in ids.ravel()])
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(ids.size, size=max(1, round(ids.size * SAMPLE_DENSITY)), replace=False))
    keys = np.stack([flat // t, flat % t], axis=1).astype(np.int64)  # sorted (chunk, pos)
    return neurons.Part(keys, proper[flat])


def make_worker(size: str, model, device: str, dtype: str, store_dir: str, ids: np.ndarray, parts: dict, extra=()):
    """A ModelWorker around an in-memory model (``load_model`` patched out, so no checkpoint on disk), running the
    default analyses and ``extra`` ones."""
    from jobs import analyses
    from jobs.config import RunConfig
    from jobs.corpus import ArrayChunks
    from jobs.models import ModelSpec
    from jobs.worker import ModelWorker, WorkerConfig

    c = model.config
    spec = ModelSpec(source=f"random-{size}", name=size, n_layer=c.n_layer, n_embd=c.n_embd, d_mlp=c.n_inner or 4 * c.n_embd,
                     n_positions=c.n_positions, vocab_size=c.vocab_size, config={})
    cfg = RunConfig(analyses=(*analyses.defaults(), *extra), device=device, dtype=dtype, chunk_tokens=ids.shape[1])
    with mock.patch("jobs.worker.load_model", return_value=model):
        return ModelWorker(spec, WorkerConfig.of(cfg), store_dir, ArrayChunks(ids), parts, threads=0)


def contexts(worker, chunk_ids) -> tuple[dict, dict]:
    """(each capture's ``BatchContext`` before the pass, the ``forward_metrics`` options), as ``ModelWorker._compute`` builds them."""
    from jobs.analysis import BatchContext

    input_ids = worker.chunks.ids(chunk_ids)
    ctx = {name: BatchContext(chunk_ids, input_ids, worker.spec.n_layer, worker.spec.d_mlp, worker.cfg, worker.parts.get(name),
                              worker.state.get(name)) for name in worker.captures}
    return ctx, {k: v for name, c in worker.captures.items() if c.forward for k, v in c.forward(ctx[name]).items()}


def metrics_only(worker, chunk_ids) -> None:
    """forward_metrics with every per-token metric on (the captures' options), then the device->host copies of its outputs."""
    out = worker.forward(worker.chunks.ids(chunk_ids), **contexts(worker, chunk_ids)[1])
    for key in ("path_step", "path_cum", "angle_rad", "next_logit", "log_norm"):
        out[key].cpu().numpy()
    out["mlp_pre"].to(torch.float16).cpu().numpy()


def capture_no_writes(worker, chunk_ids) -> list:
    """``ModelWorker.__call__`` minus the shard writes: ``_compute_fitting``, the forward with every metric and
    each analysis's ``reduce`` (Arrow tables, copies to host, kept samples). Returns its ``Write``s."""
    return worker._compute_fitting(chunk_ids)


def worker_call(worker, chunk_ids) -> None:
    """The whole ``ModelWorker.__call__`` and then its shard writes (``flush``), serially: in the timing
    loop a write left running on the worker's background thread would slow whichever variant ran next."""
    worker(chunk_ids)
    worker.flush()


def worker_pipelined(worker, chunk_ids, calls: int) -> float:
    """Seconds per call of ``calls`` back-to-back ``ModelWorker.__call__`` (each call's writes overlap the
    next call's compute on the background thread, as in the job), the last write included."""
    import time

    worker.flush()
    t0 = time.perf_counter()
    for _ in range(calls):
        worker(chunk_ids)
    worker.flush()
    return (time.perf_counter() - t0) / calls


def host_breakdown(worker, chunk_ids, repeats: int, cuda: bool) -> dict:
    """Median milliseconds of each piece of ``ModelWorker.__call__`` on this batch, writes included."""
    from jobs import analyses
    from jobs.worker import part_name

    ids = worker.chunks.ids(chunk_ids)
    ctx, options = contexts(worker, chunk_ids)
    writes = [w for w in capture_no_writes(worker, chunk_ids) if w.data.num_rows]
    with torch.inference_mode():
        out = worker.forward(ids, **options)
        pieces = {"forward_metrics": lambda: worker.forward(ids, **options)}
        for a in analyses.selected(worker.cfg.analyses):
            if a.capture:
                pieces[f"reduce_{a.name}"] = lambda r=a.capture.reduce, c=dataclasses.replace(ctx[a.name], out=out): r(c)
        pieces["parquet_writes"] = lambda: worker._write(part_name(chunk_ids), writes, {"tokens": int(ids.size), "seconds": 0.0})
        seconds = median_times(pieces, warmup=1, repeats=repeats, cuda=cuda)
    return {k: round(v * 1e3, 2) for k, v in seconds.items()}


def pages_stream(size: str, model, args, tokens: np.ndarray, decode: list[str], target_id: int) -> dict:
    """Capture seconds of the same S batches with and without ``neuron_pages`` (see the module's docstring)."""
    import time

    from jobs.analyses import neuron_pages, rotation
    from probe_core import neuron_pages as npg

    b, t, s = args.batch, args.tokens, args.pages_batches
    chunks = tokens[: tokens.size // t * t].reshape(-1, t)
    if len(chunks) < b * s:
        raise ValueError(f"the corpus holds {len(chunks)} chunks of {t} tokens, fewer than --batch x --pages-batches")
    ids = chunks[: b * s].astype(np.int32)
    c = model.config
    d_mlp = c.n_inner or 4 * c.n_embd
    parts = {"neurons": neuron_sample(ids, decode), "rotation": rotation.Part(target_id, None),
             "neuron_pages": neuron_pages.Part(20, 10, {size: npg.state_bytes(c.n_layer, d_mlp, 20, 10)})}
    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory(prefix="bench-pages-") as store_dir:
        base = make_worker(size, model, args.device, args.dtype, store_dir, ids, parts)
        pages = make_worker(size, model, args.device, args.dtype, store_dir, ids, parts, extra=(neuron_pages.NAME,))
        times = {"capture": [], "capture_pages": []}
        for i in range(s):
            batch = np.arange(i * b, (i + 1) * b, dtype=np.int64)
            for name, worker in (("capture", base), ("capture_pages", pages)):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                capture_no_writes(worker, batch)
                if cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
        held = pages.state[neuron_pages.NAME].state.chunks.size
    if held != b * s:
        raise RuntimeError(f"the neuron_pages state holds {held} chunks, not the {b * s} captured")
    q = max(1, s // 4)
    quarters = [round(sum(times["capture_pages"][i:i + q]) / sum(times["capture"][i:i + q]) - 1, 4) for i in range(0, s, q)]
    total = {k: sum(v) for k, v in times.items()}
    return {"pages_batches": s, "capture_s": round(total["capture"], 2), "capture_pages_s": round(total["capture_pages"], 2),
            "pages_overhead": round(total["capture_pages"] / total["capture"] - 1, 4), "pages_overhead_by_quarter": quarters}


def bench_size(size: str, args, tokens: np.ndarray, decode: list[str], target_id: int) -> dict:
    cuda = args.device == "cuda"
    model = build_model(size, device=args.device, dtype=args.dtype)
    if args.pages_batches:
        return pages_stream(size, model, args, tokens, decode, target_id)
    batch, input_ids, parts = make_plan(tokens, decode, args.batch, args.tokens, target_id)
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=args.device)
    n_tok = ids.numel()
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as store_dir:
        worker = make_worker(size, model, args.device, args.dtype, store_dir, input_ids, parts)
        occurrences = int((input_ids[:, 1:] == target_id).sum())

        @torch.inference_mode()
        def plain():
            model(ids, output_hidden_states=True)

        @torch.inference_mode()
        def plain_body():
            model.transformer(input_ids=ids, output_hidden_states=True)

        # worker(chunk ids) rewrites the same part names each time (atomic renames), so files do not pile up.
        seconds = median_times({"plain": plain, "plain_body": plain_body, "metrics": lambda: metrics_only(worker, batch),
                                "capture": lambda: capture_no_writes(worker, batch), "worker": lambda: worker_call(worker, batch)},
                               warmup=args.warmup, repeats=args.repeats, cuda=cuda)
        seconds["worker_pipelined"] = worker_pipelined(worker, batch, args.repeats)
        breakdown = host_breakdown(worker, batch, args.repeats, cuda) if args.breakdown else None
    rate = {k: n_tok / s for k, s in seconds.items()}
    n_params = sum(p.numel() for p in model.parameters())
    row = {"tok_s": round(rate["capture"], 1), "plain_tok_s": round(rate["plain"], 1),
           "ratio": round(rate["capture"] / rate["plain"], 3),
           "plain_body_tok_s": round(rate["plain_body"], 1), "metrics_tok_s": round(rate["metrics"], 1),
           "worker_tok_s": round(rate["worker"], 1), "worker_pipelined_tok_s": round(rate["worker_pipelined"], 1), "ratio_body": round(rate["capture"] / rate["plain_body"], 3),
           "n_params": n_params, "tokens_per_batch": n_tok, "target_occurrences": occurrences}
    if breakdown:
        row["breakdown_ms"] = breakdown
    if cuda:
        row["mfu"] = round(2 * n_params * rate["capture"] / args.peak_flops, 4)
        row["plain_mfu"] = round(2 * n_params * rate["plain"] / args.peak_flops, 4)
    del worker, model
    if cuda:
        torch.cuda.empty_cache()
    return row


def print_row(size: str, row: dict) -> None:
    if "pages_overhead" in row:
        print(f"{size:>7}: {row['pages_batches']} batches: capture {row['capture_s']:.1f} s, with neuron_pages "
              f"{row['capture_pages_s']:.1f} s: overhead {row['pages_overhead']:+.1%} (by quarter of the stream: "
              + ", ".join(f"{v:+.1%}" for v in row["pages_overhead_by_quarter"]) + ")", flush=True)
        return
    if "breakdown_ms" in row:
        n_tok = row["tokens_per_batch"]
        print(f"{size:>7}: per batch of {n_tok} tokens: " + ", ".join(f"{k} {v:.1f} ms ({v * 1e3 / n_tok:.2f} us/tok)" for k, v in row["breakdown_ms"].items()))
    mfu = f", MFU {row['mfu']:.1%} (plain {row['plain_mfu']:.1%})" if "mfu" in row else ""
    print(f"{size:>7}: plain {row['plain_tok_s']:>11,.0f} | body {row['plain_body_tok_s']:>11,.0f} | "
          f"metrics {row['metrics_tok_s']:>11,.0f} | capture {row['tok_s']:>11,.0f} | worker+writes {row['worker_tok_s']:>11,.0f} (pipelined {row['worker_pipelined_tok_s']:,.0f}) tok/s"
          f" | ratio capture/plain {row['ratio']:.2f}{' (< 0.8 target)' if row['ratio'] < 0.8 else ''}"
          f" (capture/body {row['ratio_body']:.2f}){mfu}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="comma list of tiny,gpt2,medium,large,xl; default tiny,gpt2 on CPU, gpt2..xl on CUDA")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=int, default=2, help="sequences per forward")
    p.add_argument("--tokens", type=int, default=256, help="tokens per sequence (<= 1024)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--breakdown", action="store_true", help="also time each piece of the worker (forward, each table, the Parquet writes)")
    p.add_argument("--pages-batches", type=int, default=0, help="measure neuron_pages' overhead over this many distinct batches instead")
    p.add_argument("--peak-flops", type=float, default=989e12, help="accelerator peak FLOP/s for MFU (H100 SXM dense bf16: 989e12)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if not 2 <= args.tokens <= 1024:
        p.error(f"--tokens must be in [2, 1024], got {args.tokens}")
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch and --repeats must be >= 1, --warmup >= 0")
    sizes = parse_sizes(args.sizes or ("tiny,gpt2" if args.device == "cpu" else "gpt2,medium,large,xl"))
    from probe_core.tokens import decode_table

    tokenizer = build_tokenizer()
    decode = decode_table(tokenizer)
    target_id = tokenizer(" her", add_special_tokens=False)["input_ids"][0]
    tokens = corpus_tokens(tokenizer)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"throughput: {device}, load average {load_average()}, {args.dtype}, batch {args.batch} x {args.tokens} tokens, median of {args.repeats} after {args.warmup} warm-up")
    results = {}
    for size in sizes:
        results[size] = bench_size(size, args, tokens, decode, target_id)
        print_row(size, results[size])
    emit({"bench": "throughput", "device": device, "load_avg_1m_end": load_average(), "dtype": args.dtype, "batch": args.batch, "tokens": args.tokens, "sizes": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
