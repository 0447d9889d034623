"""The single-process reference the corpus stage is compared with: every --data form read whole in one
process (through the same per-format readers as the units of ``jobs.sources``) and tokenized into one stream."""
import hashlib
from dataclasses import dataclass

import numpy as np

from jobs import sources
from jobs.corpus import encode_rows
from jobs.errors import UsageError


@dataclass(frozen=True)
class Corpus:
    """The tokenized corpus: ``token_ids`` (n,) int32 and ``rows`` (n,) int64, the source row of each token."""

    token_ids: np.ndarray
    rows: np.ndarray
    n_rows: int
    source: str

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.token_ids.tobytes())
        digest.update(self.rows.tobytes())
        return digest.hexdigest()[:32]


def read_bytes(path: str) -> bytes:
    """The whole file (a local path or a pyarrow URI)."""
    fs, inner = sources.filesystem(path)
    with fs.open_input_file(inner) as f:
        return f.read()


def read_text_file(path: str) -> list[str]:
    """Rows of a UTF-8 text file, one per line, each keeping its ``\\n`` as the hub's WikiText rows do."""
    return sources.text_rows(read_bytes(path), path)


def read_file_rows(path: str, text_column: str = "text") -> list[str]:
    """Rows of one whole .txt/.raw/.tokens, .jsonl or .parquet file, through the same per-format readers as the units."""
    kind = sources.kind_of(path)
    if kind == "parquet":
        return sources.parquet_rows(path, text_column)
    if kind == "jsonl":
        return sources.jsonl_rows(read_bytes(path), path, 0, text_column)
    return read_text_file(path)


def read_rows(spec: str, *, config: str | None = None, split: str | None = None, text_column: str = "text") -> list[str]:
    """Rows of text for a --data value (see ``probe run --help``), read in one process: whole files in
    sorted order, or the whole dataset split (not streamed). The reference the unit readers must match."""
    hub = sources.hub_target(spec, config, split)
    if hub:
        ds = sources.load_hub(*hub, streaming=False)
        try:
            values = ds[text_column]
        except KeyError:
            raise UsageError(f"--data {spec} has no {text_column!r} column: pass --text-column") from None
        return sources.column_rows(values, f"--data {spec}", text_column)
    source = sources.resolve_source(spec, config=config, split=split, text_column=text_column)
    return [row for path in source.files for row in read_file_rows(path, text_column)]


def tokenize_rows(rows: list[str], tokenizer, source: str, max_tokens: int | None = None, block_rows: int = 4096) -> Corpus:
    """Tokenize each non-blank row once and concatenate into one stream, as the notebooks do.

    Rows go through the tokenizer in blocks, each turned into int32 at once: the tokenizer's Python
    lists cost tens of bytes a token, so holding them for a whole corpus would dominate the process.
    """
    keep = [i for i, r in enumerate(rows) if r.strip()]
    if not keep:
        raise UsageError(f"--data {source} has no text (every row is blank)")
    ids, row_of, total = [], [], 0
    for lo in range(0, len(keep), block_rows):
        block_ids, block_rows_of = encode_rows(rows, keep[lo: lo + block_rows], tokenizer)
        ids.append(block_ids)
        row_of.append(block_rows_of)
        total += len(block_ids)
        if max_tokens is not None and total >= max_tokens:
            break
    token_ids, row_of = np.concatenate(ids), np.concatenate(row_of)
    if max_tokens is not None:
        token_ids, row_of = token_ids[:max_tokens], row_of[:max_tokens]
    return Corpus(token_ids=token_ids, rows=row_of, n_rows=len(rows), source=source)
