"""Everything the driver checks and decides before any model loads: models, tokens, chunks, samples, disk."""
import os
from dataclasses import dataclass

import numpy as np

from jobs.config import RunConfig, UsageError
from jobs.data import Corpus, read_rows, read_sentences, tokenize_rows
from jobs.models import ModelSpec, load_tokenizer, resolve_model
from jobs.replicas import parse_replicas, requested_counts
from jobs.store import LEASE, Lease, Store
from probe_core.neurons import balanced_sample
from probe_core.tokens import chunk_stream, decode_table, proper_noun_labels_from_ids

MI_DEFAULT_CHUNKS = 16  # --mi-tokens default for histogram MI, in chunks


@dataclass
class Plan:
    cfg: RunConfig
    models: list[ModelSpec]
    corpus: Corpus
    chunks: np.ndarray  # (n_chunks, chunk_tokens) token ids
    chunk_rows: np.ndarray  # (n_chunks, chunk_tokens) source rows
    proper: np.ndarray  # (n_chunks, chunk_tokens) bool
    decode: list[str]
    target_id: int | None
    sample_keys: np.ndarray  # (n, 2) (chunk, pos) of the neuron sample, sorted
    sample_labels: np.ndarray  # (n,) bool
    sentences: tuple[np.ndarray, np.ndarray] | None  # (ids, mask), right-padded with EOS
    batch_size: int
    mi_chunks: int  # leading chunks whose tokens feed MI
    mi_tokens: int

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    def batches(self) -> list[np.ndarray]:
        """Chunk indices per batch; fixed for a config, so part names are stable across resumes."""
        return [np.arange(i, min(i + self.batch_size, self.n_chunks)) for i in range(0, self.n_chunks, self.batch_size)]

    def disk_estimate(self) -> dict[str, int]:
        """Rough uncompressed bytes per table (Parquet with zstd usually writes less)."""
        n_tok = self.chunks.size
        est = {}
        for m in self.models:
            a = set(self.cfg.analyses)
            est[m.name] = n_tok * (40 + 14 * m.n_layer)  # tokens + layer_metrics
            if "attn_ar" in a:
                est[m.name] += n_tok * 10 * m.n_layer
            if "neurons" in a:
                est[m.name] += len(self.sample_keys) * m.n_layer * (m.d_mlp * 2 + 12)
            if "mi" in a:
                est[m.name] += (m.n_layer + 1) * m.n_embd * (m.n_embd - 1) // 2 * 18
        return est

    def describe(self) -> str:
        gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"
        est = self.disk_estimate()
        lines = [
            f"plan: run {self.cfg.run_id} -> {self.cfg.out}",
            f"  data: {self.corpus.source}: {self.corpus.n_rows} rows, {len(self.corpus.token_ids)} tokens, "
            f"{self.n_chunks} chunks of {self.cfg.chunk_tokens} ({len(self.corpus.token_ids) - self.chunks.size} tail tokens dropped)",
            f"  analyses: {','.join(self.cfg.analyses)}; batch size {self.batch_size} (CPU default; more on GPUs)",
        ]
        for m in self.models:
            lines.append(f"  model {m.name}: {m.n_layer} layers, d={m.n_embd}, d_mlp={m.d_mlp}, ~{m.n_params / 1e6:.0f}M params, writes ~{gib(est[m.name])}")
        if "neurons" in self.cfg.analyses:
            acts = sum(len(self.sample_keys) * m.n_layer * m.d_mlp * 2 for m in self.models)
            held = f", chunk {self.n_chunks - 1} held out" if self.n_chunks > 1 else ""
            lines.append(f"  neurons: {len(self.sample_keys)} sampled tokens ({int(self.sample_labels.sum())} proper nouns{held}); "
                         f"activations (float16, every layer): {gib(acts)} in the object store and on disk")
        if "mi" in self.cfg.analyses:
            lines.append(f"  mi: {self.cfg.mi_method}, the first {self.mi_tokens} tokens ({self.mi_chunks} chunks)")
        lines.append(f"  disk: ~{gib(sum(est.values()))} in all")
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


def make_plan(cfg: RunConfig) -> Plan:
    """Validate every input and build the plan; raises UsageError on bad input, loads no weights."""
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
    corpus = tokenize_rows(read_rows(cfg.data), tokenizer, cfg.data, cfg.max_tokens)
    chunks = chunk_stream(corpus.token_ids, cfg.chunk_tokens)
    if len(chunks) == 0:
        raise UsageError(f"--data {cfg.data} has {len(corpus.token_ids)} tokens, fewer than one chunk of {cfg.chunk_tokens}: lower --chunk-tokens")
    decode = decode_table(tokenizer)
    proper = proper_noun_labels_from_ids(corpus.token_ids, decode)[: chunks.size].reshape(chunks.shape)
    target_id, sentences = None, None
    if "rotation" in cfg.analyses:
        target_id = single_token(tokenizer, cfg.target)
        if cfg.sentences:
            sentences = pad_sentences(tokenizer, read_sentences(cfg.sentences))
        occurs = (chunks[:, 1:] == target_id).any() or (sentences is not None and (sentences[0][:, 1:] == target_id).any())
        if not occurs:
            raise UsageError(f"--target {cfg.target!r} never occurs after another token in the corpus: choose another target")
    sample_keys, sample_labels = np.zeros((0, 2), np.int64), np.zeros(0, bool)
    if "neurons" in cfg.analyses:
        # With two or more chunks the last one stays out of the sample, so the token heatmap always has a
        # held-out chunk (a sample of 2,000 tokens drawn over a whole corpus touches nearly every chunk).
        flat = proper.ravel()[: (len(chunks) - 1) * cfg.chunk_tokens] if len(chunks) > 1 else proper.ravel()
        if flat.all() or not flat.any():
            raise UsageError("the corpus has no proper nouns (or only proper nouns): the neurons analysis needs both")
        idx = balanced_sample(flat, cfg.max_samples, cfg.seed)
        sample_keys = np.stack(np.divmod(idx, cfg.chunk_tokens), axis=1)
        sample_labels = flat[idx]
    # Histogram MI defaults to MI_DEFAULT_CHUNKS chunks: its plug-in bias falls as 1/N (about 0.12 bits at
    # 1024 tokens, 0.008 at 16,384), and its cost is linear in N. KSG is superlinear: one chunk.
    default_mi = MI_DEFAULT_CHUNKS * cfg.chunk_tokens if cfg.mi_method == "histogram" else cfg.chunk_tokens
    mi_tokens = min(cfg.mi_tokens or default_mi, chunks.size)
    return Plan(
        cfg=cfg, models=models, corpus=corpus, chunks=chunks,
        chunk_rows=corpus.rows[: chunks.size].reshape(chunks.shape), proper=proper, decode=decode,
        target_id=target_id, sample_keys=sample_keys, sample_labels=sample_labels, sentences=sentences,
        batch_size=auto_batch_size(cfg, models), mi_chunks=-(-mi_tokens // cfg.chunk_tokens), mi_tokens=mi_tokens,
    )
