"""The corpus stage: read and tokenize ``--data`` in parallel on the cluster, write the ``corpus`` table once.

The token stream is exactly the one ``tests.reference.tokenize_rows`` builds in one process: every non-blank
row tokenized on its own, rows in source order, concatenated, cut into ``chunk_tokens`` chunks, the
incomplete tail dropped. It is built in two passes so that no process holds the whole stream:

1. Ray Data tokenizes the input's units (``jobs.sources``) in parallel; the blocks stay in the object
   store, and the driver keeps a few integers per unit (rows, tokens).
2. From those counts the driver knows where every unit's tokens land in the stream, and one Ray task
   per *shard* (``shard_chunks`` consecutive chunks) cuts its tokens out of the blocks it overlaps,
   labels proper nouns and writes ``corpus/shard=<s>/corpus.parquet``. Each task returns the shard's
   label counts and content digest; the driver keeps only those per-shard numbers.

Shards are fixed by ``chunk_tokens`` alone (``SHARD_TOKENS`` tokens each), so the table, the sample
drawn from the per-shard counts (``draw_sample``) and the digest do not depend on how many read tasks ran.
"""
import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.errors import UsageError
from jobs.progress import StageBar
from jobs.store import Store, Table
from probe_core.tokens import chunk_count, chunk_stream, proper_noun_labels_from_ids, vocab_flags

# Once per run, shared by every model; ``probe query`` joins it into the ``tokens`` view.
CORPUS = Table("corpus", pa.schema([
    ("chunk", pa.int32()), ("pos", pa.int32()), ("row", pa.int64()), ("token_id", pa.int32()),
    ("token", pa.string()), ("next_token_id", pa.int32()), ("is_proper_noun", pa.bool_()), ("source_file", pa.string()),
]), partitions=("shard",))
SHARD_TOKENS = 65_536  # tokens per corpus shard (rounded down to whole chunks): a ~1 MB Parquet file
INDEX = "_progress/corpus.json"  # the finished stage's per-shard counts: a resumed run skips the stage


