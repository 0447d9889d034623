"""What the driver checks and decides: inputs before Ray starts (``check_inputs``), then, once the corpus
stage has counted the tokens, the frozen ``Plan`` (chunks, batch size, each analysis's part, disk)."""
import os
import shutil
from dataclasses import dataclass

import numpy as np

from jobs import analyses
from jobs.analysis import PlanContext
from jobs.config import RunConfig
from jobs.corpus import CorpusIndex
from jobs.errors import UsageError
from jobs.manifest import read_manifest
from jobs.models import ModelSpec, load_tokenizer, resolve_model
from jobs.query import open_store
from jobs.replicas import parse_replicas, requested_counts
from jobs.sources import Source, resolve_source
from jobs.store import LEASE, Lease, Store, size_text
from probe_core.tokens import decode_table


def nearest_existing(path: str) -> str:
    """``path`` or its nearest ancestor that exists (a new --out is created below it)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


@dataclass(frozen=True)
class Inputs:
    """Every input, checked before Ray starts: no weights loaded, the corpus not yet tokenized."""

    cfg: RunConfig
    models: list[ModelSpec]
    source: Source
    tokenizer: object
    decode: list[str]
    parts: dict  # {analysis: its checked inputs} (``Analysis.inputs``)

    def describe(self) -> str:
        lines = [f"plan: run {self.cfg.run_id} -> {self.cfg.out}",
                 f"  data: {self.source.description} (tokenized on the cluster by the corpus stage)",
                 f"  analyses: {','.join(self.cfg.analyses)}"]
        for m in self.models:
            lines.append(f"  model {m.name}: {m.n_layer} layers, d={m.n_embd}, d_mlp={m.d_mlp}, ~{m.n_params / 1e6:.0f}M params")
        return "\n".join(lines)


@dataclass(frozen=True)
class Plan:
    """The run, decided once after the corpus stage and Ray's start; fixed for the run (and its resumes)."""

    cfg: RunConfig
    models: list[ModelSpec]
    corpus: CorpusIndex
    parts: dict  # {analysis: its part of the plan} (``Analysis.plan``), what its actors and tasks read
    batch_size: int

    @property
    def n_chunks(self) -> int:
        return self.corpus.n_chunks

    def batches(self) -> list[np.ndarray]:
        """Chunk indices per batch; fixed for a config, so part names are stable across resumes."""
        return [np.arange(i, min(i + self.batch_size, self.n_chunks)) for i in range(0, self.n_chunks, self.batch_size)]

    def disk_estimate(self) -> dict[str, int]:
        """Rough uncompressed bytes per model's tables (each analysis's ``disk_bytes``), and the corpus table's
        (Parquet with zstd usually writes less)."""
        chosen = [a for a in analyses.selected(self.cfg.analyses) if a.disk_bytes]
        return {"corpus": self.corpus.n_tokens * 40, **{m.name: sum(a.disk_bytes(self, m) for a in chosen) for m in self.models}}

    def describe(self) -> str:
        est, c = self.disk_estimate(), self.corpus
        lines = [
            f"  corpus: {c.n_rows} rows, {c.stream_tokens} tokens, {c.n_chunks} chunks of {c.chunk_tokens} "
            f"({c.stream_tokens - c.n_tokens} tail tokens dropped), {c.n_shards} shards",
            f"  batch size {self.batch_size} chunks",
        ]
        for m in self.models:
            lines.append(f"  model {m.name} writes ~{size_text(est[m.name])}")
        for a in analyses.selected(self.cfg.analyses):
            if a.describe:
                lines += a.describe(self, self.parts.get(a.name))
        lines.append(f"  disk: ~{size_text(sum(est.values()))} in all")
        return "\n".join(lines)


def check_local_out(out: str) -> None:
    """A local --out must be creatable: its nearest existing ancestor is a writable folder, not a file."""
    path = os.path.abspath(out)
    parent = nearest_existing(path)
    if parent != path and not os.path.isdir(parent):
        raise UsageError(f"--out {out} is below {parent}, which is a file: give a folder path")
    if os.path.isdir(parent) and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {parent} is not writable")


