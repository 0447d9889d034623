"""Rotation: the angle between a target token's hidden states in consecutive layers, against the token
before it and a shuffled baseline (``rotation_angles``); paired t-tests per layer, Bonferroni (``rotation``)."""
import zlib

import numpy as np
import pyarrow as pa
import ray

from jobs.schema import table_layers
from probe_core.rotation import rotation_angles, target_occurrences

NAME = "rotation"
KINDS = ("target", "previous", "shuffled")


def sequence_seeds(seed: int, chunks: np.ndarray, salt: str = "corpus") -> np.ndarray:
    """One seed per sequence from (run seed, chunk, salt): random draws do not depend on batching."""
    return np.array([zlib.crc32(f"{seed}:{salt}:{int(c)}".encode()) for c in chunks], dtype=np.int64)


def forward_options(batch) -> dict:
    return {}  # the angles come from the hidden states forward_metrics always returns


def angles_table(chunk_ids, input_ids, hidden, attention_mask, source: str, n_layer: int, cfg, target_id: int) -> pa.Table:
    """Rows of ``rotation_angles`` for every occurrence of the target in these sequences (B, T); hidden
    (L+1, B, T, d). ``source``: "corpus" (chunk = chunk index) or "sentences" (chunk = sentence index)."""
    b_idx, t_idx = target_occurrences(input_ids, target_id, attention_mask)
    angles = rotation_angles(hidden, b_idx, t_idx, sequence_seeds(cfg.seed, np.asarray(chunk_ids), source), attention_mask)
    n = len(b_idx)
    columns = {"chunk": [], "pos": [], "layer": [], "kind": [], "angle_rad": []}
    for kind in KINDS:
        columns["chunk"].append(np.repeat(np.asarray(chunk_ids, dtype=np.int32)[b_idx], n_layer))
        columns["pos"].append(np.repeat(t_idx.astype(np.int32), n_layer))
        columns["layer"].append(np.tile(table_layers(n_layer), n))
        columns["kind"].append(np.full(n * n_layer, kind, dtype=object))
        columns["angle_rad"].append(np.asarray(angles[kind], dtype=np.float32).reshape(-1))
    data = {k: np.concatenate(v) for k, v in columns.items()}
    rows = len(data["chunk"])
    return pa.table({"target": np.full(rows, cfg.target, dtype=object), "source": np.full(rows, source, dtype=object), **data})


def batch_tables(ctx) -> dict:
    return {"rotation_angles": angles_table(ctx.chunk, ctx.input_ids, ctx.out["hidden"], None, "corpus", ctx.n_layer, ctx.cfg,
                                            ctx.target_id)}


def launch_stats(ctx, m) -> list:
    from jobs import stats

    plan = ctx.plan
    # Sentences first: the t-tests read every occurrence, corpus and sentences.
    first = [ctx.workers[m.name].sentence_rotation.remote(*plan.sentences)] if plan.sentences is not None else []
    return [ray.remote(stats.model_rotation).remote(ctx.store.uri, m.name, plan.cfg.alpha, *first)]


def finish_stats(ctx, m) -> list:
    return []


def disk_bytes(plan, m) -> int:
    return 0  # a few rows per occurrence of the target
