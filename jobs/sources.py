"""--data as an ordered list of units, each read by one task; the per-format readers; --sentences.

Conventions: the rows of all units concatenated in unit order are the corpus rows, exactly as one
process reading whole files reads them (``tests.reference.read_rows``). Text rows keep their ``\\n``
(as the hub's WikiText rows do), a leading UTF-8 BOM is dropped, CRLF is read as LF (also inside
.jsonl and column texts), a final empty line after the last ``\\n`` is not a row, blank rows are
rows, a missing column text (None) is "".
Files are read in sorted path order (plain string order of the full path or URI).
"""
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.errors import UsageError, one_line

UNIT_BYTES = 32 * 2**20  # text/jsonl files larger than this are split into byte ranges at line boundaries
BOM = b"\xef\xbb\xbf"
KINDS = {".txt": "text", ".raw": "text", ".tokens": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
# The WikiText shorthand: the canonical hub id (the bare "wikitext" is a redirect to it) and its config.
HUB_DATASETS = {"wikitext-2-raw-v1": ("Salesforce/wikitext", "wikitext-2-raw-v1"), "wikitext-103-raw-v1": ("Salesforce/wikitext", "wikitext-103-raw-v1")}
WIKITEXT_SPLIT = "test"  # the shorthand's split: the default --data is WikiText-2's test set
DEFAULT_SPLIT = "train"  # any other dataset: the split most datasets have (often the only one)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
GLOB_CHARS = "*?["
_SCAN = 1 << 16  # bytes read at a time while looking for a unit's first and last line end


@dataclass(frozen=True)
class Unit:
    """One ordered piece of the input, read by one task (``read_unit``)."""

    index: int  # position in source order, 0..n_units-1
    kind: str  # "text" (.txt/.raw/.tokens), "jsonl", "parquet" or "hub"
    path: str  # local path or URI of the file (hub: the dataset path/id or a local dataset folder)
    file_index: int  # index of the file in sorted order (hub: the shard index; save_to_disk: 0)
    start: int  # text/jsonl: first byte; parquet: first row group; hub: shard index or first row
    stop: int  # exclusive end in the same unit
    config: str | None = None  # hub: the dataset config (name)
    split: str | None = None  # hub: the split
    shards: int = 0  # hub: the streaming dataset's n_shards (start/stop are shards); 0: start/stop are rows of a save_to_disk folder


@dataclass(frozen=True)
class Source:
    spec: str  # --data as given
    description: str  # one line for the plan
    files: tuple[str, ...]  # sorted file paths/URIs (hub: ())
    units: tuple[Unit, ...]
    fingerprint: str  # identifies the input without reading it all, plus text_column; 32 hex chars


# ----------------------------------------------------------------------------------------------
# Per-format readers: one function per format, used for a unit (and for a whole file by tests.reference).


def decode_lines(raw: bytes, name: str, offset: int) -> tuple[list[str], list[int]]:
    """(lines without their line ends, file byte position of each) of ``raw``: the bytes of ``name`` from
    ``offset``, which is a line start. A BOM at byte 0 is dropped and CRLF read as LF.
    """
    numbered = offset == 0
    if numbered and raw.startswith(BOM):
        raw, offset = raw[len(BOM):], len(BOM)
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out, starts, at = [], [], offset
    for line in lines:
        try:
            out.append(line.removesuffix(b"\r").decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UsageError(f"{_where(name, numbered, len(out) + 1, at)} is not valid UTF-8 (byte {e.start} of the line): "
                             f"re-encode the file as UTF-8") from None
        starts.append(at)
        at += len(line) + 1
    return out, starts


def _where(name: str, numbered: bool, number: int, at: int) -> str:
    """The line number where the bytes start the file, else the line's byte offset: numbering the lines
    of a later byte range would mean reading the whole file before it."""
    return f"{name}: line {number}" if numbered else f"{name}: the line at byte {at}"


def text_rows(raw: bytes, name: str, offset: int = 0) -> list[str]:
    """Rows of a text file's bytes: one per line, each keeping its ``\\n``."""
    return [line + "\n" for line in decode_lines(raw, name, offset)[0]]


def jsonl_rows(raw: bytes, name: str, offset: int = 0, text_column: str = "text") -> list[str]:
    """Rows of a JSON-lines file's bytes: the string ``text_column`` field of each line's object (a blank line is a blank row)."""
    rows = []
    lines, starts = decode_lines(raw, name, offset)
    for number, (line, at) in enumerate(zip(lines, starts), start=1):
        if not line.strip():
            rows.append("")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{_where(name, offset == 0, number, at)} is not JSON ({e.msg}): a .jsonl file holds one JSON object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_column), str):
            raise UsageError(f"{_where(name, offset == 0, number, at)} is not a JSON object with a string {text_column!r} field")
        rows.append(normalise_newlines(obj[text_column]))
    return rows


def normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n") if "\r\n" in text else text


def column_rows(values, name: str, text_column: str) -> list[str]:
    """Rows of a text column (Parquet or a dataset): None is "", CRLF is LF; anything but strings is refused."""
    out = []
    for v in values:
        if v is None:
            out.append("")
        elif isinstance(v, str):
            out.append(normalise_newlines(v))
        else:
            raise UsageError(f"{name}: column {text_column!r} holds {type(v).__name__}, not strings")
    return out


def parquet_check(path: str, schema, text_column: str) -> None:
    """Refuse a Parquet schema without ``text_column`` or whose column is not strings."""
    if text_column not in schema.names:
        raise UsageError(f"{path} has no {text_column!r} column (columns: {', '.join(schema.names)}): pass --text-column")
    kind = schema.field(text_column).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise UsageError(f"{path}: column {text_column!r} holds {kind}, not strings")


def open_parquet(path: str, text_column: str):
    """A ``pyarrow.parquet.ParquetFile`` (footer read only), its schema checked; UsageError if unreadable."""
    fs, inner = filesystem(path)
    try:
        pf = pq.ParquetFile(inner, filesystem=fs)  # opened by pyarrow, so closing pf closes the file
    except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise UsageError(f"{path} is not a readable Parquet file: {one_line(e)}") from None
    parquet_check(path, pf.schema_arrow, text_column)
    return pf


def parquet_rows(path: str, text_column: str = "text", row_groups: range | None = None) -> list[str]:
    """Rows of a Parquet file's ``text_column`` (``row_groups``: those row groups only; default all)."""
    pf = open_parquet(path, text_column)
    groups = range(pf.metadata.num_row_groups) if row_groups is None else row_groups
    try:
        with pf:
            column = pf.read_row_groups(list(groups), columns=[text_column]).column(text_column)
    except Exception as e:  # corrupt pages or footers: pyarrow raises OSError, ArrowInvalid, ...
        part = "" if row_groups is None else f" (row groups {groups.start}-{groups.stop - 1})"
        raise UsageError(f"{path}: the {text_column!r} column cannot be read{part} ({one_line(e)[:200]}): the file is damaged") from None
    return column_rows(column.to_pylist(), path, text_column)


# ----------------------------------------------------------------------------------------------
# Files: local paths or pyarrow filesystem URIs.


def filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI such as ``s3://bucket/key``."""
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except Exception as e:
            raise UsageError(f"--data {path} cannot be opened: {one_line(e)}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _split_uri(spec: str) -> tuple[str, str, str]:
    """(scheme prefix like 's3://', path, '?query') of a URI; ('', path, '') for a local path."""
    if "://" not in spec:
        return "", spec, ""
    scheme, rest = spec.split("://", 1)
    rest, _, query = rest.partition("?")
    return scheme + "://", rest, ("?" + query if query else "")


def _skipped(relative: str) -> bool:
    """Hidden or bookkeeping files below the root (``.git``, ``_SUCCESS``): skipped, as pyarrow datasets do."""
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def kind_of(path: str) -> str | None:
    return KINDS.get(os.path.splitext(path.split("?", 1)[0])[1].lower())


def list_files(spec: str):
    """(sorted [(path or URI, FileInfo)], what, hidden) for a file, folder or glob; ``what`` says which of the three,
    ``hidden`` how many hidden or bookkeeping files were skipped."""
    prefix, path, query = _split_uri(spec)
    if any(c in path for c in GLOB_CHARS):
        first = min(path.index(c) for c in GLOB_CHARS if c in path)
        base = path[:first].rsplit("/", 1)[0] if "/" in path[:first] else ""
        if prefix:
            import fsspec.utils  # comes with datasets, not a dependency of its own; only remote globs need it

            fs, root = filesystem(prefix + base + query)
            pattern = re.compile(fsspec.utils.glob_translate(root.rstrip("/") + "/" + path[len(base):].lstrip("/")))
            try:
                infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
            except Exception as e:
                raise UsageError(f"--data {spec} cannot be listed: {one_line(e)}") from None
            found = [i for i in infos if i.type == pafs.FileType.File and pattern.match(i.path)]
        else:  # the local glob walks only what the pattern needs, never all of the base folder
            fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(base or "."))
            names = [os.path.abspath(p) for p in glob.glob(os.path.expanduser(path), recursive=True)]
            found = [i for i in fs.get_file_info(names) if i.type == pafs.FileType.File]
        kept = [i for i in found if not _skipped(i.path[len(root.rstrip("/")):])]
        return sorted((prefix + i.path + query, i) for i in kept), "glob", len(found) - len(kept)
    fs, inner = filesystem(spec)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.File:
        return [(spec if prefix else inner, info)], "file", 0
    if info.type == pafs.FileType.Directory:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True)) if i.type == pafs.FileType.File]
        root = inner.rstrip("/")
        found = [i for i in infos if not _skipped(i.path[len(root):])]
        return sorted((prefix + i.path + query, i) for i in found), "folder", len(infos) - len(found)
    return [], "missing", 0