def check_output(cfg: RunConfig) -> Store:
    store = open_store(cfg.out, "--out")
    if store.is_local:
        check_local_out(store.root)
    info = store.info()
    if info.type.name == "File":
        raise UsageError(f"--out {cfg.out} is a file: give a folder for the run")
    Lease(store).check_free()  # a run in progress is named before any other complaint about the folder
    if cfg.resume:
        if not store.exists("manifest.json"):
            raise UsageError(f"--resume: {cfg.out} holds no run (no manifest.json); drop --resume to start one")
    elif store.exists("manifest.json"):
        run_id = read_manifest(store).get("run_id") or cfg.run_id  # the run's own id, not this call's fresh timestamp
        raise UsageError(f"--out {cfg.out} is an existing run: pass --resume --run-id {run_id} to finish it, or choose another --out")
    elif not store.is_empty_or_missing(ignore=(LEASE,)):  # a stale lease alone is no run
        raise UsageError(f"--out {cfg.out} is a folder that is not empty: choose a new folder")
    return store


def check_free_space(plan: Plan, store: Store) -> None:
    """A new run on a local --out must have room for what the plan estimates the models' tables take (the corpus
    stage has written the corpus already); checked here, after that stage, since the estimate needs the token count."""
    cfg = plan.cfg
    if cfg.no_space_check or cfg.resume or not store.is_local:
        return
    need = sum(v for k, v in plan.disk_estimate().items() if k != "corpus")
    where = nearest_existing(store.root)
    free = shutil.disk_usage(where).free
    if free < need:
        raise UsageError(f"--out {cfg.out}: its filesystem ({where}) has {size_text(free)} free, less than the ~{size_text(need)} the plan "
                         f"estimates this run will still write (checked after the corpus stage, before capture): free space, "
                         f"choose another --out, or pass --no-space-check")


def auto_batch_size(cfg: RunConfig, models: list[ModelSpec], on_gpu: bool = False) -> int:
    """Chunks per batch: --batch-size, else what keeps the stacked hidden states, (L + 1, B, T, d) in
    float32, which dominate a worker's memory, near 512 MiB on a CPU or 8 GiB on a GPU (a worker
    halves a batch that still does not fit its GPU's free memory)."""
    if cfg.batch_size:
        return cfg.batch_size
    budget = (8 if on_gpu else 0.5) * 2**30
    per_seq = max((m.n_layer + 1) * m.n_embd * cfg.chunk_tokens * 4 for m in models)
    return int(max(1, min(32 if on_gpu else 16, budget // per_seq)))


def check_inputs(cfg: RunConfig) -> Inputs:
    """Validate every input that can be checked without tokenizing the corpus; raises UsageError, loads no weights."""
    check_output(cfg)
    models = [resolve_model(m, cfg.allow_pickle) for m in cfg.models]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise UsageError(f"two models share a partition name ({', '.join(names)}): rename a folder")
    unknown = set(cfg.actor_resources) - set(names)
    if unknown:
        raise UsageError(f"--actor-resources names {sorted(unknown)}, which are not among the models {names}")
    requested_counts(names, parse_replicas(cfg.replicas))  # a JSON --replicas must name only these models
    for m in models:
        if cfg.chunk_tokens > m.n_positions:
            raise UsageError(f"--chunk-tokens {cfg.chunk_tokens} exceeds {m.name}'s n_positions {m.n_positions}: use at most {m.n_positions}")
    tokenizer = load_tokenizer(cfg.tokenizer or models[0].source)
    for m in models:
        if len(tokenizer) > m.vocab_size:
            raise UsageError(f"tokenizer has {len(tokenizer)} tokens but {m.name} only {m.vocab_size}: pass the matching --tokenizer")
    source = resolve_source(cfg.data, config=cfg.data_config, split=cfg.data_split, text_column=cfg.text_column)
    parts = {a.name: a.inputs(cfg, tokenizer, models) for a in analyses.selected(cfg.analyses) if a.inputs}
    return Inputs(cfg=cfg, models=models, source=source, tokenizer=tokenizer, decode=decode_table(tokenizer), parts=parts)


def make_plan(inputs: Inputs, corpus: CorpusIndex, store: Store, on_gpu: bool, batch_size: int | None = None) -> Plan:
    """Freeze the run: each selected analysis's ``plan`` (which may refuse the corpus: UsageError) and the batch
    size (a resumed run's own, else chosen from memory: ``auto_batch_size``)."""
    cfg = inputs.cfg
    parts = {a.name: a.plan(PlanContext(inputs, inputs.parts.get(a.name), corpus, store))
             for a in analyses.selected(cfg.analyses) if a.plan}
    return Plan(cfg=cfg, models=inputs.models, corpus=corpus, parts=parts,
                batch_size=batch_size or auto_batch_size(cfg, inputs.models, on_gpu))
