"""Before/after benchmark of the neuron_pages update in one process: ``capture`` (forward_metrics alone),
``pages_before`` (with ``mlp_visit`` merging into a PagesState by another version of the module) and
``pages_after`` (this checkout's ``probe_core.neuron_pages``), interleaved medians (``median_times``).

    git show b531a9f:probe_core/neuron_pages.py > /tmp/neuron_pages_before.py
    python bench/neuron_pages_ab.py /tmp/neuron_pages_before.py [--batch 2] [--tokens 1024] [--repeats 5]

Same model, batch and state settings as ``bench/neuron_pages.py`` (gpt2 shape, k=20, W=10; every call
merges the same chunks again, so about half of the examples are replaced each time). Ends with one JSON line.
"""
import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_model, emit, load_average, median_times  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("before", help="a copy of probe_core/neuron_pages.py to compare against")
    p.add_argument("--size", default="gpt2")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from probe_core import neuron_pages as after
    from probe_core.metrics import forward_metrics

    spec = importlib.util.spec_from_file_location("neuron_pages_before", a.before)
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    model = build_model(a.size, "cpu")
    c = model.config
    ids = torch.randint(0, c.vocab_size, (a.batch, a.tokens), generator=torch.Generator().manual_seed(0))
    chunk = torch.arange(a.batch)

    def variant(mod):
        cfg = mod.PagesConfig(20, 10, a.tokens, 0, mod.model_salt(a.size))
        box = {"state": mod.empty_state(c.n_layer, c.n_inner or 4 * c.n_embd, cfg)}

        def visit(layer, pre):
            box["state"] = mod.update(box["state"], layer, pre, chunk)

        def run():
            with torch.inference_mode():
                forward_metrics(model, ids, attn_norms=True, mlp_visit=visit)
        return run

    def plain():
        with torch.inference_mode():
            forward_metrics(model, ids, attn_norms=True)

    load0 = load_average()
    t = median_times({"capture": plain, "pages_before": variant(before), "pages_after": variant(after)},
                     warmup=1, repeats=a.repeats)
    load1 = load_average()
    ob, oa = t["pages_before"] / t["capture"] - 1, t["pages_after"] / t["capture"] - 1
    print(f"{a.size}, {a.threads} threads, batch {a.batch} x {a.tokens}: capture {t['capture']:.2f} s, before "
          f"{t['pages_before']:.2f} s ({ob:+.1%}), after {t['pages_after']:.2f} s ({oa:+.1%}) (load {load0:.1f} -> {load1:.1f})")
    emit({"threads": a.threads, "batch": a.batch, "tokens": a.tokens, "capture_s": round(t["capture"], 3),
          "before_s": round(t["pages_before"], 3), "after_s": round(t["pages_after"], 3),
          "overhead_before": round(ob, 4), "overhead_after": round(oa, 4), "load": [round(load0, 2), round(load1, 2)]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