def model_folder(paths) -> str | None:
    """The folder among ``paths`` that holds a ``config.json`` beside weights (a saved model), or None."""
    by_folder = {}
    for p in paths:
        folder, _, name = p.split("?", 1)[0].rpartition("/")
        by_folder.setdefault(folder, set()).add(name)
    for folder, names in sorted(by_folder.items()):
        if "config.json" in names and any(n.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json"))
                                          for n in names):
            return folder
    return None


def read_line_range(path: str, start: int, stop: int) -> tuple[bytes, int]:
    """(bytes, offset) of the lines of ``path`` that start in [start, stop): the byte range widened to line ends."""
    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as f:
        size = f.size()
        first = 0 if start == 0 else _line_end(f, start - 1, size)
        if first >= min(stop, size):
            return b"", first
        last = _line_end(f, stop - 1, size)
        return f.read_at(last - first, first), first


def _line_end(f, pos: int, size: int) -> int:
    """The position after the first ``\\n`` at or after ``pos`` (``size`` where there is none)."""
    while pos < size:
        block = f.read_at(min(_SCAN, size - pos), pos)
        hit = block.find(b"\n")
        if hit >= 0:
            return pos + hit + 1
        pos += len(block)
    return size


# ----------------------------------------------------------------------------------------------
# Hub datasets and dataset folders (through datasets).


