"""Parity of the streamed neuron-page state with brute force over every token (numpy), mergeability and
batching independence, the documented sampling priority re-drawn in numpy, and the logit directions."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from probe_core import neuron_pages as npg

T, W, K = 12, 3, 4


def np_mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer in numpy uint64 (the reference for the torch version)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def np_priority(seed, salt, layer, neuron, chunk, pos) -> np.ndarray:
    """The README's rule: h_token + h_neuron mod 2**64 read as int64, h_neuron =
    mix(mix(mix(mix(seed) ^ salt) ^ layer) ^ neuron), h_token = mix(mix(chunk) ^ pos); uint64 arithmetic."""
    u = lambda v: np.asarray(v).astype(np.int64).astype(np.uint64)  # noqa: E731
    h = np_mix(np_mix(np_mix(np_mix(u(seed)) ^ u(salt)) ^ u(layer)) ^ u(neuron))
    with np.errstate(over="ignore"):
        return (np_mix(np_mix(u(chunk)) ^ u(pos)) + h).view(np.int64)


def activations(n_chunks=6, n=7, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_chunks, T, n)).astype(np.float32) * 3
    if ties:  # many exact ties (rounded values) and exact zeros
        x = np.round(x).astype(np.float32)
    x[0, 0, 0] = 9.5  # overflow bin
    x[-1, 2, 1] = -8.0  # exactly on the first edge
    return x


def cfg(seed=3, k=K):
    return npg.PagesConfig(k=k, window=W, chunk_tokens=T, seed=seed, salt=npg.model_salt("tiny"))


def stream(x, batches, config, n_layer=1):
    """The state after feeding chunks in the given batches (lists of chunk indices, each ascending)."""
    state = npg.empty_state(n_layer, x.shape[-1], config)
    for b in batches:
        for layer in range(n_layer):
            state = npg.update(state, layer, torch.from_numpy(x[b]), torch.tensor(b))
        state = npg.seen(state, b)
    return state


def brute(x, config, layer=1):
    """Every statistic from all tokens at once, in numpy: (stats dict, examples {kind: list of rows per neuron})."""
    n_chunks, t_len, n = x.shape
    flat = x.reshape(-1, n)
    chunk = np.repeat(np.arange(n_chunks), t_len)
    pos = np.tile(np.arange(t_len), n_chunks)
    key = chunk * t_len + pos
    hist = np.stack([np.bincount(np.searchsorted(npg.HIST_EDGES, flat[:, j], side="left"), minlength=len(npg.HIST_EDGES) + 1)
                     for j in range(n)])
    stats = {"n": np.full(n, len(flat)), "mean": flat.astype(np.float64).mean(0), "sd": flat.astype(np.float64).std(0, ddof=1),
             "min": flat.min(0), "max": flat.max(0), "frac_active": (flat > 0).mean(0), "hist": hist}
    examples = {}
    for j in range(n):
        v = flat[:, j]
        prio = np_priority(config.seed, config.salt, layer, j, chunk, pos)
        active = np.nonzero(v > 0)[0]
        orders = {
            "top": np.lexsort((key, -v.astype(np.float64))),
            "bottom": np.lexsort((key, v)),
            "random_active": active[np.lexsort((key[active], prio[active]))],
        }
        for kind, order in orders.items():
            rows = []
            for r in order[:config.k]:
                c, p = chunk[r], pos[r]
                w = config.window
                ctx = [x[c, q, j] if 0 <= q < t_len else np.nan for q in range(p - w, p + w + 1)]
                rows.append((c, p, v[r], ctx))
            examples[(kind, j)] = rows
    return stats, examples


def check_tables(state, x, config):
    stats, examples = npg.layer_tables(state.layers[0], config, 1)
    want, want_ex = brute(x, config)
    s = stats.to_pydict()
    assert s["n"] == list(want["n"])
    np.testing.assert_allclose(s["mean"], want["mean"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s["sd"], want["sd"], rtol=1e-12)
    assert np.array_equal(np.array(s["min"], np.float32), want["min"]) and np.array_equal(np.array(s["max"], np.float32), want["max"])
    np.testing.assert_allclose(s["frac_active"], want["frac_active"], rtol=1e-15)
    assert np.array_equal(np.array(s["hist"]), want["hist"])
    assert all(sum(h) == len(x.reshape(-1, x.shape[-1])) for h in s["hist"])
    ex = examples.to_pylist()
    for (kind, j), rows in want_ex.items():
        got = [r for r in ex if r["kind"] == kind and r["neuron"] == j]
        assert [r["rank"] for r in got] == list(range(len(rows)))
        assert [(r["chunk"], r["pos"]) for r in got] == [(c, p) for c, p, _, _ in rows], (kind, j)
        assert [r["activation"] for r in got] == [float(v) for _, _, v, _ in rows]
        for r, (_, _, _, ctx) in zip(got, rows):
            assert r["context"] == [None if np.isnan(c) else float(c) for c in ctx]


@pytest.mark.parametrize("block_rows", [128, 7])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("batches", [[[0, 1, 2, 3, 4, 5]], [[0], [1], [2], [3], [4], [5]], [[4, 5], [0, 1, 2], [3]]])
def test_stream_equals_brute_force(batches, ties, block_rows, monkeypatch):
    monkeypatch.setattr(npg, "_BLOCK_ROWS", block_rows)  # the sweep in one block and in blocks of 7 rows
    x = activations(ties=ties)
    config = cfg()
    check_tables(stream(x, batches, config), x, config)


def test_merge_of_two_states_is_the_state_of_the_union():
    x = activations(n_chunks=8, ties=True)
    config = cfg(k=5)
    a = stream(x, [[5, 6], [0, 1]], config)
    b = stream(x, [[7], [2, 3, 4]], config)
    merged = npg.merge(a, b)
    assert merged.chunks.tolist() == list(range(8))
    check_tables(merged, x, config)
    whole = npg.layer_tables(stream(x, [list(range(8))], config).layers[0], config, 1)
    assert npg.layer_tables(merged.layers[0], config, 1)[1].equals(whole[1])
    with pytest.raises(ValueError, match="share chunks"):
        npg.merge(a, a)


def test_fewer_tokens_than_k_and_neurons_never_active():
    x = activations(n_chunks=1)
    x[..., 2] = -1.0  # never active: no random_active rows
    config = cfg(k=T + 5)  # more than the corpus holds
    state = stream(x, [[0]], config)
    check_tables(state, x, config)
    ex = npg.layer_tables(state.layers[0], config, 1)[1].to_pylist()
    assert not [r for r in ex if r["kind"] == "random_active" and r["neuron"] == 2]
    assert len([r for r in ex if r["kind"] == "top" and r["neuron"] == 2]) == T


def test_priority_matches_numpy_reference():
    config = cfg(seed=2**32 - 1)
    chunk = torch.tensor([0, 5, 123456, 2**31 - 1])
    pos = torch.tensor([0, 1, 1023, 7])
    got = npg.priority(npg.neuron_hash(config.seed, config.salt, 3, 5)[None, :], npg.token_hash(chunk, pos)[:, None]).numpy()
    want = np_priority(config.seed, config.salt, 3, np.arange(5)[None, :], chunk.numpy()[:, None], pos.numpy()[:, None])
    assert np.array_equal(got, want)


def test_state_bytes_counts_the_tensors():
    config = cfg()
    layer = npg.empty_layer(7, config)
    actual = sum(t.numel() * t.element_size() for t in [layer.n, layer.mean, layer.m2, layer.n_active, layer.hist]
                 + [getattr(e, f) for e in (layer.top, layer.bottom, layer.sample) for f in ("value", "key", "context", "prio")
                    if getattr(e, f) is not None])
    assert npg.state_bytes(1, 7, K, W) == actual


def test_context_is_null_outside_the_chunk():
    arr = npg._context_array(np.array([[np.nan, 1.0, 2.0]], np.float32))
    assert arr.type == pa.list_(pa.float32()) and arr.to_pylist() == [[None, 1.0, 2.0]]


def test_vocab_directions_match_numpy():
    rng = np.random.default_rng(1)
    n, d, v, k = 10, 6, 50, 3
    w_out, gamma, w_u = rng.standard_normal((n, d)), rng.uniform(0.5, 2, d), rng.standard_normal((v, d))
    got = npg.vocab_directions(*(torch.tensor(a, dtype=torch.float32) for a in (w_out, gamma, w_u)), k, block=4)
    logits = ((w_out - w_out.mean(1, keepdims=True)) * gamma) @ w_u.T
    order = np.argsort(-logits, axis=1)
    assert np.array_equal(got[1].numpy(), order[:, :k]) and np.array_equal(got[3].numpy(), order[:, ::-1][:, :k])
    np.testing.assert_allclose(got[0].numpy(), np.take_along_axis(logits, order[:, :k], 1), rtol=1e-5, atol=1e-5)


def test_forward_metrics_visits_every_layer_without_changing_its_outputs(tiny_model):
    from probe_core.metrics import forward_metrics

    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    seen_pre = {}
    with torch.inference_mode():
        plain = forward_metrics(tiny_model, ids, mlp_rows=([0, 1], [3, 8]))
        visited = forward_metrics(tiny_model, ids, mlp_rows=([0, 1], [3, 8]), mlp_visit=lambda l, a: seen_pre.__setitem__(l, a.clone()))
        want = {}
        handles = [h.mlp.c_fc.register_forward_hook(lambda m, i, o, l=l: want.__setitem__(l, o.clone()))
                   for l, h in enumerate(tiny_model.transformer.h)]
        tiny_model(ids)
        for h in handles:
            h.remove()
    assert sorted(seen_pre) == list(range(tiny_model.config.n_layer))
    for layer, pre in seen_pre.items():
        assert torch.equal(pre, want[layer]) and pre.shape == (2, 9, tiny_model.config.n_inner)
    for key in plain:
        assert torch.equal(plain[key], visited[key]), key


def test_histogram_bins_at_and_beside_every_edge_match_searchsorted():
    edges = npg.HIST_EDGES
    x = np.concatenate([edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf), [-np.inf, np.inf, -1e30, 1e30, 0.0, -0.0]])
    x = x.astype(np.float32)[:, None].repeat(2, 1)
    got = npg._histogram(torch.from_numpy(x)).numpy()
    want = np.bincount(np.searchsorted(edges, x[:, 0], side="left"), minlength=len(edges) + 1)
    assert np.array_equal(got[0], want) and np.array_equal(got[1], want)


@pytest.mark.parametrize("block_rows, narrow, group", [(128, 4, 16), (5, 1, 3), (8, 2, 1)])
def test_long_stream_takes_every_candidate_route_and_equals_brute_force(monkeypatch, block_rows, narrow, group):
    """Many small batches: the threshold search over groups of rows (of 4, 3 and 1 rows here: the gcd of the
    batch's 12 rows and ``_GROUP``) in one block and in blocks of several groups (the last one short), bounded by
    the batch's own group extremes while slots are empty; the sample's hash runs (wrapping past the largest int64
    for some neurons) and the walk of a neuron that stays unfilled (two active tokens in the corpus, k = 3) to the
    batch's end; the commit of only the examples that enter (rows of one, few and many candidates merged apart),
    all against brute force."""
    monkeypatch.setattr(npg, "_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(npg, "_NARROW", narrow)
    monkeypatch.setattr(npg, "_GROUP", group)
    x = activations(n_chunks=40, n=24, seed=5)
    x[..., 4] = -np.abs(x[..., 4])
    x[7, 3, 4], x[20, 11, 4] = 0.5, 2.0
    config = cfg(k=3)
    routes = {"compared": 0, "bounded": 0, "wrap": 0, "walked": 0, "single": 0, "merged": 0, "partial": 0}
    search, sample, new_examples = npg._threshold_candidates, npg._sample_candidates, npg._new_examples

    def spy_search(flat, gmax, gmin, group, thr_top, thr_bottom, limit):
        out = search(flat, gmax, gmin, group, thr_top, thr_bottom, limit)
        routes["compared"] += out is not None and all(len(f[0]) for f in out)
        routes["bounded"] += bool(torch.isfinite(thr_top).all() and torch.isfinite(thr_bottom).all())
        return out

    def spy_sample(h_token, h_neuron, thr, walk, active, kk):
        found = sample(h_token, h_neuron, thr, walk, active, kk)
        routes["wrap"] += int((torch.iinfo(torch.int64).min - h_neuron > thr - h_neuron).sum())
        routes["walked"] += bool(walk[4]) and int((found[1] == 4).sum()) == len(h_token)
        return found

    def spy_new(s, changed, brow, *args):
        routes["partial"] += len(changed) < 3 * s.n.shape[0]
        routes["single" if brow.shape[1] == 1 else "merged"] += 1
        return new_examples(s, changed, brow, *args)

    monkeypatch.setattr(npg, "_threshold_candidates", spy_search)
    monkeypatch.setattr(npg, "_sample_candidates", spy_sample)
    monkeypatch.setattr(npg, "_new_examples", spy_new)
    state = stream(x, [[c] for c in range(40)], config)
    assert all(routes.values()), routes
    check_tables(state, x, config)


def test_ties_past_the_candidate_limit_take_the_full_topk_and_equal_brute_force(monkeypatch):
    """Repeated values (rounded activations, a constant neuron) with the candidate limit at 0: the batches' top
    and bottom come from the full topk, whose tied boundary rows are redone by key."""
    monkeypatch.setattr(npg, "_CANDIDATES_PER_SLOT", 0)
    x = activations(n_chunks=10, n=9, seed=2, ties=True)
    x[..., 3] = 1.5
    config = cfg(k=3)
    full = []
    best_rows = npg._best_rows
    monkeypatch.setattr(npg, "_best_rows", lambda *a: full.append(1) or best_rows(*a))
    state = stream(x, [[c] for c in range(10)], config)
    assert len(full) >= 2 * 5  # top and bottom, in most batches (one without a value reaching the thresholds reads none)
    check_tables(state, x, config)


def test_commit_adds_deltas_in_place_and_update_leaves_its_input_alone():
    x = activations(n_chunks=4)
    config = cfg()
    before = stream(x, [[0, 1]], config)
    snapshot = npg.layer_tables(before.layers[0], config, 1)
    after = npg.update(before, 0, torch.from_numpy(x[[2, 3]]), torch.tensor([2, 3]))
    assert npg.layer_tables(before.layers[0], config, 1)[1].equals(snapshot[1])  # ``update`` copies
    delta = npg.layer_delta(before.layers[0], torch.from_numpy(x[[2, 3]]), torch.tensor([2, 3]), config, 1)
    committed = npg.commit(before, {0: delta}, [2, 3])
    assert committed.layers[0] is before.layers[0] and committed.chunks.tolist() == [0, 1, 2, 3]
    assert npg.layer_tables(committed.layers[0], config, 1)[1].equals(npg.layer_tables(after.layers[0], config, 1)[1])
    check_tables(committed, x, config)


def test_state_round_trips_through_tensors_and_torch_save(tmp_path):
    x = activations(n_chunks=4)
    config = cfg()
    state = stream(x, [[0, 1], [3]], config, n_layer=2)
    torch.save(npg.to_tensors(state), tmp_path / "s.pt")
    back = npg.from_tensors(torch.load(tmp_path / "s.pt", weights_only=True))
    assert back.cfg == state.cfg and back.chunks.tolist() == [0, 1, 3]
    for a, b in zip(state.layers, back.layers):
        for i in range(2):
            assert npg.layer_tables(a, config, 1)[i].equals(npg.layer_tables(b, config, 1)[i])
    merged = npg.merge(back, stream(x, [[2]], config, n_layer=2))  # a loaded state merges like a live one
    check_tables(merged, x, config)


def test_a_batch_that_changes_no_example_still_counts():
    """Later batches whose every value lies strictly between the kept extremes, all inactive: only the moments move."""
    x = activations(n_chunks=3)
    x[1:] = np.clip(x[1:], -0.5, -0.25)  # inside (bottom's worst, top's worst), and x <= 0: no sample candidate
    x[0, :, :] = np.where(np.arange(T)[:, None] % 2 == 0, 5.0, -5.0) + np.arange(T)[:, None] * 0.01
    config = cfg()
    state = stream(x, [[0], [1], [2]], config)
    check_tables(state, x, config)
