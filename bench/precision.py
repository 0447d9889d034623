"""How far the per-token metrics move when the forward runs in bfloat16 or float16 instead of float32.

Same random-initialised GPT-2 (weights cast from one float32 copy), same tokens; metrics are always
reduced in float32 (probe_core.metrics), so this measures the forward's own rounding.
Weights are random, not trained: trained GPT-2 has larger activation outliers, so treat these as a
lower bound and rerun on real weights where you have them (--model FOLDER).

usage: python bench/precision.py [--size gpt2|tiny] [--model FOLDER] [--tokens 256] [--batch 2] [--device cpu]
Ends with one JSON line: {"bench": "precision", "bfloat16": {...}, "float16": {...}}.
"""
import argparse
import copy
import json

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from probe_core.metrics import forward_metrics

SIZES = {"tiny": dict(n_layer=3, n_embd=64, n_head=4), "gpt2": dict(n_layer=12, n_embd=768, n_head=12)}
METRICS = ("path_step", "angle_rad", "next_logit", "log_norm")


def build(args) -> GPT2LMHeadModel:
    if args.model:
        return GPT2LMHeadModel.from_pretrained(args.model, use_safetensors=True).eval()
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**SIZES[args.size], n_positions=1024, vocab_size=50257)).eval()


def metrics(model, ids) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        out = forward_metrics(model, ids, attn_norms=True)
    return {k: out[k].float().cpu().numpy() for k in METRICS}


def compare(ref: dict, got: dict) -> dict:
    result = {}
    for k in METRICS:
        diff = np.abs(got[k] - ref[k])
        scale = np.abs(ref[k]) + 1e-6
        result[k] = {"max_abs": float(diff.max()), "median_abs": float(np.median(diff)),
                     "p99_rel": float(np.quantile(diff / scale, 0.99))}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="gpt2", choices=sorted(SIZES))
    p.add_argument("--model")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    base = build(args).to(args.device)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(1)).to(args.device)
    ref = metrics(base, ids)
    report = {"bench": "precision", "device": args.device, "model": args.model or args.size, "tokens": args.batch * args.tokens}
    for dtype in ("bfloat16", "float16"):
        model = copy.deepcopy(base).to(getattr(torch, dtype))
        report[dtype] = compare(ref, metrics(model, ids))
        for k, v in report[dtype].items():
            print(f"{dtype:9s} {k:11s} max|diff| {v['max_abs']:.3g}  median|diff| {v['median_abs']:.3g}  p99 rel {v['p99_rel']:.3g}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
