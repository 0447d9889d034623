"""What the driver checks and decides: inputs before Ray starts (``check_inputs``), then, once the corpus
stage has counted the tokens, the frozen ``Plan`` (chunks, sample, batch size, MI tokens, disk)."""
import os
from dataclasses import dataclass

import numpy as np

from jobs.config import RunConfig, UsageError
from jobs.corpus import CorpusIndex
from jobs.sources import read_sentences
from jobs.models import ModelSpec, load_tokenizer, resolve_model
from jobs.sources import Source, resolve_source
from jobs.replicas import parse_replicas, requested_counts
from jobs.store import LEASE, Lease, Store
from probe_core.tokens import decode_table

MI_DEFAULT_CHUNKS = 16  # --mi-tokens default for histogram MI, in chunks


def _size(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Inputs:
    """Every input, checked before Ray starts: no weights loaded, the corpus not yet tokenized."""

    cfg: RunConfig
    models: list[ModelSpec]
    source: Source
    tokenizer: object
    decode: list[str]
    target_id: int | None
    sentences: tuple[np.ndarray, np.ndarray] | None  # (ids, mask), right-padded with EOS

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
    target_id: int | None
    sentences: tuple[np.ndarray, np.ndarray] | None
    sample_keys: np.ndarray  # (n, 2) (chunk, pos) of the neuron sample, sorted
    sample_labels: np.ndarray  # (n,) bool
    batch_size: int
    mi_chunks: int  # leading chunks whose tokens feed MI
    mi_tokens: int

    @property
    def n_chunks(self) -> int:
        return self.corpus.n_chunks

    def batches(self) -> list[np.ndarray]:
        """Chunk indices per batch; fixed for a config, so part names are stable across resumes."""
        return [np.arange(i, min(i + self.batch_size, self.n_chunks)) for i in range(0, self.n_chunks, self.batch_size)]

    def disk_estimate(self) -> dict[str, int]:
        """Rough uncompressed bytes per model's tables (each analysis's ``disk_bytes``), and the corpus table's
        (Parquet with zstd usually writes less)."""
        from jobs import analyses

        chosen = analyses.selected(self.cfg.analyses)
        return {"corpus": self.corpus.n_tokens * 40, **{m.name: sum(a.disk_bytes(self, m) for a in chosen) for m in self.models}}

    def describe(self) -> str:
        est, c = self.disk_estimate(), self.corpus
        lines = [
            f"  corpus: {c.n_rows} rows, {c.stream_tokens} tokens, {c.n_chunks} chunks of {c.chunk_tokens} "
            f"({c.stream_tokens - c.n_tokens} tail tokens dropped), {c.n_shards} shards",
            f"  batch size {self.batch_size} chunks",
        ]
        for m in self.models:
            lines.append(f"  model {m.name} writes ~{_size(est[m.name])}")
        if "neurons" in self.cfg.analyses:
            acts = sum(len(self.sample_keys) * m.n_layer * m.d_mlp * 2 for m in self.models)
            held = f", chunk {self.n_chunks - 1} held out" if self.n_chunks > 1 else ""
            lines.append(f"  neurons: {len(self.sample_keys)} sampled tokens ({int(self.sample_labels.sum())} proper nouns{held}); "
                         f"activations (float16, every layer): {_size(acts)} in the object store and on disk")
        if "mi" in self.cfg.analyses:
            lines.append(f"  mi: {self.cfg.mi_method}, the first {self.mi_tokens} tokens ({self.mi_chunks} chunks)")
        lines.append(f"  disk: ~{_size(sum(est.values()))} in all")
        return "\n".join(lines)


def check_local_out(out: str) -> None:
    """A local --out must be creatable: its nearest existing ancestor is a writable folder, not a file."""
    path = os.path.abspath(out)
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent != path and not os.path.isdir(parent):
        raise UsageError(f"--out {out} is below {parent}, which is a file: give a folder path")
    if os.path.isdir(parent) and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {parent} is not writable")


def check_output(cfg: RunConfig) -> Store:
    from jobs.query import open_store

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
        raise UsageError(f"--out {cfg.out} is an existing run: pass --resume --run-id {cfg.run_id} to finish it, or choose another --out")
    elif not store.is_empty_or_missing(ignore=(LEASE,)):  # a stale lease alone is no run
        raise UsageError(f"--out {cfg.out} is a folder that is not empty: choose a new folder")
    return store


def auto_batch_size(cfg: RunConfig, models: list[ModelSpec], on_gpu: bool = False) -> int:
    """Chunks per batch: --batch-size, else what keeps the stacked hidden states, (L + 1, B, T, d) in
    float32, which dominate a worker's memory, near 512 MiB on a CPU or 8 GiB on a GPU (a worker
    halves a batch that still does not fit its GPU's free memory)."""
    if cfg.batch_size:
        return cfg.batch_size
    budget = (8 if on_gpu else 0.5) * 2**30
    per_seq = max((m.n_layer + 1) * m.n_embd * cfg.chunk_tokens * 4 for m in models)
    return int(max(1, min(32 if on_gpu else 16, budget // per_seq)))


def single_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise UsageError(f"--target {text!r} is {len(ids)} BPE tokens ({pieces}), not one: choose a single-token target such as ' her'")
    return ids[0]


def pad_sentences(tokenizer, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = tokenizer(sentences, add_special_tokens=False)["input_ids"]
    width = max(len(e) for e in encoded)
    ids = np.full((len(encoded), width), tokenizer.eos_token_id, dtype=np.int64)
    mask = np.zeros((len(encoded), width), dtype=np.int64)
    for i, e in enumerate(encoded):
        ids[i, : len(e)], mask[i, : len(e)] = e, 1
    return ids, mask


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
    target_id, sentences = None, None
    if "rotation" in cfg.analyses:
        target_id = single_token(tokenizer, cfg.target)
        if cfg.sentences:
            sentences = pad_sentences(tokenizer, read_sentences(cfg.sentences))
    return Inputs(cfg=cfg, models=models, source=source, tokenizer=tokenizer, decode=decode_table(tokenizer),
                  target_id=target_id, sentences=sentences)


def check_target(inputs: Inputs, corpus: CorpusIndex) -> None:
    """The rotation target must occur after another token, in the corpus or in --sentences."""
    if inputs.target_id is None:
        return
    in_sentences = inputs.sentences is not None and (inputs.sentences[0][:, 1:] == inputs.target_id).any()
    if not sum(corpus.target) and not in_sentences:
        raise UsageError(f"--target {inputs.cfg.target!r} never occurs after another token in the corpus: choose another target")


def make_plan(inputs: Inputs, corpus: CorpusIndex, sample: tuple[np.ndarray, np.ndarray] | None, on_gpu: bool,
              batch_size: int | None = None) -> Plan:
    """Freeze the run. sample: the neuron sample's (keys, labels) (``jobs.corpus.draw_sample``) or None;
    batch_size: a resumed run's own, else chosen from memory (``auto_batch_size``)."""
    cfg = inputs.cfg
    keys, labels = sample if sample is not None else (np.zeros((0, 2), np.int64), np.zeros(0, bool))
    # Histogram MI defaults to MI_DEFAULT_CHUNKS chunks: its plug-in bias falls as 1/N (about 0.12 bits at
    # 1024 tokens, 0.008 at 16,384), and its cost is linear in N. KSG is superlinear: one chunk.
    default_mi = MI_DEFAULT_CHUNKS * cfg.chunk_tokens if cfg.mi_method == "histogram" else cfg.chunk_tokens
    mi_tokens = min(cfg.mi_tokens or default_mi, corpus.n_tokens)
    return Plan(cfg=cfg, models=inputs.models, corpus=corpus, target_id=inputs.target_id, sentences=inputs.sentences,
                sample_keys=keys, sample_labels=labels,
                batch_size=batch_size or auto_batch_size(cfg, inputs.models, on_gpu),
                mi_chunks=-(-mi_tokens // cfg.chunk_tokens), mi_tokens=mi_tokens)
