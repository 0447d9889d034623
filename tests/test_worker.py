"""ModelWorker as a plain object (no Ray): one batch in, shards out; the out-of-memory split is exact; the
analyses' actor-side functions run through ``apply``."""
import numpy as np
import polars as pl
import pytest
import torch

from jobs.config import RunConfig
from jobs.corpus import ArrayChunks
from jobs.models import resolve_model
from jobs.store import Store
from jobs.analyses import mi, neurons, rotation
from jobs.analysis import BatchContext
from jobs.worker import ModelWorker, WorkerConfig


@pytest.fixture(scope="module")
def chunks(gpt2_tokenizer):
    """Chunks 4, 5, 6 of a stream of 10-token chunks (0-3 unused)."""
    ids = gpt2_tokenizer("Mary met her friend in London. When John arrived, Alice called her sister again in Paris today.")["input_ids"]
    rows = np.stack([ids[:10], ids[10:20], ids[5:15]]).astype(np.int32)
    return np.concatenate([np.zeros((4, 10), np.int32), rows])


@pytest.fixture(scope="module")
def batch():
    """Chunk ids of one batch."""
    return np.array([4, 5, 6])


SAMPLE = neurons.Part(np.array([[1, 5], [4, 3], [5, 0], [6, 1], [6, 9], [7, 2]]), np.array([1, 1, 0, 1, 0, 1], bool))


def make_worker(tiny_model_dir, chunks, out):
    cfg = RunConfig(models=(tiny_model_dir,), analyses=("path", "rotation", "neurons", "attn_ar"), device="cpu", out=str(out),
                    chunk_tokens=10)
    parts = {"neurons": SAMPLE, "rotation": rotation.Part(607, None)}
    return ModelWorker(resolve_model(tiny_model_dir), WorkerConfig.of(cfg), str(out), ArrayChunks(chunks), parts)


def test_neuron_capture_takes_the_sample_inside_its_chunks(chunks, batch):
    ctx = BatchContext(batch, chunks[batch], n_layer=3, d_mlp=64, cfg=None, part=SAMPLE, state={})
    b_idx, t_idx = neurons.forward(ctx)["mlp_rows"]
    assert b_idx.tolist() == [0, 1, 2, 2] and t_idx.tolist() == [3, 0, 1, 9]
    ctx = BatchContext(np.array([2, 3]), chunks[[2, 3]], n_layer=3, d_mlp=64, cfg=None, part=SAMPLE, state={})
    assert neurons.forward(ctx) == {}  # no sampled token: no MLP rows kept


def _by_shard(writes) -> dict:
    return {(w.table.name, tuple(sorted(w.partitions.items()))): pl.from_arrow(w.data) for w in writes}


def test_out_of_memory_split_gives_identical_results(tmp_path, tiny_model_dir, chunks, batch, monkeypatch):
    worker = make_worker(tiny_model_dir, chunks, tmp_path / "a")
    whole = _by_shard(worker._compute(batch))
    real = worker._compute

    def small_gpu(b):
        if len(b) > 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(b)

    monkeypatch.setattr(worker, "_compute", small_gpu)
    split = _by_shard(worker._compute_fitting(batch))
    assert whole.keys() == split.keys() and ("activations", (("layer", 1),)) in whole
    for name, a in whole.items():
        b = split[name]
        keys = [c for c in a.columns if not (a[c].dtype.is_float() or a[c].dtype.is_nested())]
        a, b = a.sort(keys), b.sort(keys)  # rotation rows group by kind within each half
        assert a.height == b.height > 0, name
        assert a.select(keys).equals(b.select(keys))
        # Equal up to float rounding: BLAS may block a 1-chunk matmul differently from a 3-chunk one.
        for c in (c for c in a.columns if c not in keys):
            x, y = a[c].to_numpy(), b[c].to_numpy()
            if a[c].dtype.is_nested():
                x, y = np.stack(x).astype(np.float32), np.stack(y).astype(np.float32)
            np.testing.assert_allclose(x, y, rtol=1e-3 if a[c].dtype.is_nested() else 1e-5, atol=1e-5)


def test_out_of_memory_size_is_remembered(tmp_path, tiny_model_dir, chunks, batch, monkeypatch):
    worker = make_worker(tiny_model_dir, chunks, tmp_path / "d")
    real, attempts = worker._compute, []

    def two_chunks_fit(b):
        attempts.append(len(b))
        if len(b) > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(b)

    monkeypatch.setattr(worker, "_compute", two_chunks_fit)
    worker._compute_fitting(batch)
    assert attempts == [3, 1, 2] and worker.fit_chunks == 2
    attempts.clear()
    worker._compute_fitting(batch)  # split up front: no second out-of-memory attempt at 3 chunks
    assert attempts == [1, 2]

    def nothing_fits(b):
        raise torch.cuda.OutOfMemoryError("simulated")

    worker.fit_chunks = None
    monkeypatch.setattr(worker, "_compute", nothing_fits)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a single chunk that does not fit is an error
        worker._compute_fitting(batch[:1])


