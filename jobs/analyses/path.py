"""Path length: per token and layer the L2 step of the hidden state, its cumulative sum and the angle;
the model's logit of the true next token; Pearson r of the steps with it (``path_summary``, ``path_layer_r``)."""
import numpy as np
import pyarrow as pa
import ray

NAME = "path"


def forward_options(batch) -> dict:
    return {}  # forward_metrics always computes path_step, path_cum, angle_rad and next_logit


def batch_tables(ctx) -> dict:
    chunks, pos = ctx.grid()
    b, t = ctx.input_ids.shape
    logits = np.concatenate([ctx.out["next_logit"].cpu().numpy(), np.zeros((b, 1), np.float32)], axis=1).ravel()
    # The model's own token columns; the corpus columns (token, row, label) are in the corpus table.
    tokens = pa.table({"chunk": chunks, "pos": pos, "next_token_logit": pa.array(logits, mask=pos == t - 1)})
    chunks, pos, layer = ctx.grid(per_layer=True)
    metrics = pa.table({"chunk": chunks, "pos": pos, "layer": layer,
                        **{k: ctx.per_token_layer(k) for k in ("path_step", "path_cum", "angle_rad")}})
    return {"tokens": tokens, "layer_metrics": metrics}


def launch_stats(ctx, m) -> list:
    from jobs import stats

    return [ray.remote(stats.model_path_summary).remote(ctx.store.uri, m.name, m.n_layer)]


def finish_stats(ctx, m) -> list:
    return []


def disk_bytes(plan, m) -> int:
    return plan.corpus.n_tokens * (12 + 14 * m.n_layer)  # tokens + layer_metrics
