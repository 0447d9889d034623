"""Attention-norm dynamics: log L2 norm of each attention block's output per token (``attn_norms``);
per layer an OLS of norm[t] on norm[t-1], norm[t-2] (``attn_ar``)."""
import pyarrow as pa
import ray

NAME = "attn_ar"


def forward_options(batch) -> dict:
    return {"attn_norms": True}


def batch_tables(ctx) -> dict:
    chunks, pos, layer = ctx.grid(per_layer=True)
    return {"attn_norms": pa.table({"chunk": chunks, "pos": pos, "layer": layer, "log_norm": ctx.per_token_layer("log_norm")})}


def launch_stats(ctx, m) -> list:
    from jobs import stats

    return [ray.remote(stats.model_attn_ar).remote(ctx.store.uri, m.name, ctx.plan.cfg.alpha)]


def finish_stats(ctx, m) -> list:
    return []


def disk_bytes(plan, m) -> int:
    return plan.corpus.n_tokens * 10 * m.n_layer