def test_write_error_surfaces_on_the_next_call(tmp_path, tiny_model_dir, chunks, batch, monkeypatch):
    worker = make_worker(tiny_model_dir, chunks, tmp_path / "c")

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(worker.store, "write_table", broken)
    worker(batch)
    with pytest.raises(OSError, match="disk full"):
        worker.flush()
    assert not Store(str(tmp_path / "c")).list_parts("_progress/model=tiny-gpt2", ".json")


def test_call_writes_shards_then_marker(tmp_path, tiny_model_dir, chunks, batch):
    worker = make_worker(tiny_model_dir, chunks, tmp_path / "b")
    result = worker(batch)
    assert worker.flush() == 1 and worker.flush() == 0  # the shards are written in the background
    store = Store(str(tmp_path / "b"))
    assert result["part"] == "part-000004-000006" and result["tokens"] == 30
    assert store.list_parts("_progress/model=tiny-gpt2", ".json") == {"part-000004-000006"}
    for table in ("tokens", "layer_metrics", "attn_norms", "rotation_angles"):
        assert store.list_files(f"{table}/model=tiny-gpt2"), table
    assert len(store.list_files("activations/model=tiny-gpt2")) == 3  # one file per layer
    keys = np.array([[4, 3], [6, 9]])
    blocks = worker.apply(neurons.sample_blocks, keys)
    assert len(blocks) == 3 and blocks[0].shape == (2, 64) and blocks[0].dtype == np.float32
    stored = pl.read_parquet(store.list_files("activations/model=tiny-gpt2/layer=1")[0]).sort("chunk", "pos")
    assert stored["values"].dtype.inner == pl.Float16  # default storage
    labels = pl.read_parquet(store.list_files("activations/model=tiny-gpt2/layer=1")[0]).sort("chunk", "pos")["label"]
    assert labels.to_list() == [True, False, True, False]  # the batch's sample labels, as the driver drew them
    # A fresh worker (a restarted actor) does not read float16 back: it recomputes the samples' chunks.
    fresh = make_worker(tiny_model_dir, chunks, tmp_path / "b")
    again = fresh.apply(neurons.sample_blocks, keys, batch_size=1)
    for x, y in zip(blocks, again):
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6)  # float32 values, not float16-rounded ones
    assert not np.array_equal(blocks[0], blocks[0].astype(np.float16).astype(np.float32))  # the test can tell


def test_float32_storage_is_read_back_exactly(tmp_path, tiny_model_dir, chunks, batch):
    import dataclasses

    worker = make_worker(tiny_model_dir, chunks, tmp_path)
    worker.cfg = dataclasses.replace(worker.cfg, activations_dtype="float32")
    worker(batch)
    keys = np.array([[4, 3], [5, 0], [6, 9]])
    blocks = worker.apply(neurons.sample_blocks, keys)
    fresh = make_worker(tiny_model_dir, np.zeros_like(chunks), tmp_path)
    again = fresh.apply(neurons.sample_blocks, keys)  # read back from the float32 table: zeroed chunks would give other values
    for x, y in zip(blocks, again):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("device,share,capped", [("cuda", 0.2, [0.2]), ("cuda", 1.0, []), ("cpu", 0.2, [])])
def test_gpu_slot_caps_process_memory(tmp_path, tiny_model_dir, chunks, monkeypatch, device, share, capped):
    """An actor on a slot of a GPU caps its CUDA memory at the slot (Ray's fractions do not); no GPU is
    needed to check the call, so the device and the model load are stubbed."""
    import jobs.worker as worker_module

    calls = []
    monkeypatch.setattr(worker_module, "pick_device", lambda requested: device)
    monkeypatch.setattr(worker_module, "load_model", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, *a: calls.append(fraction))
    cfg = RunConfig(models=(tiny_model_dir,), device="cpu", out=str(tmp_path))
    ModelWorker(resolve_model(tiny_model_dir), WorkerConfig.of(cfg), str(tmp_path), ArrayChunks(chunks), gpu_share=share)
    assert calls == capped


@pytest.mark.parametrize("bins", [None, 15])
def test_hidden_for_in_blocks_equals_one_pass(tmp_path, tiny_model_dir, chunks, batch, monkeypatch, bins):
    """MI inputs built a chunk at a time (two passes for bin codes) equal one forward of all chunks,
    including a token count that ends inside a chunk."""
    from probe_core.mutual_info import bin_codes, bin_edges

    worker = make_worker(tiny_model_dir, chunks, tmp_path)
    ids, n_tokens = chunks[batch], 25
    with torch.inference_mode():
        hidden = worker.model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True).hidden_states
    whole = [h.reshape(-1, h.shape[-1])[:n_tokens].float().numpy() for h in hidden]
    if bins:
        whole = [bin_codes(h, bin_edges(h.min(0), h.max(0), bins)) for h in whole]
    monkeypatch.setattr(mi, "block_chunks", lambda worker, chunk_tokens: 1)
    blocked = worker.apply(mi.hidden_for, batch, n_tokens, bins)
    assert len(blocked) == len(whole)
    for a, b in zip(blocked, whole):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 if bins is None else 0)
