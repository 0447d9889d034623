"""Unit tests of the capture hooks, the path-length metrics and the token utilities."""
import numpy as np
import polars as pl
import pytest
import torch
from scipy.stats import pearsonr

from probe_core import capture as hooks
from probe_core.metrics import forward_metrics
from probe_core.path_length import (angle_between, consecutive_steps, fisher_ci, path_layer_correlations,
                                    path_logit_correlation)
from probe_core.tokens import (SENTENCE_END, chunk_count, chunk_stream, decode_table, proper_noun_labels,
                               proper_noun_labels_from_ids, vocab_flags)


@pytest.fixture(scope="module")
def ids(gpt2_tokenizer):
    text = "Mary met her friend in London. She said that her brother lived in Paris for years."
    return torch.tensor([gpt2_tokenizer(text)["input_ids"]])


def hook_count(model) -> int:
    """Hooks on the model. transformers registers some of its own on the first forward pass, so
    count after one, and compare counts."""
    with torch.no_grad():
        model(torch.tensor([[1, 2]]), output_hidden_states=True)
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hook_names_are_pinned():
    assert [hooks.mlp_pre(0), hooks.attn_out(11), hooks.LN_FINAL_IN] == [
        "blocks.0.mlp.hook_pre", "blocks.11.hook_attn_out", "ln_final.hook_in"]
    with pytest.raises(ValueError, match="unknown hook name"):
        hooks.hook_module(None, "blocks.0.mlp.hook_post")


def test_hooks_match_recomputed_activations(tiny_model, ids):
    model = tiny_model
    before = hook_count(model)
    names = {hooks.mlp_pre(1): lambda a: a.clone(), hooks.attn_out(1): lambda a: a.clone(), hooks.LN_FINAL_IN: lambda a: a.clone()}
    with torch.no_grad():
        with hooks.capture(model, names) as cache:
            out = model(ids, output_hidden_states=True)
        block = model.transformer.h[1]
        h = out.hidden_states[1]
        attn = block.attn(block.ln_1(h))[0]
        mid = h + attn
        w, b = block.mlp.c_fc.weight, block.mlp.c_fc.bias  # Conv1D stores (in, out): x @ W + b
        pre = block.ln_2(mid) @ w + b
    torch.testing.assert_close(cache[hooks.attn_out(1)], attn)
    torch.testing.assert_close(cache[hooks.mlp_pre(1)], pre)  # pre-GELU, not mlp.act's output
    assert not torch.allclose(cache[hooks.mlp_pre(1)], block.mlp.act(pre))
    # hidden_states[-1] has ln_f applied; the hook sees the block output before it.
    torch.testing.assert_close(model.transformer.ln_f(cache[hooks.LN_FINAL_IN]), out.hidden_states[-1])
    assert hook_count(model) == before


def test_hooks_removed_after_an_error(tiny_model, ids):
    def boom(a):
        raise RuntimeError("boom")

    before = hook_count(tiny_model)
    with pytest.raises(RuntimeError):
        with hooks.capture(tiny_model, {hooks.mlp_pre(0): boom}):
            tiny_model(ids)
    assert hook_count(tiny_model) == before


def test_forward_metrics_final_hidden_and_logits(tiny_model, ids):
    with torch.no_grad():
        hf = forward_metrics(tiny_model, ids)
        pre = forward_metrics(tiny_model, ids, final_hidden="pre_ln_f")
        full = tiny_model(ids, output_hidden_states=True)
    torch.testing.assert_close(hf["hidden"], torch.stack(full.hidden_states))
    assert not torch.allclose(pre["hidden"][-1], hf["hidden"][-1])
    torch.testing.assert_close(pre["hidden"][:-1], hf["hidden"][:-1])
    expected = full.logits[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(hf["next_logit"][0], expected, rtol=1e-5, atol=1e-5)
    # The pre-ln_f option changes only the last step.
    torch.testing.assert_close(pre["path_step"][:-1], hf["path_step"][:-1])


def test_straight_path_has_known_length():
    direction = torch.tensor([3.0, 4.0])
    hidden = torch.stack([direction * k for k in range(1, 6)])[:, None, :]  # (5, 1, 2): steps of length 5
    step, cum, angle = consecutive_steps(hidden)
    torch.testing.assert_close(step[:, 0], torch.full((4,), 5.0))
    torch.testing.assert_close(cum[:, 0], torch.tensor([5.0, 10.0, 15.0, 20.0]))
    torch.testing.assert_close(angle[:, 0], torch.zeros(4), atol=1e-6, rtol=0)


def test_angle_matches_numpy_and_is_stable():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 40)), rng.normal(size=(200, 40))
    ref = np.arccos(np.clip((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1), -1, 1))
    np.testing.assert_allclose(angle_between(torch.tensor(a), torch.tensor(b)).numpy(), ref, atol=1e-6)
    same = torch.tensor(a, dtype=torch.float32)
    assert angle_between(same, same).abs().max() < 1e-6
    assert angle_between(torch.zeros(3), torch.ones(3)) == 0