def _is_saved_dataset(path: str) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with ``load_from_disk``)."""
    return "://" not in path and any(os.path.isfile(os.path.join(path, n)) for n in ("state.json", "dataset_dict.json"))


def hub_target(spec: str, config: str | None, split: str | None) -> tuple[str, str | None, str] | None:
    """(dataset path or id, config, split) where ``spec`` is read through ``datasets``, else None (files).

    Read through datasets: the WikiText shorthand (``name[:split]``, split ``test``); a local folder
    given with --data-config or --data-split, or written by ``save_to_disk``; and anything that is not
    a local path, not a URI, has no glob character and no file suffix, and looks like a hub id
    (``name`` or ``owner/name``, optionally ``:split``). Other datasets' split defaults to ``train``.
    """
    name, colon, inline = spec.partition(":")
    if inline and split and inline != split:
        raise UsageError(f"--data {spec} names split {inline!r} but --data-split is {split!r}: give one")
    if name in HUB_DATASETS and "/" not in spec:
        path, default = HUB_DATASETS[name]
        if config and config != default:
            raise UsageError(f"--data {name} is config {default!r} of {path}: drop --data-config or use --data {path}")
        return path, default, inline or split or WIKITEXT_SPLIT
    if os.path.isdir(spec) and (config or split or _is_saved_dataset(spec)):
        return os.path.abspath(spec), config, split or DEFAULT_SPLIT  # absolute: tasks run elsewhere
    if os.path.exists(spec) or "://" in spec or any(c in spec for c in GLOB_CHARS) or kind_of(spec):
        return None
    if colon and HUB_ID.match(name) or not colon and HUB_ID.match(spec):
        return name, config, inline or split or DEFAULT_SPLIT
    return None


def load_hub(path: str, config: str | None, split: str, streaming: bool):
    """The split as a datasets (Iterable)Dataset; UsageError saying what to do when it cannot be loaded."""
    try:
        import datasets  # about a second to import; only dataset ids and folders need it

        if _is_saved_dataset(path):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UsageError(f"--data {path} has no split {split!r} (splits: {', '.join(ds)}): pass --data-split")
                ds = ds[split]
            return ds
        if streaming:
            return datasets.load_dataset(path, config, split=split, streaming=True)
        return datasets.load_dataset(path, config, split=split)
    except UsageError:
        raise
    except Exception as e:
        where = f"{path}" + (f" config {config}" if config else "") + f" split {split}"
        if os.path.isdir(path):
            raise UsageError(f"cannot load dataset {where} ({one_line(e)[:200]})") from None
        # A mistyped local path also lands here (it looks like a hub id): say it is not local either.
        local = "" if path in {p for p, _ in HUB_DATASETS.values()} else ", and it is no local file or folder"
        raise UsageError(f"cannot load dataset {where} from the hub ({one_line(e)[:200]}){local}; "
                         f"offline, pass a local file, folder or glob: --data wiki.test.raw") from None


def _check_features(features, name: str, text_column: str) -> None:
    if features is None:  # not known before reading (some streaming builders): read_unit checks each value
        return
    if text_column not in features:
        raise UsageError(f"{name} has no {text_column!r} column (columns: {', '.join(features)}): pass --text-column")
    dtype = getattr(features[text_column], "dtype", None)
    if dtype not in ("string", "large_string", "string_view"):
        raise UsageError(f"{name}: column {text_column!r} holds {features[text_column]}, not strings")


def _hub_source(spec: str, path: str, config: str | None, split: str, text_column: str, unit_bytes: int) -> Source:
    ds = load_hub(path, config, split, streaming=True)
    where = f"{path}" + (f" ({config})" if config else "") + f" split {split}"
    _check_features(ds.features, f"--data {where}", text_column)
    facts = ["hub", path, config, split, text_column]
    if hasattr(ds, "n_shards"):  # streaming: shards are files, in order, opened by each task itself
        files = getattr(getattr(ds, "_ex_iterable", None), "kwargs", {}).get("files") or []
        facts += [_file_fact(f) for f in files] or [repr(ds.info)]
        units = tuple(Unit(i, "hub", path, i, i, i + 1, config, split, ds.n_shards) for i in range(ds.n_shards))
        description = f"dataset {where}, streamed ({ds.n_shards} shards)"
    else:  # a save_to_disk folder: memory-mapped, so row ranges are cheap to open anywhere the folder is
        n = len(ds)
        per = max(1, n * unit_bytes // max(1, ds.data.nbytes)) if ds.data.nbytes > unit_bytes else n
        units = tuple(Unit(k, "hub", path, 0, lo, min(n, lo + per), config, split, 0) for k, lo in enumerate(range(0, n, per)))
        facts += [ds._fingerprint, n]
        description = f"saved dataset {where} ({n} rows, {len(units)} units)"
    if not units:
        raise UsageError(f"--data {where} is empty")
    return Source(spec, description, (), units, _digest(facts))


def _file_fact(f: str):
    try:
        st = os.stat(f)  # local data files: their size and mtime; hub files are hf://...@<revision> URLs
        return [f, st.st_size, st.st_mtime_ns]
    except (OSError, ValueError, TypeError):
        return f


def _hub_rows(unit: Unit, text_column: str) -> list[str]:
    if unit.shards:
        ds = load_hub(unit.path, unit.config, unit.split, streaming=True)
        if ds.n_shards != unit.shards:
            raise UsageError(f"dataset {unit.path} now has {ds.n_shards} shards, not {unit.shards}: it changed during the run")
        rows = []
        for index in range(unit.start, unit.stop):
            shard = ds.shard(num_shards=ds.n_shards, index=index)
            if shard.features is not None and text_column in shard.features:
                shard = shard.select_columns([text_column])
            rows += column_rows((r.get(text_column) for r in shard), f"dataset {unit.path} shard {index}", text_column)
        return rows
    ds = load_hub(unit.path, unit.config, unit.split, streaming=False)
    return column_rows(ds.select(range(unit.start, unit.stop))[text_column], f"dataset {unit.path}", text_column)


# ----------------------------------------------------------------------------------------------


def _digest(facts) -> str:
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:32]


def _suffixes(paths) -> str:
    return "/".join(sorted({os.path.splitext(p.split("?", 1)[0])[1].lower() for p in paths}))


def resolve_source(data: str, *, config: str | None = None, split: str | None = None, text_column: str = "text",
                   unit_bytes: int = UNIT_BYTES) -> Source:
    """Check ``--data`` cheaply (listings, sizes, Parquet footers; nothing tokenized) and cut it into units."""
    if not text_column:
        raise UsageError("--text-column is empty")
    hub = hub_target(data, config, split)
    if hub:
        return _hub_source(data, *hub, text_column, unit_bytes)
    if config or split:
        raise UsageError(f"--data {data}: --data-config/--data-split apply to hub datasets and dataset folders, not to files")
    files, what, hidden = list_files(data)
    if what == "missing":
        raise UsageError(f"--data {data}: no such file or folder (or use wikitext-2-raw-v1[:split] or a hub dataset id)")
    if what == "file":
        if not kind_of(files[0][0]):
            # A .csv, .json or compressed file read as lines would be tokenized as if it were prose.
            raise UsageError(f"--data {data}: unknown file type: give .txt/.raw/.tokens (one row per line), "
                             f".jsonl (a {text_column!r} field per line) or .parquet (a {text_column!r} column)")
    else:
        others = [p for p, _ in files if not kind_of(p)]
        model = model_folder(p for p, _ in files)
        if model is not None:  # its merges.txt would be tokenized as a corpus
            raise UsageError(f"--data {data}: {model} is a model folder, not a corpus (config.json beside weights): "
                             f"pass it to --models, and the corpus to --data")
        files = [(p, i) for p, i in files if kind_of(p)]
        if not files:
            seen = f" (it holds {len(others)} files of other types, e.g. {others[0]})" if others else ""
            raise UsageError(f"--data {data}: {'the glob matches' if what == 'glob' else 'the folder holds'} no "
                             f".txt/.raw/.tokens, .jsonl or .parquet file{seen}")
    kinds = {kind_of(p) for p, _ in files}
    if len(kinds) > 1:
        # Likely a mistake (notes next to the data, two exports of one corpus): one format per --data.
        raise UsageError(f"--data {data} mixes file types ({_suffixes(p for p, _ in files)}): give one format per --data, "
                         f"e.g. a glob such as {data.rstrip('/')}/**/*.parquet")
    kind = kinds.pop()
    units, facts = [], ["files", text_column]
    for file_index, (path, info) in enumerate(files):
        if info.size == 0:
            raise UsageError(f"--data {path} is empty")
        facts.append([path, info.size, info.mtime_ns])
        if kind == "parquet":
            with open_parquet(path, text_column) as pf:
                meta = pf.metadata
            column = [c for c in range(meta.num_columns) if meta.schema.column(c).path.split(".")[0] == text_column]
            lo, size = 0, 0
            for g in range(meta.num_row_groups):
                size += sum(meta.row_group(g).column(c).total_compressed_size for c in column)
                if size >= unit_bytes or g == meta.num_row_groups - 1:
                    units.append((kind, path, file_index, lo, g + 1))
                    lo, size = g + 1, 0
            if meta.num_row_groups == 0:
                units.append((kind, path, file_index, 0, 0))
        else:
            units += [(kind, path, file_index, lo, min(info.size, lo + unit_bytes)) for lo in range(0, info.size, unit_bytes)]
    units = tuple(Unit(i, *u) for i, u in enumerate(units))
    n, paths = len(files), tuple(p for p, _ in files)
    what_text = f"{data}" if what == "file" else f"{'matching' if what == 'glob' else 'under'} {data}"
    description = f"{n} {_suffixes(paths)} file{'s' if n != 1 else ''} {what_text} ({len(units)} unit{'s' if len(units) != 1 else ''})"
    if what != "file":
        kinds = sorted({os.path.splitext(p.split("?", 1)[0])[1].lower() or "no suffix" for p in others})
        skipped = [f"{len(others)} of other types ({', '.join(kinds)})"] if others else []
        skipped += [f"{hidden} hidden or bookkeeping"] if hidden else []
        description += f"; skipped {' and '.join(skipped)}" if skipped else "; nothing skipped"
    return Source(data, description, paths, units, _digest(facts))


def read_unit(unit: Unit, text_column: str = "text") -> list[str]:
    """The rows of one unit, normalised as the module docstring says; bad content is a UsageError naming file and line."""
    if unit.kind == "parquet":
        return parquet_rows(unit.path, text_column, range(unit.start, unit.stop))
    if unit.kind in ("text", "jsonl"):
        raw, offset = read_line_range(unit.path, unit.start, unit.stop)
        if unit.kind == "text":
            return text_rows(raw, unit.path, offset)
        return jsonl_rows(raw, unit.path, offset, text_column)
    if unit.kind == "hub":
        return _hub_rows(unit, text_column)
    raise ValueError(f"unknown unit kind {unit.kind!r}")


def numbered_sentences(path: str) -> list[tuple[int, str]]:
    """--sentences FILE: (line number, sentence) of every non-blank line, so checks can name the line."""
    if not os.path.isfile(path):
        raise UsageError(f"--sentences {path}: no such file")
    with open(path, "rb") as f:
        sentences = [(n, r.rstrip("\n")) for n, r in enumerate(text_rows(f.read(), path), start=1) if r.strip()]
    if not sentences:
        raise UsageError(f"--sentences {path} has no sentences")
    return sentences


def read_sentences(path: str) -> list[str]:
    """--sentences FILE: one sentence per non-blank line."""
    return [s for _, s in numbered_sentences(path)]
