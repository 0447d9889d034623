"""Proper-noun neurons: MLP ``c_fc`` pre-activations of the neuron sample (``activations``), a logistic
regression per neuron and layer (``neuron_logit``), and the best neuron traced over an in-sample and a
held-out chunk (``neuron_heatmap``).

The sampled pre-activations stay in the actor that computed them (``ModelWorker.samples``: the float32
values the fits use, whatever ``--activations-dtype`` stores) and reach one fit task per layer through
the object store, gathered from every replica of the model."""
import numpy as np
import ray

from jobs.replicas import split_by_owner
from jobs.schema import block_index, table_layers

NAME = "neurons"


def forward_options(batch) -> dict:
    return {"mlp_rows": (batch.sample_b, batch.sample_t)} if len(batch.sample_b) else {}


def batch_tables(ctx) -> dict:
    return {}  # the worker keeps the sampled rows (out["mlp_pre"]) and writes them as ``activations``


def launch_stats(ctx, m) -> list:
    """One fit task per layer. Each replica holds the samples of the batches it computed: each is asked
    for its own keys (replica 0 also for keys no live replica computed in this run: it recomputes them),
    and every layer's fit puts the rows back into sample_keys order. The refs wait in ``ctx.waiting``."""
    from jobs import stats

    plan, workers = ctx.plan, ctx.workers
    parts = split_by_owner(workers.owner[m.name][plan.sample_keys[:, 0]], workers.live(m.name))
    per_replica = []
    for r, pos in parts.items():
        refs = workers.actors[m.name][r].neuron_blocks.options(num_returns=m.n_layer).remote(plan.sample_keys[pos], plan.batch_size)
        per_replica.append(refs if isinstance(refs, list) else [refs])
    task = ray.remote(stats.fit_neurons_gathered).options(**ctx.gpu)
    ctx.waiting[m.name] = [task.remote(ctx.store.uri, m.name, layer, list(parts.values()), plan.sample_labels, plan.cfg.alpha,
                                       ctx.use_gpu, *[blocks[block_index(layer)] for blocks in per_replica])
                           for layer in map(int, table_layers(m.n_layer))]
    return []


def finish_stats(ctx, m) -> list:
    """After the model's fits: its best neuron traced over the heatmap's chunks by replica 0."""
    from jobs import stats

    plan = ctx.plan
    ray.get(ctx.waiting.pop(m.name))
    picked = stats.heatmap_chunks(plan.sample_keys, plan.n_chunks)
    best = stats.best_neuron(ctx.store.uri, m.name)
    if not (best and picked):
        return []
    trace = ctx.workers[m.name].neuron_trace.remote(np.array([c for c, _ in picked]), *best)
    return [ray.remote(stats.write_heatmap).remote(ctx.store.uri, m.name, *best, picked, trace, plan.sample_keys)]


def disk_bytes(plan, m) -> int:
    return len(plan.sample_keys) * m.n_layer * (m.d_mlp * 2 + 12)
