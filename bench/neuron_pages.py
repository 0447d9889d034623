"""Benchmark: overhead of the neuron_pages state update on the capture's forward pass (target: at most 15% on
CPU for a gpt2-small-shaped model at 2 threads).

    python bench/neuron_pages.py [--size gpt2] [--batch 1] [--tokens 1024] [--threads 2] [--device cpu]

One process, one random model, the same random token batch. Variants, interleaved (``median_times``):
- ``capture``: ``forward_metrics`` as the actor runs it for the other analyses (path metrics, attention norms);
- ``capture_pages``: the same with ``mlp_visit`` merging every layer into a ``PagesState`` (k=20, W=10).
``overhead = capture_pages / capture - 1``. (``bench/throughput.py`` predates the analysis registry and
no longer runs; this script measures the same forward pass.) Ends with one JSON line.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_model, emit, load_average, median_times  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="gpt2")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from probe_core import neuron_pages as npg
    from probe_core.metrics import forward_metrics

    model = build_model(a.size, a.device)
    c = model.config
    ids = torch.randint(0, c.vocab_size, (a.batch, a.tokens), generator=torch.Generator().manual_seed(0)).to(a.device)
    cfg = npg.PagesConfig(20, 10, a.tokens, 0, npg.model_salt(a.size))
    box = {"state": npg.empty_state(c.n_layer, c.n_inner or 4 * c.n_embd, cfg, a.device)}
    chunk = torch.arange(a.batch)

    def visit(layer, pre):
        box["state"] = npg.update(box["state"], layer, pre, chunk)

    def plain():
        with torch.inference_mode():
            forward_metrics(model, ids, attn_norms=True)

    def pages():
        with torch.inference_mode():
            forward_metrics(model, ids, attn_norms=True, mlp_visit=visit)

    load0 = load_average()
    times = median_times({"capture": plain, "capture_pages": pages}, warmup=1, repeats=a.repeats, cuda=a.device == "cuda")
    overhead = times["capture_pages"] / times["capture"] - 1
    print(f"{a.size} on {a.device}, {a.threads} threads, batch {a.batch} x {a.tokens} tokens: capture "
          f"{times['capture']:.2f} s, with neuron_pages {times['capture_pages']:.2f} s: overhead {overhead:+.1%} "
          f"(load {load0:.1f} -> {load_average():.1f})")
    emit({"size": a.size, "device": a.device, "threads": a.threads, "batch": a.batch, "tokens": a.tokens,
          "capture_s": round(times["capture"], 3), "capture_pages_s": round(times["capture_pages"], 3),
          "overhead": round(overhead, 4)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
