"""Per-token metrics of one forward pass, computed on the model's device; only small arrays come back."""
import torch

from probe_core import capture as hooks
from probe_core.attn_ar import log_norms
from probe_core.path_length import consecutive_steps


def next_token_logits(final_hidden: torch.Tensor, input_ids: torch.Tensor, unembed: torch.Tensor) -> torch.Tensor:
    """Logit of the true next token at every position but the last: (B, T, d), (B, T), (V, d) -> (B, T - 1).

    Equal to ``lm_head(final_hidden)[b, t, input_ids[b, t + 1]]`` without the (B, T, V) product:
    GPT-2's unembedding has no bias, so one row of it per token is enough.
    """
    rows = unembed[input_ids[:, 1:]]  # (B, T-1, d)
    return (final_hidden[:, :-1].float() * rows.float()).sum(-1)


def forward_metrics(model, input_ids, *, final_hidden="hf", attn_norms=False, mlp_rows=None, mlp_visit=None,
                    attention_mask=None):
    """One forward pass with the hooks a batch needs.

    input_ids: (B, T). mlp_rows: optional (b_idx, t_idx) positions whose ``c_fc`` pre-activations are kept.
    mlp_visit: optional ``visit(layer, pre)`` called in each block's hook with its full ``c_fc`` output
    (B, T, d_mlp), layer 0-based, so a caller can reduce every layer without all layers being kept.
    Returns a dict: ``hidden`` (L+1, B, T, d) stacked per ``final_hidden``; ``path_step``, ``path_cum``,
    ``angle_rad`` (L, B, T) float32; ``next_logit`` (B, T-1) float32, always from the HF final state
    (after ln_f, as the LM head sees it); ``log_norm`` (L, B, T) float32 if ``attn_norms``; ``mlp_pre``
    (L, n_rows, d_mlp) if ``mlp_rows``.
    """
    n_layer = model.config.n_layer
    reducers = {}
    if final_hidden == "pre_ln_f":
        reducers[hooks.LN_FINAL_IN] = lambda a: a
    if attn_norms:
        for layer in range(n_layer):
            reducers[hooks.attn_out(layer)] = log_norms
    if mlp_rows is not None or mlp_visit is not None:
        rows = None
        if mlp_rows is not None:
            b_idx, t_idx = (torch.tensor(i, dtype=torch.long, device=input_ids.device) for i in mlp_rows)
            rows = lambda a: a[b_idx, t_idx]  # noqa: E731
        for layer in range(n_layer):
            reducers[hooks.mlp_pre(layer)] = _mlp_reducer(layer, rows, mlp_visit)
    with hooks.capture(model, reducers) as cache:
        out = model.transformer(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden = hooks.stack_hidden(out.hidden_states, final_hidden, cache.get(hooks.LN_FINAL_IN))
    path_step, path_cum, angle_rad = consecutive_steps(hidden)
    result = {
        "hidden": hidden,
        "path_step": path_step,
        "path_cum": path_cum,
        "angle_rad": angle_rad,
        "next_logit": next_token_logits(out.hidden_states[-1], input_ids, model.lm_head.weight),
    }
    if attn_norms:
        result["log_norm"] = torch.stack([cache[hooks.attn_out(l)] for l in range(n_layer)])
    if mlp_rows is not None:
        result["mlp_pre"] = torch.stack([cache[hooks.mlp_pre(l)] for l in range(n_layer)])
    return result


def _mlp_reducer(layer: int, rows, visit):
    """One hook point serves both options: the visitor sees the whole activation, the cache keeps the rows."""
    def reduce(a):
        if visit is not None:
            visit(layer, a)
        return rows(a) if rows is not None else None
    return reduce
