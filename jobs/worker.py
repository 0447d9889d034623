"""ModelWorker: holds one GPT-2 and turns batches of chunks into table shards.

In the job it runs as a Ray actor (resources declared by the driver); in tests it is a plain object:
``ModelWorker(...)(batch)``. A batch names chunks; the worker reads their token ids itself from a chunk
source (the run's corpus table, ``jobs.corpus.CorpusReader``), so the object store carries ranges.
"""
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from jobs import analyses
from jobs.analyses import rotation
from jobs.models import ModelSpec, load_model
from jobs.schema import VALUE_TYPES, block_index, table_layers
from jobs.store import Store
from probe_core.metrics import forward_metrics

def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but this worker sees no CUDA device")
    return requested


def device_tensor(array, device: str) -> torch.Tensor:
    """A long tensor copied from an array: arrays from Ray's object store are read-only, and torch.tensor
    copies them without as_tensor's non-writable warning."""
    return torch.tensor(np.asarray(array), dtype=torch.long, device=device)


@dataclass(frozen=True)
class Batch:
    """What the driver sends a model actor: consecutive chunks and the neuron sample inside them.

    chunk (B,) int64 chunk indices; sample_b (n,) index into ``chunk`` of each sampled token,
    sample_t (n,) its position, sample_label (n,) bool its proper-noun label.
    """

    chunk: np.ndarray
    sample_b: np.ndarray
    sample_t: np.ndarray
    sample_label: np.ndarray

    @classmethod
    def of(cls, chunk_ids: np.ndarray, sample_keys: np.ndarray, sample_labels: np.ndarray) -> "Batch":
        """The batch of ``chunk_ids`` with the (n, 2) sorted (chunk, pos) sample keys that fall in it."""
        sel = np.isin(sample_keys[:, 0], chunk_ids)
        keys = sample_keys[sel]
        return cls(np.asarray(chunk_ids, np.int64), np.searchsorted(chunk_ids, keys[:, 0]), keys[:, 1], np.asarray(sample_labels)[sel])

    @property
    def part(self) -> str:
        return part_name(self.chunk)

    def split(self) -> tuple["Batch", "Batch"]:
        """Halve along the chunks (on out-of-memory); sampled positions follow their chunk (sample_b re-based)."""
        half = len(self.chunk) // 2
        first = self.sample_b < half
        return (Batch(self.chunk[:half], self.sample_b[first], self.sample_t[first], self.sample_label[first]),
                Batch(self.chunk[half:], self.sample_b[~first] - half, self.sample_t[~first], self.sample_label[~first]))


def part_name(chunks: np.ndarray) -> str:
    return f"part-{int(chunks[0]):06d}-{int(chunks[-1]):06d}"


@dataclass(frozen=True)
class WorkerConfig:
    """The settings a model actor uses: a small picklable subset of ``RunConfig`` (``WorkerConfig.of``)."""

    analyses: tuple[str, ...]
    chunk_tokens: int
    final_hidden: str
    seed: int
    target: str
    activations_dtype: str
    device: str
    dtype: str
    allow_pickle: bool

    @classmethod
    def of(cls, cfg) -> "WorkerConfig":
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__})


