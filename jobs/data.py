"""Corpus input: rows of text from the hub dataset, a local text file or a Parquet file; one token stream."""
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from jobs.config import UsageError

# The canonical hub id (the bare "wikitext" is a redirect to it).
HUB_DATASETS = {"wikitext-2-raw-v1": ("Salesforce/wikitext", "wikitext-2-raw-v1"), "wikitext-103-raw-v1": ("Salesforce/wikitext", "wikitext-103-raw-v1")}
TEXT_SUFFIXES = (".txt", ".raw", ".tokens")


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


BOM = b"\xef\xbb\xbf"


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 file without their line ends; a leading BOM is dropped and CRLF read as LF."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            out.append(line.removesuffix(b"\r").decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}: line {number} is not valid UTF-8 (byte {e.start}): re-encode the file as UTF-8") from None
    return out


def read_text_file(path: str) -> list[str]:
    """Rows of a UTF-8 text file, one per line, each keeping its ``\\n`` as the hub's WikiText rows do."""
    return [line + "\n" for line in read_lines(path)]


def read_jsonl_rows(path: str) -> list[str]:
    """Rows of a JSON-lines file: the string ``text`` of each line's object (a blank line is a blank row)."""
    rows = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            rows.append("")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: line {number} is not JSON ({e.msg}): a .jsonl file holds one JSON object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UsageError(f"{path}: line {number} is not a JSON object with a string 'text' field")
        rows.append(normalise_newlines(obj["text"]))
    return rows


def normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n") if "\r\n" in text else text


def read_parquet_rows(path: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise UsageError(f"{path} is not a readable Parquet file: {e}") from None
    if "text" not in schema.names:
        raise UsageError(f"{path} has no 'text' column (columns: {', '.join(schema.names)})")
    kind = schema.field("text").type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise UsageError(f"{path}: column 'text' holds {kind}, not strings")
    try:
        column = pq.read_table(path, columns=["text"]).column("text")
    except Exception as e:  # corrupt pages or footers: pyarrow raises OSError, ArrowInvalid, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{path}: the 'text' column cannot be read ({first[:200]}): the file is damaged") from None
    return [normalise_newlines(t) if t else "" for t in column.to_pylist()]


def read_hub_rows(spec: str) -> list[str]:
    name, _, split = spec.partition(":")
    split = split or "test"
    path, config = HUB_DATASETS[name]
    try:
        import datasets

        ds = datasets.load_dataset(path, config, split=split)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"cannot load dataset {name}:{split} from the hub ({first}); offline, pass a local file: --data wiki.test.raw"
        ) from None
    return list(ds["text"])


def read_rows(spec: str) -> list[str]:
    """Rows of text for a --data value (see ``probe run --help``)."""
    if spec.split(":")[0] in HUB_DATASETS:
        return read_hub_rows(spec)
    if not os.path.exists(spec):
        raise UsageError(f"--data {spec}: no such file (or use wikitext-2-raw-v1[:split])")
    if os.path.isdir(spec):
        raise UsageError(f"--data {spec} is a folder: give a .txt/.raw file or a Parquet file with a 'text' column")
    if os.path.getsize(spec) == 0:
        raise UsageError(f"--data {spec} is empty")
    if spec.endswith(".parquet"):
        return read_parquet_rows(spec)
    if spec.endswith(".jsonl"):
        return read_jsonl_rows(spec)
    if not spec.endswith(TEXT_SUFFIXES):
        # A .csv, .json or compressed file read as lines would be tokenized as if it were prose.
        raise UsageError(f"--data {spec}: unknown file type: give {'/'.join(TEXT_SUFFIXES)} (one row per line), "
                         f".jsonl (a 'text' field per line) or .parquet (a 'text' column)")
    return read_text_file(spec)


def tokenize_rows(rows: list[str], tokenizer, source: str, max_tokens: int | None = None, block_rows: int = 4096) -> Corpus:
    """Tokenize each non-blank row once and concatenate into one stream, as the notebooks do.

    Rows go through the tokenizer in blocks, each turned into int32 at once: the tokenizer's Python
    lists cost tens of bytes a token, so holding them for a whole corpus would dominate the driver.
    """
    keep = [i for i, r in enumerate(rows) if r.strip()]
    if not keep:
        raise UsageError(f"--data {source} has no text (every row is blank)")
    ids, row_of, total = [], [], 0
    for lo in range(0, len(keep), block_rows):
        block = keep[lo: lo + block_rows]
        encoded = tokenizer([rows[i] for i in block], add_special_tokens=False)["input_ids"]
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        ids.append(np.fromiter((t for e in encoded for t in e), dtype=np.int32, count=int(lengths.sum())))
        row_of.append(np.repeat(np.asarray(block, dtype=np.int64), lengths))
        total += int(lengths.sum())
        if max_tokens is not None and total >= max_tokens:
            break
    token_ids, row_of = np.concatenate(ids), np.concatenate(row_of)
    if max_tokens is not None:
        token_ids, row_of = token_ids[:max_tokens], row_of[:max_tokens]
    return Corpus(token_ids=token_ids, rows=row_of, n_rows=len(rows), source=source)


def read_sentences(path: str) -> list[str]:
    """--sentences FILE: one sentence per non-blank line."""
    if not os.path.isfile(path):
        raise UsageError(f"--sentences {path}: no such file")
    sentences = [r.rstrip("\n") for r in read_text_file(path) if r.strip()]
    if not sentences:
        raise UsageError(f"--sentences {path} has no sentences")
    return sentences