def shard_chunks_for(chunk_tokens: int) -> int:
    return max(1, SHARD_TOKENS // chunk_tokens)


@dataclass(frozen=True)
class CorpusIndex:
    """What the driver keeps of the corpus: totals and per-shard counts, never the tokens.

    ``proper`` / ``other``: per shard, proper nouns and other tokens in the sampling range (every
    chunk but the last where there are two or more: the last is held out for the token heatmap).
    """

    source: str
    source_fingerprint: str
    n_rows: int
    stream_tokens: int  # tokens of the stream after --max-tokens, before the tail is dropped
    chunk_tokens: int
    n_chunks: int
    shard_chunks: int
    proper: tuple[int, ...]
    other: tuple[int, ...]
    digests: tuple[str, ...]

    @property
    def n_shards(self) -> int:
        return len(self.proper)

    @property
    def n_tokens(self) -> int:
        return self.n_chunks * self.chunk_tokens

    @property
    def fingerprint(self) -> str:
        """Content digest of the kept stream (token ids and rows), shard by shard."""
        return hashlib.sha256("".join(self.digests).encode()).hexdigest()[:32]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "CorpusIndex":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# --- pass 1: tokenize units (Ray Data map_batches) -------------------------------------------------

def tokenize_units(batch: pa.Table, units, tokenizer, text_column: str, block_rows: int = 4096) -> pa.Table:
    """Ray Data UDF: one output row per unit of ``batch["unit"]``.

    Columns: unit (int64), n_rows (int64, blank rows included), n_tokens (int64), ids (list<int32>, the
    unit's tokens in order), row (list<int32>, each token's row index within the unit), error (string:
    the one-line message of bad input in the unit, else null). Rows go through ``encode_rows`` in
    blocks. Bad input is returned, not raised, so the driver reports the first one in stream order as
    one line (a raised error would be logged with its traceback by Ray Data).
    """
    from jobs.sources import read_unit

    # One thread: a Ray task has one CPU, and the Rust tokenizer's own thread pool would fight the other tasks.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    out = {"unit": [], "n_rows": [], "n_tokens": [], "ids": [], "row": [], "error": []}
    for u in batch.column("unit").to_pylist():
        try:
            rows = read_unit(units[u], text_column)
            out["error"].append(None)
        except UsageError as e:
            rows = []
            out["error"].append(str(e))
        keep = [i for i, r in enumerate(rows) if r.strip()]
        ids, row_of = [], []
        for lo in range(0, len(keep), block_rows):
            block_ids, block_rows_of = encode_rows(rows, keep[lo: lo + block_rows], tokenizer)
            ids.append(block_ids)
            row_of.append(block_rows_of.astype(np.int32))
        ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        row_of = np.concatenate(row_of) if row_of else np.zeros(0, np.int32)
        out["unit"].append(u)
        out["n_rows"].append(len(rows))
        out["n_tokens"].append(len(ids))
        out["ids"].append(ids)
        out["row"].append(row_of)
    return pa.table({
        "unit": pa.array(out["unit"], pa.int64()), "n_rows": pa.array(out["n_rows"], pa.int64()),
        "n_tokens": pa.array(out["n_tokens"], pa.int64()),
        "ids": pa.array(out["ids"], pa.list_(pa.int32())), "row": pa.array(out["row"], pa.list_(pa.int32())),
        "error": pa.array(out["error"], pa.string()),
    })


def encode_rows(rows: list[str], which: list[int], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``rows[i]`` for i in ``which`` (one tokenizer call) -> (ids int32, row index int64 of each token).

    The tokenizer's Python lists cost tens of bytes a token, so they become int32 at once.
    """
    texts = [rows[i] for i in which]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast") and backend.padding is None and backend.truncation is None:
        # the Rust tokenizer that tokenizer(...) calls, minus what we discard: character offsets and
        # the attention-mask lists; the same ids
        encoded = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    else:
        encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    ids = np.fromiter((t for e in encoded for t in e), dtype=np.int32, count=int(lengths.sum()))
    return ids, np.repeat(np.asarray(which, dtype=np.int64), lengths)


def block_counts(block: pa.Table) -> tuple[list[int], list[int], list[int], list]:
    """(units, n_rows, n_tokens, errors) of one tokenized block: all the driver reads of pass 1."""
    return (block.column("unit").to_pylist(), block.column("n_rows").to_pylist(), block.column("n_tokens").to_pylist(),
            block.column("error").to_pylist())


# --- pass 2: one task per shard ----------------------------------------------------------------------

@dataclass(frozen=True)
class Vocab:
    """Per vocabulary id: decoded text and the proper-noun rule's flags (``probe_core.tokens.vocab_flags``)."""

    decode: pa.Array  # (V,) string: a shard's token column is one ``take``, no Python string per token
    looks_proper: np.ndarray  # (V,) bool
    ends_sentence: np.ndarray  # (V,) bool

    @classmethod
    def of(cls, decode: list[str]) -> "Vocab":
        return cls(pa.array(decode, pa.string()), *vocab_flags(decode))


def shard_table(ids: np.ndarray, rows: np.ndarray, files: np.ndarray, prev_id: int | None, first_chunk: int,
                chunk_tokens: int, vocab: Vocab, file_names: dict[int, str]) -> pa.Table:
    """The corpus rows of one shard: ids/rows/files (n,) of whole chunks, ``prev_id`` the stream's token
    before them (None at the stream's start, whose first token is never a proper noun)."""
    n, n_chunks = len(ids), chunk_count(len(ids), chunk_tokens)
    labels = proper_noun_labels_from_ids(ids, vocab.looks_proper, vocab.ends_sentence, prev_id)
    pos = np.tile(np.arange(chunk_tokens, dtype=np.int32), n_chunks)
    next_ids = np.zeros(n, np.int32)
    next_ids[:-1] = ids[1:]
    names = pa.array([file_names.get(i) for i in range(max(file_names) + 1)], pa.string())
    return pa.table({
        "chunk": np.repeat(np.arange(first_chunk, first_chunk + n_chunks, dtype=np.int32), chunk_tokens),
        "pos": pos, "row": rows.astype(np.int64), "token_id": ids.astype(np.int32), "token": vocab.decode.take(ids),
        "next_token_id": pa.array(next_ids, mask=pos == chunk_tokens - 1), "is_proper_noun": labels,
        "source_file": names.take(files),
    })


def write_shard(store_uri: str, shard: int, spans: list, blocks: list, has_prev: bool, first_chunk: int, chunk_tokens: int,
                vocab: Vocab, file_names: dict[int, str], sample_chunks: int) -> dict:
    """Cut one shard's tokens out of the tokenized blocks and write ``corpus/shard=<s>/corpus.parquet``.

    spans: for each overlapping unit in stream order, (block index in ``blocks``, row in that block,
    first token, end token, global row offset of the unit, file index). blocks: pyarrow blocks of pass 1.
    has_prev: the spans start one token early, with the stream's token before the shard (its label
    needs it). sample_chunks: chunks >= it are held out of the sample. Returns the shard's counts.
    """
    ids, rows, files = [], [], []
    for b, r, lo, hi, row_offset, file_index in spans:
        block = blocks[b]
        ids.append(block.column("ids")[r].values.to_numpy()[lo:hi])
        rows.append(block.column("row")[r].values.to_numpy()[lo:hi].astype(np.int64) + row_offset)
        files.append(np.full(hi - lo, file_index, np.int32))
    ids, rows, files = np.concatenate(ids).astype(np.int64), np.concatenate(rows), np.concatenate(files)
    prev_id = int(ids[0]) if has_prev else None
    if has_prev:
        ids, rows, files = ids[1:], rows[1:], files[1:]
    table = shard_table(ids, rows, files, prev_id, first_chunk, chunk_tokens, vocab, file_names)
    path = Store(store_uri).write_table(CORPUS, "corpus", table, shard=shard)
    return shard_stats(shard, table, sample_chunks, path)


def shard_stats(shard: int, table: pa.Table, sample_chunks: int, file: str = "") -> dict:
    chunk = table.column("chunk").to_numpy()
    label = table.column("is_proper_noun").to_numpy(zero_copy_only=False)
    in_sample = chunk < sample_chunks
    ids = table.column("token_id").to_numpy()
    digest = hashlib.sha256(ids.astype(np.int32).tobytes())
    digest.update(table.column("row").to_numpy().astype(np.int64).tobytes())
    return {"shard": shard, "rows": table.num_rows, "proper": int((label & in_sample).sum()),
            "other": int((~label & in_sample).sum()), "digest": digest.hexdigest(), "file": file}


# --- the stage ---------------------------------------------------------------------------------------

def run_corpus_stage(source, tokenizer, decode: list[str], cfg, store: Store,
                     read_tasks: int | None = None, log=print) -> CorpusIndex:
    """Tokenize ``source`` on the cluster and write the corpus table; returns the driver's index.

    A finished stage (``_progress/corpus.json``) is reused on --resume; otherwise shards whose marker
    verifies are kept and only the others are written. Raises UsageError for bad content in a unit, a
    corpus with no text or fewer tokens than one chunk (the caller then restores --out).
    read_tasks: at most this many tokenize tasks at once (default: Ray Data decides).
    """
    import ray
    import ray.data

    if cfg.resume and store.exists(INDEX):
        index = CorpusIndex.from_dict(store.read_json(INDEX))
        if index.source_fingerprint == source.fingerprint and index.chunk_tokens == cfg.chunk_tokens:
            log(f"[corpus] reusing the run's corpus table ({index.n_shards} shards)")
            return index
    # Ray Data logs every execution and its progress at INFO on the console; the stage prints its own lines.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ds = ray.data.from_items([{"unit": u.index} for u in source.units], override_num_blocks=len(source.units))
    # Ray Data reads, tokenizes and schedules; the units come from jobs.sources because read_text/read_json
    # neither number rows across files nor apply the BOM/CRLF/line-end rules that make the stream exact.
    # Each output row names its unit, so the blocks' order does not matter.
    tokenized = ds.map_batches(tokenize_units, batch_size=1, batch_format="pyarrow", num_cpus=1,
                               concurrency=read_tasks,
                               fn_kwargs={"units": source.units, "tokenizer": tokenizer, "text_column": cfg.text_column})
    # Streamed rather than materialized, so units are counted as their blocks arrive; the driver keeps the refs.
    blocks = []
    with StageBar("corpus", "units tokenized", len(source.units), "units") as bar:
        for bundle in tokenized.iter_internal_ref_bundles():
            blocks.extend(bundle.block_refs)
            bar.update(sum(m.num_rows or 0 for m in bundle.metadata))
    counts = ray.get([ray.remote(block_counts).remote(b) for b in blocks])
    n_units = len(source.units)
    where = np.zeros((n_units, 2), np.int64)  # (block, row in block) of each unit
    unit_rows, unit_tokens, errors = np.zeros(n_units, np.int64), np.zeros(n_units, np.int64), {}
    for b, (units, n_rows, n_tokens, errs) in enumerate(counts):
        for r, u in enumerate(units):
            where[u] = (b, r)
            unit_rows[u], unit_tokens[u] = n_rows[r], n_tokens[r]
            if errs[r]:
                errors[u] = errs[r]
    if errors:
        raise UsageError(errors[min(errors)])
    total = int(unit_tokens.sum())
    if total == 0:
        raise UsageError(f"--data {cfg.data} has no text (every row is blank)")
    stream = min(total, cfg.max_tokens) if cfg.max_tokens else total
    t = cfg.chunk_tokens
    n_chunks = chunk_count(stream, t)
    if n_chunks == 0:
        raise UsageError(f"--data {cfg.data} has {stream} tokens, fewer than one chunk of {t}: lower --chunk-tokens")
    token_start = np.concatenate([[0], np.cumsum(unit_tokens)])
    row_start = np.concatenate([[0], np.cumsum(unit_rows)])
    sc = shard_chunks_for(t)
    n_shards = -(-n_chunks // sc)
    sample_chunks = n_chunks - 1 if n_chunks > 1 else n_chunks
    file_names = [str(f) for f in (source.files or (source.spec,))]
    vocab_ref = ray.put(Vocab.of(decode))
    done = {}
    if cfg.resume:
        for part in store.verified_parts("_progress/corpus"):
            marker = store.read_json(f"_progress/corpus/{part}.json")
            if marker.get("source_fingerprint") == source.fingerprint and marker.get("chunk_tokens") == t:
                done[int(marker["shard"])] = marker
    task = ray.remote(num_cpus=1)(write_shard_marked)
    pending = []
    for s in range(n_shards):
        if s in done:
            continue
        a, b = s * sc * t, min((s + 1) * sc * t, n_chunks * t)
        a0 = max(a - 1, 0)  # one token early: the first token's label needs its predecessor
        spans, refs, ref_index, names = [], [], {}, {}
        for u in range(np.searchsorted(token_start, a0, "right") - 1, np.searchsorted(token_start, b, "left")):
            lo, hi = max(a0, token_start[u]) - token_start[u], min(b, token_start[u + 1]) - token_start[u]
            if hi <= lo:
                continue
            blk = int(where[u, 0])
            if blk not in ref_index:
                ref_index[blk] = len(refs)
                refs.append(blocks[blk])
            f = source.units[u].file_index
            names[f] = file_names[f] if f < len(file_names) else source.spec
            spans.append((ref_index[blk], int(where[u, 1]), int(lo), int(hi), int(row_start[u]), f))
        pending.append(task.remote(store.uri, s, spans, a > 0, s * sc, t, vocab_ref, names, sample_chunks,
                                   source.fingerprint, *refs))
    if done:
        log(f"[corpus] {len(done)} of {n_shards} shards already written, skipped")
    stats = dict(done)
    with StageBar("corpus", "shards written", n_shards, "shards", initial=len(done)) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            stats.update((r["shard"], r) for r in ray.get(ready))
            bar.update(len(ready))
    ordered = [stats[s] for s in range(n_shards)]
    index = CorpusIndex(
        source=source.spec, source_fingerprint=source.fingerprint, n_rows=int(unit_rows.sum()), stream_tokens=stream,
        chunk_tokens=t, n_chunks=n_chunks, shard_chunks=sc,
        proper=tuple(int(x["proper"]) for x in ordered), other=tuple(int(x["other"]) for x in ordered),
        digests=tuple(x["digest"] for x in ordered))
    store.write_json(INDEX, index.to_dict())
    return index


def write_shard_marked(store_uri, shard, spans, has_prev, first_chunk, chunk_tokens, vocab, file_names, sample_chunks,
                       source_fingerprint, *blocks) -> dict:
    """``write_shard``, then its marker (shard file and rows, and the counts a resumed run reuses)."""
    stats = write_shard(store_uri, shard, spans, list(blocks), has_prev, first_chunk, chunk_tokens, vocab, file_names,
                        sample_chunks)
    store = Store(store_uri)
    rel = stats.pop("file")[len(store.root):].lstrip("/")
    marker = {**stats, "shards": {rel: stats["rows"]}, "source_fingerprint": source_fingerprint, "chunk_tokens": chunk_tokens}
    store.write_json(f"_progress/corpus/shard-{shard:06d}.json", marker)
    return marker


# --- reading chunks back -------------------------------------------------------------------------------

class CorpusReader:
    """Token ids of chunks, read from the corpus table by whoever needs them (model actors).

    Picklable (it holds the run folder's URI), so the object store carries chunk ranges, never the stream.
    The last shards read are cached: consecutive batches of one actor mostly fall in one shard.
    """

    def __init__(self, store_uri: str, chunk_tokens: int, shard_chunks: int, cache_shards: int = 2):
        self.store_uri, self.chunk_tokens, self.shard_chunks, self.cache_shards = store_uri, chunk_tokens, shard_chunks, cache_shards
        self._store, self._cache = None, {}

    def __reduce__(self):
        return (CorpusReader, (self.store_uri, self.chunk_tokens, self.shard_chunks, self.cache_shards))

    def _shard(self, s: int) -> np.ndarray:
        if s not in self._cache:
            if self._store is None:
                self._store = Store(self.store_uri)
            folder = self._store.table_dir(CORPUS, shard=s)
            table = pq.read_table(f"{folder}/corpus.parquet", columns=["chunk", "pos", "token_id"], filesystem=self._store.fs)
            table = table.sort_by([("chunk", "ascending"), ("pos", "ascending")])
            ids = chunk_stream(table.column("token_id").to_numpy().astype(np.int64), self.chunk_tokens)
            while len(self._cache) >= self.cache_shards:
                self._cache.pop(next(iter(self._cache)))
            self._cache[s] = ids
        return self._cache[s]

    def ids(self, chunks) -> np.ndarray:
        """(B,) chunk indices -> (B, T) int64 token ids."""
        chunks = np.asarray(chunks, dtype=np.int64)
        out = np.empty((len(chunks), self.chunk_tokens), np.int64)
        for s in np.unique(chunks // self.shard_chunks):
            sel = chunks // self.shard_chunks == s
            out[sel] = self._shard(int(s))[chunks[sel] - s * self.shard_chunks]
        return out


class ArrayChunks:
    """In-memory chunk source with CorpusReader's interface: tests and benchmarks drive a worker with it."""

    def __init__(self, chunks: np.ndarray):
        self.chunks = np.asarray(chunks)

    def ids(self, chunks) -> np.ndarray:
        return self.chunks[np.asarray(chunks, dtype=np.int64)].astype(np.int64)


# --- samples -------------------------------------------------------------------------------------------

def sample_shard(store_uri: str, shard: int, k_proper: int, k_other: int, sample_chunks: int, seed: int) -> np.ndarray:
    """Ray task: one shard's share of the sample (``probe_core.neurons.draw_in_shard``) as (k_proper + k_other, 3)
    int64 rows (chunk, pos, label); chunks >= sample_chunks are held out."""
    from probe_core.neurons import draw_in_shard  # here, not at the top: it imports torch, which tokenize workers never need

    store = Store(store_uri)
    table = pq.read_table(f"{store.table_dir(CORPUS, shard=shard)}/corpus.parquet", columns=["chunk", "pos", "is_proper_noun"],
                          filesystem=store.fs).sort_by([("chunk", "ascending"), ("pos", "ascending")])
    chunk, pos = table.column("chunk").to_numpy(), table.column("pos").to_numpy()
    label = table.column("is_proper_noun").to_numpy(zero_copy_only=False)
    picked = draw_in_shard(label, chunk < sample_chunks, k_proper, k_other, seed, shard)
    return np.stack([chunk[picked], pos[picked], np.r_[np.ones(k_proper), np.zeros(k_other)]], axis=1).astype(np.int64)


def draw_sample(index: CorpusIndex, store: Store, max_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The neuron sample: (n, 2) (chunk, pos) keys sorted, and their (n,) bool labels.

    A uniform random k-subset of each class over the sampling range (``probe_core.neurons.sample_allocation``
    on the per-shard counts, then one task per shard), the same whatever the read tasks, batch size or replicas.
    """
    import ray

    from probe_core.neurons import sample_allocation

    if sum(index.proper) == 0 or sum(index.other) == 0:
        raise UsageError("the corpus has no proper nouns (or only proper nouns): the neurons analysis needs both")
    k_proper, k_other = sample_allocation(index.proper, index.other, max_samples, seed)
    sample_chunks = index.n_chunks - 1 if index.n_chunks > 1 else index.n_chunks
    task = ray.remote(num_cpus=1)(sample_shard)
    parts = ray.get([task.remote(store.uri, s, int(k_proper[s]), int(k_other[s]), sample_chunks, seed)
                     for s in range(index.n_shards) if k_proper[s] + k_other[s]])
    rows = np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)
    rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]
    return rows[:, :2].copy(), rows[:, 2].astype(bool)
