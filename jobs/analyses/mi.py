"""Pairwise mutual information between hidden-state dimensions per layer (``mi``, ``mi_null``,
``mi_summary``): 15-bin histogram (plug-in and Miller-Madow, with a permutation null) or sklearn's KSG,
over the stream's first ``--mi-tokens`` tokens. Nothing per batch: replica 0 recomputes the hidden
states of those tokens for the statistics tasks (``ModelWorker.hidden_for``)."""
import math

import numpy as np
import ray

NAME = "mi"


def forward_options(batch) -> dict:
    return {}


def batch_tables(ctx) -> dict:
    return {}


def launch_stats(ctx, m) -> list:
    """One histogram task per hidden_states layer, or for KSG (about 1 s a column) tasks over blocks of columns."""
    from jobs import stats

    plan, cfg, store, gpu = ctx.plan, ctx.plan.cfg, ctx.store, ctx.gpu
    # uint8 bin codes from the worker for the histogram (4x smaller than float32 hidden states); floats for KSG.
    bins = cfg.mi_bins if cfg.mi_method == "histogram" and cfg.mi_bins <= 256 else None
    hidden = ctx.workers[m.name].hidden_for.options(num_returns=m.n_layer + 1).remote(np.arange(plan.mi_chunks), plan.mi_tokens, bins)
    if cfg.mi_method == "histogram":
        task = ray.remote(stats.layer_mi).options(**gpu)
        return [task.remote(store.uri, m.name, layer, h, cfg.mi_bins, ctx.use_gpu, cfg.seed) for layer, h in enumerate(hidden)]
    d, refs = m.n_embd, []
    block = min(stats.KSG_COLUMNS_PER_TASK, math.ceil((d - 1) / 8))  # at least 8 tasks a layer
    columns, write = ray.remote(stats.ksg_columns), ray.remote(stats.write_ksg)
    for layer, h in enumerate(hidden):
        parts = [columns.remote(h, range(lo, min(lo + block, d - 1)), cfg.seed) for lo in range(0, d - 1, block)]
        refs.append(write.remote(store.uri, m.name, layer, plan.mi_tokens, d, *parts))
    return refs


def finish_stats(ctx, m) -> list:
    return []


def disk_bytes(plan, m) -> int:
    return (m.n_layer + 1) * m.n_embd * (m.n_embd - 1) // 2 * 18