def test_path_logit_correlation_matches_scipy():
    rng = np.random.default_rng(1)
    step, logit = rng.normal(size=300), rng.normal(size=300)
    pos = np.tile(np.arange(30), 10)
    logit[pos == 29] = np.nan
    r, n = path_logit_correlation(step, logit, pos)
    keep = (pos > 0) & (pos < 29)
    assert n == keep.sum()
    assert r == pytest.approx(pearsonr(step[keep], logit[keep]).statistic, abs=1e-12)
    assert np.isnan(path_logit_correlation(np.ones(10), logit[:10], pos[:10])[0])
    r0, n0 = path_logit_correlation(step[:5], logit[:5], np.zeros(5))
    assert np.isnan(r0) and n0 == 0


def layer_frame(steps, logit, pos) -> pl.DataFrame:
    """(n, L) steps, (n,) logits and positions as the job's joined table: one row per (token, layer)."""
    n, n_layer = steps.shape
    return pl.DataFrame({"layer": np.repeat(np.arange(1, n_layer + 1, dtype=np.int16), n), "pos": np.tile(pos, n_layer),
                         "path_step": steps.T.ravel().astype(np.float32),
                         "next_token_logit": np.tile(logit, n_layer).astype(np.float32)})


def test_path_layer_correlations_match_scipy():
    rng = np.random.default_rng(2)
    n, n_layer = 400, 4
    logit = rng.normal(size=n)
    steps = rng.normal(size=(n, n_layer)) + np.linspace(0, 1, n_layer) * logit[:, None]
    pos = np.tile(np.arange(40), 10)
    logit[pos == 39] = np.nan
    steps[7, 2] = np.nan  # a non-finite step drops that token for its layer only
    frame = layer_frame(steps, logit, pos).with_columns(  # a null logit (as the tokens table stores it) drops out too
        pl.when(pl.col("pos") == 38).then(None).otherwise(pl.col("next_token_logit")).alias("next_token_logit"))
    got = path_layer_correlations(frame.lazy())
    assert got.schema == pl.Schema({"layer": pl.Int16, "n_tokens": pl.Int64, "r": pl.Float64, "r_ci_low": pl.Float64,
                                    "r_ci_high": pl.Float64})
    assert got["layer"].to_list() == [1, 2, 3, 4]
    x32, y32 = steps.astype(np.float32).astype(np.float64), logit.astype(np.float32).astype(np.float64)
    for layer in range(n_layer):
        keep = (pos > 0) & (pos < 38) & np.isfinite(steps[:, layer])
        ref = pearsonr(x32[keep, layer], y32[keep])
        ci = ref.confidence_interval(0.95)
        row = got.row(layer, named=True)
        assert row["n_tokens"] == keep.sum()
        np.testing.assert_allclose([row["r"], row["r_ci_low"], row["r_ci_high"]], [ref.statistic, ci.low, ci.high], rtol=1e-10)
    assert got.equals(path_layer_correlations(frame))  # a DataFrame gives the same table
    last_logit = frame.filter(pl.col("layer") == 4)["next_token_logit"].fill_null(np.nan).to_numpy()
    r_last, n_last = path_logit_correlation(steps[:, -1].astype(np.float32), last_logit, pos)
    assert n_last == got["n_tokens"][-1] and r_last == pytest.approx(got["r"][-1], rel=1e-12)  # the one-layer case
    lo, hi = fisher_ci([np.nan, 1.0, 0.3], [100, 100, 3])
    assert np.isnan(lo).all() and np.isnan(hi).all()


