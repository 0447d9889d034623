"""Unit tests of the capture hooks, the path-length metrics and the token utilities."""
import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from probe_core import capture as hooks
from probe_core.metrics import forward_metrics
from probe_core.path_length import (angle_between, consecutive_steps, fisher_ci, path_layer_correlations,
                                    path_logit_correlation)
from probe_core.tokens import chunk_stream, proper_noun_labels


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


def test_path_layer_correlations_match_scipy():
    rng = np.random.default_rng(2)
    n, n_layer = 400, 4
    logit = rng.normal(size=n)
    steps = rng.normal(size=(n, n_layer)) + np.linspace(0, 1, n_layer) * logit[:, None]
    pos = np.tile(np.arange(40), 10)
    logit[pos == 39] = np.nan
    steps[7, 2] = np.nan  # a non-finite step drops that token for its layer only
    got = path_layer_correlations(steps, logit, pos)
    for layer in range(n_layer):
        keep = (pos > 0) & np.isfinite(logit) & np.isfinite(steps[:, layer])
        ref = pearsonr(steps[keep, layer], logit[keep])
        ci = ref.confidence_interval(0.95)
        assert got["n_tokens"][layer] == keep.sum()
        np.testing.assert_allclose([got["r"][layer], got["r_ci_low"][layer], got["r_ci_high"][layer]],
                                   [ref.statistic, ci.low, ci.high], rtol=1e-10)
    r_last, n_last = path_logit_correlation(steps[:, -1], logit, pos)
    assert got["r"][-1] == pytest.approx(r_last, abs=1e-14) and got["n_tokens"][-1] == n_last
    lo, hi = fisher_ci([np.nan, 1.0, 0.3], [100, 100, 3])
    assert np.isnan(lo).all() and np.isnan(hi).all()


def test_chunk_stream_drops_tail():
    chunks = chunk_stream(np.arange(10), 4)
    assert chunks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError):
        chunk_stream(np.arange(10), 1)


def test_proper_noun_heuristic():
    tokens = [" Mary", " met", " her", " friend", " in", " London", ".", " The", " doctor", ":", " Paris", "Al", " UK"]
    got = proper_noun_labels(tokens)
    # The stream's first token (" Mary") has no previous token: never a proper noun.
    expected = [False, False, False, False, False, True, False, False, False, False, False, False, True]
    assert got.tolist() == expected
    assert got[5] and not proper_noun_labels(tokens[5:])[0]  # " London" is one only with a predecessor
    assert proper_noun_labels([" Mary"]).tolist() == [False] and proper_noun_labels([]).tolist() == []


def test_proper_noun_labels_from_ids_equal_the_string_rule(gpt2_tokenizer):
    from probe_core.tokens import decode_table, proper_noun_labels_from_ids

    decode = decode_table(gpt2_tokenizer)
    text = "The Times said: Mary met her friend in London. Then Paris! UK and US officials. ok? Yes: Alice"
    ids = np.asarray(gpt2_tokenizer(text)["input_ids"])
    expected = proper_noun_labels([decode[i] for i in ids])
    assert expected.any() and not expected.all()
    assert proper_noun_labels_from_ids(ids, decode).tolist() == expected.tolist()
    rng = np.random.default_rng(0)
    random_ids = rng.integers(0, len(decode), 5000)
    assert proper_noun_labels_from_ids(random_ids, decode).tolist() == proper_noun_labels([decode[i] for i in random_ids]).tolist()