class ModelWorker:
    """cfg: a ``WorkerConfig``; chunks: a chunk source with ``ids(chunk_indices) -> (B, T)``
    (``jobs.corpus.CorpusReader`` or ``ArrayChunks``)."""

    def __init__(self, spec: ModelSpec, cfg: WorkerConfig, store_uri: str, chunks, target_id: int | None, threads: int = 0,
                 gpu_share: float = 0.0):
        if threads:
            torch.set_num_threads(threads)
        self.spec, self.cfg, self.chunks = spec, cfg, chunks
        self.target_id = target_id
        self.store = Store(store_uri)
        self.device = pick_device(cfg.device)
        if self.device == "cuda" and 0 < gpu_share < 1:
            # Ray's fractional GPUs do not limit memory: cap this process at its share, so models sharing a
            # GPU cannot starve each other; a batch over the cap raises OutOfMemoryError and is split.
            torch.cuda.set_per_process_memory_fraction(gpu_share)
        self.fit_chunks: int | None = None  # largest batch (in chunks) not known to run out of memory
        self.model = load_model(spec, self.device, cfg.dtype, cfg.allow_pickle)
        # (chunk, pos) -> (L, d_mlp) float32: the values the model computed, whatever --activations-dtype stores.
        self.samples: dict[tuple[int, int], np.ndarray] = {}
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.pending = None

    def __call__(self, batch: Batch) -> dict:
        """Computes the batch, then hands its shards to the background writer, so writing overlaps the
        next batch's forward pass. At most one write is outstanding; ``flush`` waits for it.
        """
        start = time.perf_counter()
        tables, mlp = self._compute_fitting(batch)
        part = batch.part
        writes = [(name, data, {}) for name, data in tables.items() if data.num_rows]
        if mlp is not None:
            writes += self._keep_samples(batch, mlp)
        tokens = len(batch.chunk) * self.cfg.chunk_tokens
        seconds = time.perf_counter() - start
        self.flush()
        self.pending = self.writer.submit(self._write, part, writes, {"tokens": tokens, "seconds": seconds})
        return {"part": part, "tokens": tokens, "seconds": seconds}

    def _write(self, part: str, writes: list, marker: dict) -> None:
        shards = {}
        for name, data, extra in writes:
            path = self.store.write_table(name, part, data, model=self.spec.name, **extra)
            shards[path[len(self.store.root):].lstrip("/")] = data.num_rows
        # The marker goes last: a batch counts as done (for --resume) only once all its shards exist.
        # It lists each shard and its rows, so --resume can verify them (and recompute a damaged batch).
        self.store.write_json(f"_progress/model={self.spec.name}/{part}.json", {**marker, "shards": shards})

    def flush(self) -> int:
        """Wait for the outstanding write (re-raising its error); returns how many were waited for."""
        pending, self.pending = self.pending, None
        if pending is None:
            return 0
        pending.result()
        return 1

    def _compute_fitting(self, batch: Batch):
        """Compute a batch; on CUDA out-of-memory, halve it and merge the halves' results.

        The worker remembers the size that ran out of memory, so later batches are split up front
        instead of failing first: the batch adapts to the memory this actor really has.
        """
        n = len(batch.chunk)
        if self.fit_chunks is None or n <= self.fit_chunks:
            try:
                return self._compute(batch)
            except torch.cuda.OutOfMemoryError:
                if n == 1:
                    raise
                torch.cuda.empty_cache()
                self.fit_chunks = n - 1
        first, second = batch.split()
        (t1, m1), (t2, m2) = self._compute_fitting(first), self._compute_fitting(second)
        tables = {k: pa.concat_tables([t1[k], t2[k]]) for k in t1}
        parts = [m for m in (m1, m2) if m is not None]
        return tables, np.concatenate(parts, axis=1) if parts else None

    def _compute(self, batch: Batch):
        """(tables, mlp): the per-token tables the run's analyses build from this batch (jobs/analyses) and the
        sampled pre-activations (L, n, d_mlp) float32 or None."""
        chosen = analyses.selected(self.cfg.analyses)
        input_ids = self.chunks.ids(batch.chunk)
        options = {k: v for a in chosen for k, v in a.forward_options(batch).items()}
        with torch.inference_mode():
            out = forward_metrics(self.model, device_tensor(input_ids, self.device), final_hidden=self.cfg.final_hidden, **options)
            ctx = analyses.BatchContext(batch.chunk, input_ids, out, self.spec.n_layer, self.cfg, self.target_id)
            tables = {name: table for a in chosen for name, table in a.batch_tables(ctx).items()}
            mlp = out["mlp_pre"].float().cpu().numpy() if "mlp_pre" in out else None
        return tables, mlp

    def _keep_samples(self, batch: Batch, mlp: np.ndarray) -> list:
        """Keep sampled pre-activations in memory for the fit stage; return their ``activations`` writes."""
        chunks = batch.chunk[batch.sample_b].astype(np.int32)
        pos = np.asarray(batch.sample_t, dtype=np.int32)
        labels = np.asarray(batch.sample_label, dtype=bool)
        for i, key in enumerate(zip(chunks.tolist(), pos.tolist())):
            self.samples[key] = mlp[:, i]
        d_mlp, dtype = mlp.shape[-1], self.cfg.activations_dtype
        writes = []
        for index, layer in enumerate(table_layers(mlp.shape[0])):
            flat = mlp[index].reshape(-1).astype(dtype)  # storage only: the fits use self.samples
            values = pa.FixedSizeListArray.from_arrays(pa.array(flat, VALUE_TYPES[dtype]), d_mlp)
            data = pa.table({"chunk": chunks, "pos": pos, "label": labels, "values": values})
            writes.append(("activations", data, {"d_mlp": d_mlp, "values_dtype": dtype, "layer": int(layer)}))
        return writes

    def neuron_blocks(self, keys: np.ndarray, batch_size: int = 1) -> tuple:
        """Sampled pre-activations per layer, rows in the order of ``keys`` (n, 2) = (chunk, pos).

        Returns n_layer arrays (n, d_mlp) float32, the model's own values (call with ``num_returns=n_layer``
        so each layer is its own object). Rows this process did not compute (a resumed run, or a restarted
        actor) are read back from a float32 ``activations`` table, or else recomputed by a forward pass
        over their chunks, ``batch_size`` chunks at a time: float16 storage is never read back, so the
        fits never see its rounding.
        """
        self.flush()
        missing = [tuple(k) for k in keys.tolist() if tuple(k) not in self.samples]
        if missing and not self._load_samples(missing):
            self._recompute_samples(np.asarray(missing), batch_size)
        stacked = np.stack([self.samples[tuple(k)] for k in keys.tolist()], axis=1)  # (L, n, d_mlp)
        return tuple(stacked[layer] for layer in range(stacked.shape[0]))

    def _recompute_samples(self, missing: np.ndarray, batch_size: int) -> None:
        """Forward passes over the chunks holding ``missing`` (m, 2) keys; their rows go into self.samples."""
        needed = np.unique(missing[:, 0])
        for lo in range(0, len(needed), max(1, batch_size)):
            chunk_ids = needed[lo:lo + max(1, batch_size)]
            sel = np.isin(missing[:, 0], chunk_ids)
            b_idx = np.searchsorted(chunk_ids, missing[sel, 0])
            with torch.inference_mode():
                ids = device_tensor(self.chunks.ids(chunk_ids), self.device)
                out = forward_metrics(self.model, ids, final_hidden=self.cfg.final_hidden, mlp_rows=(b_idx, missing[sel, 1]))
                mlp = out["mlp_pre"].float().cpu().numpy()  # (L, m_batch, d_mlp)
            for i, key in enumerate(map(tuple, missing[sel].tolist())):
                self.samples[key] = mlp[:, i]

    def _load_samples(self, missing) -> bool:
        """Read ``missing`` keys back from the activations table if it is float32 and holds them all; else False."""
        import pyarrow.dataset as ds

        per_layer = []
        for layer in table_layers(self.spec.n_layer):
            folder = self.store.table_dir("activations", model=self.spec.name, layer=int(layer))
            try:
                dataset = ds.dataset(folder, filesystem=self.store.fs, format="parquet")
            except (FileNotFoundError, OSError):
                return False
            if dataset.schema.field("values").type.value_type != pa.float32():
                return False  # float16 storage: recompute instead of reading rounded values
            table = dataset.to_table()
            index = {(c, p): i for i, (c, p) in enumerate(zip(table["chunk"].to_pylist(), table["pos"].to_pylist()))}
            values = table["values"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, -1)
            per_layer.append((index, values))
        if not all(key in index for index, _ in per_layer for key in missing):
            return False
        for key in missing:
            self.samples[key] = np.stack([values[index[key]] for index, values in per_layer])
        return True

    def hidden_for(self, chunk_ids: np.ndarray, n_tokens: int, bins: int | None = None) -> tuple:
        """Hidden states of the first ``n_tokens`` tokens of these chunks, per hidden_states index.

        chunk_ids: (B,). Returns n_layer + 1 arrays (``num_returns=n_layer + 1``): (n_tokens, d) float32,
        or with ``bins`` (histogram MI) uint8 bin codes (n_tokens, d) from each dimension's min/max over
        all n_tokens. Why codes: they are all the histogram estimator needs, bit-exact with binning the
        floats, and 4x smaller in the object store (gpt2-xl at 16 chunks: 1.3 GB instead of 5 GB).
        The chunks go through the model a few at a time (``mi_block_chunks``), so the worker never holds
        the float hidden states of all of them: with bins, one pass takes each dimension's min/max and a
        second pass bins each block with the global edges (the forward pass is cheap next to the MI).
        """
        from probe_core.mutual_info import bin_codes, bin_edges

        ids_all = self.chunks.ids(chunk_ids)
        step = self.mi_block_chunks(ids_all.shape[1])
        blocks = [(b0, ids_all[b0:b0 + step]) for b0 in range(0, len(ids_all), step) if b0 * ids_all.shape[1] < n_tokens]

        def layers_of(block_ids, b0):
            """(L + 1, tokens of this block within n_tokens, d) float32 for one block of chunks."""
            with torch.inference_mode():
                hidden = forward_metrics(self.model, device_tensor(block_ids, self.device), final_hidden=self.cfg.final_hidden)["hidden"]
                keep = min(hidden.shape[1] * hidden.shape[2], n_tokens - b0 * ids_all.shape[1])
                return hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])[:, :keep].float().cpu().numpy()

        n_states, d = self.spec.n_layer + 1, self.spec.n_embd
        if bins is None:
            out = np.empty((n_states, n_tokens, d), np.float32)
            for b0, block_ids in blocks:
                h = layers_of(block_ids, b0)
                out[:, b0 * ids_all.shape[1]: b0 * ids_all.shape[1] + h.shape[1]] = h
            return tuple(out)
        lo, hi = np.full((n_states, d), np.inf, np.float32), np.full((n_states, d), -np.inf, np.float32)
        for b0, block_ids in blocks:
            h = layers_of(block_ids, b0)
            lo, hi = np.minimum(lo, h.min(1)), np.maximum(hi, h.max(1))
        edges = [bin_edges(lo[k], hi[k], bins) for k in range(n_states)]
        out = np.empty((n_states, n_tokens, d), np.uint8)
        for b0, block_ids in blocks:
            h = layers_of(block_ids, b0)
            for k in range(n_states):
                out[k, b0 * ids_all.shape[1]: b0 * ids_all.shape[1] + h.shape[1]] = bin_codes(h[k], edges[k])
        return tuple(out)

    def mi_block_chunks(self, chunk_tokens: int, budget_bytes: int = 512 * 2**20) -> int:
        """Chunks per forward pass of ``hidden_for``: float32 hidden states of all layers near ``budget_bytes``."""
        per_chunk = (self.spec.n_layer + 1) * chunk_tokens * self.spec.n_embd * 4
        return max(1, min(self.fit_chunks or 64, budget_bytes // per_chunk))

    def neuron_trace(self, chunk_ids: np.ndarray, layer: int, neuron: int) -> np.ndarray:
        """One neuron's c_fc pre-activation at every position of these chunks: (B,) -> (B, T) float32.

        layer is the block number 1..n_layer, as in the tables.
        """
        from probe_core import capture as hooks

        with torch.inference_mode():
            ids = device_tensor(self.chunks.ids(chunk_ids), self.device)
            point = hooks.mlp_pre(block_index(layer))
            with hooks.capture(self.model, {point: lambda a: a[..., neuron].float()}) as cache:
                self.model.transformer(input_ids=ids)
            return cache[point].cpu().numpy()

    def sentence_rotation(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> int:
        """Rotation angles of --sentences (right-padded with EOS, with their mask); returns rows written."""
        with torch.inference_mode():
            ids = device_tensor(input_ids, self.device)
            mask = device_tensor(attention_mask, self.device)
            hidden = forward_metrics(self.model, ids, final_hidden=self.cfg.final_hidden, attention_mask=mask)["hidden"]
            data = rotation.angles_table(np.arange(len(input_ids)), input_ids, hidden, attention_mask, "sentences",
                                         self.spec.n_layer, self.cfg, self.target_id)
        if data.num_rows:
            self.store.write_table("rotation_angles", "sentences", data, model=self.spec.name)
        return data.num_rows