def test_path_layer_correlations_nan_rule():
    """NaN r (and interval) with fewer than 3 tokens or a constant side; a layer with no usable token has no row."""
    pos = np.arange(6)
    steps = np.stack([np.r_[0, 1, 2, 3, 4, 5], np.ones(6), np.r_[0, 1, 2, 3, 4, 5], np.r_[0, 3, 1, 2, 5, 4]], 1).astype(float)
    logit = np.r_[0, 2, 1, 4, 3, 6.0]
    frame = layer_frame(steps, logit, pos)
    frame = frame.filter(~((pl.col("layer") == 3) & (pl.col("pos") > 2)))  # layer 3 keeps 2 tokens (pos 1, 2)
    frame = frame.with_columns(pl.when(pl.col("layer") == 4).then(np.nan).otherwise(pl.col("path_step")).alias("path_step"))
    got = path_layer_correlations(frame)
    assert got["layer"].to_list() == [1, 2, 3] and got["n_tokens"].to_list() == [5, 5, 2]
    assert got["r"][0] == pytest.approx(pearsonr(steps[1:, 0], logit[1:]).statistic, rel=1e-12)
    assert np.isnan(got["r"][1:].to_numpy()).all() and np.isnan(got["r_ci_low"][1:].to_numpy()).all()
    const_logit = layer_frame(steps[:, :1], np.ones(6), pos)
    assert np.isnan(path_layer_correlations(const_logit)["r"][0])


def test_chunk_stream_drops_tail():
    chunks = chunk_stream(np.arange(10), 4)
    assert chunks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert chunk_count(10, 4) == 2 and chunk_count(3, 4) == 0 and chunk_stream(np.arange(3), 4).shape == (0, 4)
    with pytest.raises(ValueError, match="at least 2, got 1"):
        chunk_stream(np.arange(10), 1)


def test_proper_noun_heuristic():
    tokens = [" Mary", " met", " her", " friend", " in", " London", ".", " The", " doctor", ":", " Paris", "Al", " UK"]
    got = proper_noun_labels(tokens)
    # The stream's first token (" Mary") has no previous token: never a proper noun.
    expected = [False, False, False, False, False, True, False, False, False, False, False, False, True]
    assert got.tolist() == expected
    assert got[5] and not proper_noun_labels(tokens[5:])[0]  # " London" is one only with a predecessor
    assert notebook_labels(tokens) == expected
    assert proper_noun_labels([" Mary"]).tolist() == [False] and proper_noun_labels([]).tolist() == []


def notebook_labels(text: list[str]) -> list[bool]:
    """The notebook's loop, token by token: the rule as written there."""
    labels = [False] * len(text)
    for i in range(1, len(text)):
        t = text[i]
        if len(t) > 2 and t.lstrip()[:1].isupper() and not text[i - 1].rstrip().endswith(SENTENCE_END):
            labels[i] = True
    return labels


def test_proper_noun_labels_from_ids_equal_the_notebook_rule(gpt2_tokenizer):
    decode = decode_table(gpt2_tokenizer)
    flags = vocab_flags(decode)
    text = "The Times said: Mary met her friend in London. Then Paris! UK and US officials. ok? Yes: Alice"
    ids = np.asarray(gpt2_tokenizer(text)["input_ids"])
    expected = notebook_labels([decode[i] for i in ids])
    assert any(expected) and not all(expected)
    assert proper_noun_labels_from_ids(ids, *flags).tolist() == expected
    assert proper_noun_labels([decode[i] for i in ids]).tolist() == expected
    rng = np.random.default_rng(0)
    random_ids = rng.integers(0, len(decode), 5000)
    expected = notebook_labels([decode[i] for i in random_ids])
    assert proper_noun_labels_from_ids(random_ids, *flags).tolist() == expected
    # A slice of the stream labelled on its own, given the token before it, equals the stream's labels.
    for cut in (1, 17, 2500, 4999):
        part = proper_noun_labels_from_ids(random_ids[cut:], *flags, prev_id=int(random_ids[cut - 1]))
        assert part.tolist() == expected[cut:]
    assert proper_noun_labels_from_ids(random_ids[:0], *flags, prev_id=5).tolist() == []
