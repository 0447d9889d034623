"""ModelWorker: holds one GPT-2 and turns batches of chunks into table shards.

In the job it runs as a Ray actor (resources declared by the driver); in tests it is a plain object:
``ModelWorker(...)(chunk_ids)``. A batch names chunks; the worker reads their token ids itself from a chunk
source (the run's corpus table, ``jobs.corpus.CorpusReader``), so the object store carries ranges.
The worker knows no analysis: it runs each selected analysis's ``Capture`` on every batch and, for the
statistics stage, runs whatever function an analysis hands to ``apply``.
"""
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from jobs import analyses
from jobs.analysis import BatchContext
from jobs.models import ModelSpec, load_model
from jobs.store import Store
from probe_core.metrics import forward_metrics


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but this worker sees no CUDA device")
    return requested


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
    (``jobs.corpus.CorpusReader`` or ``ArrayChunks``); parts: {analysis: its part of the plan}."""

    def __init__(self, spec: ModelSpec, cfg: WorkerConfig, store_uri: str, chunks, parts: dict | None = None, threads: int = 0,
                 gpu_share: float = 0.0):
        if threads:
            torch.set_num_threads(threads)
        self.spec, self.cfg, self.chunks, self.parts = spec, cfg, chunks, parts or {}
        self.store = Store(store_uri)
        self.device = pick_device(cfg.device)
        if self.device == "cuda" and 0 < gpu_share < 1:
            # Ray's fractional GPUs do not limit memory: cap this process at its share, so models sharing a
            # GPU cannot starve each other; a batch over the cap raises OutOfMemoryError and is split.
            torch.cuda.set_per_process_memory_fraction(gpu_share)
        self.fit_chunks: int | None = None  # largest batch (in chunks) not known to run out of memory
        self.model = load_model(spec, self.device, cfg.dtype, cfg.allow_pickle)
        self.captures = {a.name: a.capture for a in analyses.selected(cfg.analyses) if a.capture}
        self.state = {name: c.state(self, self.parts.get(name)) for name, c in self.captures.items() if c.state}
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.pending = None

    def ready(self) -> bool:
        """Answers once the weights are loaded (the driver shows model loading with it)."""
        return True

    def __call__(self, chunk_ids: np.ndarray) -> dict:
        """Computes the batch (B,) of chunk indices, then hands its shards to the background writer, so
        writing overlaps the next batch's forward pass. At most one write is outstanding; ``flush`` waits for it.
        """
        start = time.perf_counter()
        chunk_ids = np.asarray(chunk_ids, np.int64)
        writes = [w for w in self._compute_fitting(chunk_ids) if w.data.num_rows]
        part = part_name(chunk_ids)
        tokens = len(chunk_ids) * self.cfg.chunk_tokens
        seconds = time.perf_counter() - start
        self.flush()
        self.pending = self.writer.submit(self._write, part, writes, {"tokens": tokens, "seconds": seconds})
        return {"part": part, "tokens": tokens, "seconds": seconds}

    def _write(self, part: str, writes: list, marker: dict) -> None:
        shards = {}
        for w in writes:
            path = self.store.write_table(w.table, part, w.data, schema=w.schema, model=self.spec.name, **w.partitions)
            shards[path[len(self.store.root):].lstrip("/")] = w.data.num_rows
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

    def _compute_fitting(self, chunk_ids: np.ndarray) -> list:
        """Compute a batch; on CUDA out-of-memory, halve it and merge the halves' shards.

        The worker remembers the size that ran out of memory, so later batches are split up front
        instead of failing first: the batch adapts to the memory this actor really has.
        """
        n = len(chunk_ids)
        if self.fit_chunks is None or n <= self.fit_chunks:
            try:
                return self._compute(chunk_ids)
            except torch.cuda.OutOfMemoryError:
                if n == 1:
                    raise
                torch.cuda.empty_cache()
                self.fit_chunks = n - 1
        merged = {}  # a half may lack a shard the other has (no sampled token in it)
        for w in self._compute_fitting(chunk_ids[: n // 2]) + self._compute_fitting(chunk_ids[n // 2:]):
            key = (w.table.name, tuple(sorted(w.partitions.items())))
            merged[key] = dataclasses.replace(w, data=pa.concat_tables([merged[key].data, w.data])) if key in merged else w
        return list(merged.values())

    def _compute(self, chunk_ids: np.ndarray) -> list:
        """The shards (``Write``) every selected analysis's capture makes of this batch."""
        input_ids = self.chunks.ids(chunk_ids)
        ctx = {name: BatchContext(chunk_ids, input_ids, self.spec.n_layer, self.spec.d_mlp, self.cfg, self.parts.get(name),
                                  self.state.get(name)) for name in self.captures}
        options = {k: v for name, c in self.captures.items() if c.forward for k, v in c.forward(ctx[name]).items()}
        with torch.inference_mode():
            out = self.forward(input_ids, **options)
            return [w for name, c in self.captures.items() for w in c.reduce(dataclasses.replace(ctx[name], out=out))]

    def forward(self, input_ids: np.ndarray, **options) -> dict:
        """``forward_metrics`` on this actor's model and device: input_ids (B, T) -> its outputs (tensors)."""
        with torch.inference_mode():
            # torch.tensor copies: arrays from Ray's object store are read-only (as_tensor would warn)
            ids = torch.tensor(np.asarray(input_ids), dtype=torch.long, device=self.device)
            return forward_metrics(self.model, ids, final_hidden=self.cfg.final_hidden, **options)

    def apply(self, fn, *args, **kwargs):
        """Run ``fn(self, *args, **kwargs)`` in this actor, after its outstanding write: the one way the
        statistics stage gets what it needs from a model (an analysis's own function, e.g. hidden states)."""
        self.flush()
        return fn(self, *args, **kwargs)
