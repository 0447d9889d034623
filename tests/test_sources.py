"""--data as ordered units (jobs.sources): every form's units give exactly the rows of the one-process reader."""
import os
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.errors import UsageError
from jobs.sources import read_sentences, read_unit, resolve_source
from tests import reference
from tests.corpus import write_corpus
from tests.s3server import s3_server


def unit_rows(source, text_column="text") -> list[str]:
    assert [u.index for u in source.units] == list(range(len(source.units)))
    return [row for u in source.units for row in read_unit(u, text_column)]


def files_rows(paths, text_column="text") -> list[str]:
    return [row for p in paths for row in reference.read_file_rows(str(p), text_column)]


def write_jsonl(path, texts, field="text"):
    import json

    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def write_parquet(path, texts, row_group_size=4, column="text"):
    pq.write_table(pa.table({column: texts, "n": list(range(len(texts)))}), path, row_group_size=row_group_size)
    return path


@pytest.fixture
def tree(tmp_path):
    """A folder of text files whose sorted order is not creation order, plus files a folder read must skip."""
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    files = [write_corpus(root / "b.txt", n_rows=7, seed=2), write_corpus(root / "b" / "a.txt", n_rows=5, seed=3),
             write_corpus(root / "a.raw", n_rows=6, seed=1)]
    (root / ".hidden.txt").write_text("never read\n")
    (root / "_SUCCESS").write_text("")
    (root / "_partial.txt").write_text("a bookkeeping file, never read\n")
    (root / "notes.md").write_text("not a corpus\n")
    # plain string order: 'a.raw' < 'b.txt' < 'b/a.txt' ('.' sorts before '/')
    return root, [files[2], files[0], files[1]]


def test_folder_glob_and_files_read_in_sorted_order(tree):
    root, ordered = tree
    expected = files_rows(ordered)
    assert len(expected) == 18
    folder = resolve_source(str(root))
    assert folder.files == tuple(ordered)
    assert unit_rows(folder) == expected == reference.read_rows(str(root))
    assert "3 .raw/.txt files under" in folder.description and "(3 units)" in folder.description
    deep = resolve_source(str(root / "**" / "*.txt"))
    assert deep.files == (ordered[1], ordered[2]) and unit_rows(deep) == files_rows(ordered[1:])
    shallow = resolve_source(str(root / "*.txt"))  # '*' does not cross '/'
    assert shallow.files == (ordered[1],)
    one = resolve_source(ordered[0])
    assert one.files == (ordered[0],) and unit_rows(one) == reference.read_text_file(ordered[0])
    assert len(folder.fingerprint) == 32 and int(folder.fingerprint, 16) >= 0


def test_jsonl_and_parquet_files_folders_and_column(tmp_path):
    texts = [" = Title = \r\n", "", " Mary met her friend . \n", None, " When Alice arrived . \n"] * 3
    j = tmp_path / "j"
    j.mkdir()
    write_jsonl(j / "2.jsonl", [t or "" for t in texts[:7]], field="body")
    write_jsonl(j / "1.jsonl", [t or "" for t in texts[7:]], field="body")
    src = resolve_source(str(j), text_column="body")
    assert [os.path.basename(f) for f in src.files] == ["1.jsonl", "2.jsonl"]
    assert unit_rows(src, "body") == files_rows(src.files, "body") == reference.read_rows(str(j), text_column="body")
    assert unit_rows(src, "body")[:2] == [" Mary met her friend . \n", ""]

    p = tmp_path / "p"
    p.mkdir()
    write_parquet(p / "a.parquet", texts, row_group_size=2)
    write_parquet(p / "b.parquet", texts[:3], row_group_size=2)
    expected = [(t or "").replace("\r\n", "\n") for t in texts + texts[:3]]
    assert reference.read_rows(str(p)) == expected
    for unit_bytes, n_units in ((1, 8 + 2), (10**9, 2)):  # one row group per unit, or one unit per file
        src = resolve_source(str(tmp_path / "p" / "*.parquet"), unit_bytes=unit_bytes)
        assert len(src.units) == n_units and unit_rows(src) == expected
    assert {(u.kind, u.file_index) for u in src.units} == {("parquet", 0), ("parquet", 1)}


TRICKY = ("\ufeff = Title = \r\n\r\n\n Mary met her friend in Zürich . \r\n \u00e9\u00e9 \u4e2d\u6587 \n"
          "   \n{\"x\": 1}\n last line without a newline").encode("utf-8")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_byte_range_units_equal_one_unit(tmp_path, suffix):
    if suffix == ".txt":
        raw = TRICKY
    else:
        import json

        lines = TRICKY.decode("utf-8-sig").split("\n")
        raw = b"\xef\xbb\xbf" + "\r\n".join(json.dumps({"text": t}) if t.strip() else t for t in lines).encode()
    path = tmp_path / f"c{suffix}"
    path.write_bytes(raw)
    whole = reference.read_rows(str(path))
    assert len(whole) == 8 and whole[1] in ("\n", "")
    newlines = {i + 1 for i, b in enumerate(raw) if b == ord("\n")}
    on_newline = 0
    # Every unit size: so every byte, among them each one just after a "\n" or between "\r" and "\n", is a boundary.
    for unit_bytes in range(1, len(raw) + 2):
        src = resolve_source(str(path), unit_bytes=unit_bytes)
        assert len(src.units) == -(-len(raw) // unit_bytes)
        assert unit_rows(src) == whole, unit_bytes
        on_newline += any(u.start in newlines for u in src.units)
    assert on_newline > 10
    if suffix == ".txt":
        assert whole[0] == " = Title = \n" and whole[-1] == " last line without a newline\n"


def test_bad_content_names_the_line_or_byte(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"good line\nsecond\nbad \xff byte\nlast\n")
    with pytest.raises(UsageError, match=r"c.txt: line 3 is not valid UTF-8"):
        reference.read_rows(str(path))
    units = resolve_source(str(path), unit_bytes=12).units
    with pytest.raises(UsageError, match=r"c.txt: the line at byte 17 is not valid UTF-8"):
        [read_unit(u) for u in units]
    j = tmp_path / "c.jsonl"
    j.write_bytes(b'{"text": "a"}\n{"text": "b"}\n[1]\n{"text": "c"}\n')
    with pytest.raises(UsageError, match="c.jsonl: line 3 is not a JSON object with a string 'text' field"):
        read_unit(resolve_source(str(j)).units[0])
    with pytest.raises(UsageError, match="c.jsonl: the line at byte 28 is not a JSON object"):
        [read_unit(u) for u in resolve_source(str(j), unit_bytes=20).units]
    with pytest.raises(UsageError, match="line 1 is not a JSON object with a string 'body'"):
        read_unit(resolve_source(str(j)).units[0], "body")


def test_damaged_parquet_page_in_a_unit(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": [open(write_corpus(tmp_path / "c.txt", n_rows=30)).read()] * 4}), good, compression="zstd")
    raw = bytearray(good.read_bytes())
    raw[10:200] = bytes(190)  # zero the first data page, keep the footer
    (tmp_path / "bad.parquet").write_bytes(bytes(raw))
    src = resolve_source(str(tmp_path / "bad.parquet"))  # the footer is fine: caught when the unit is read
    with pytest.raises(UsageError, match=r"bad.parquet: the 'text' column cannot be read \(row groups 0-0.*damaged"):
        read_unit(src.units[0])


def test_units_are_self_contained(tmp_path):
    """A task gets only the Unit and the column: it must pickle and read in a fresh process."""
    import multiprocessing

    path = write_corpus(tmp_path / "c.txt", n_rows=20)
    src = resolve_source(path, unit_bytes=300)
    assert pickle.loads(pickle.dumps(src.units[1])) == src.units[1]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        rows = pool.starmap(read_unit, [(u, "text") for u in src.units])
    assert [r for part in rows for r in part] == reference.read_text_file(path)


def test_sharded_parquet_and_text_on_s3_equal_local(tmp_path, monkeypatch):
    local = tmp_path / "local"
    (local / "part=b").mkdir(parents=True)
    corpus = open(write_corpus(tmp_path / "c.txt", n_rows=60)).read().splitlines(keepends=True)
    write_parquet(local / "part=b" / "x.parquet", corpus[:25], row_group_size=5)
    write_parquet(local / "a-0.parquet", corpus[25:40], row_group_size=4)
    write_parquet(local / "a-1.parquet", corpus[40:], row_group_size=6)
    expected = reference.read_rows(str(local))
    assert expected == corpus[25:] + corpus[:25]  # sorted: a-0, a-1, part=b/x
    with s3_server() as s3:
        for env in s3.env.items():
            monkeypatch.setenv(*env)
        for name in ("a-0.parquet", "a-1.parquet", "part=b/x.parquet"):
            pq.write_table(pq.read_table(local / name), s3.path(f"corpus/{name}"), filesystem=s3.filesystem, row_group_size=5)
        with s3.filesystem.open_output_stream(s3.path("corpus/_SUCCESS")):
            pass
        with s3.filesystem.open_output_stream(s3.path("texts/t.txt")) as f:
            f.write(TRICKY)
        src = resolve_source(s3.url("corpus"), unit_bytes=1)
        assert src.files == tuple(s3.url(f"corpus/{n}") for n in ("a-0.parquet", "a-1.parquet", "part=b/x.parquet"))
        assert len(src.units) == 3 + 4 + 5 and unit_rows(src) == expected
        assert "3 .parquet files under s3://" in src.description
        assert unit_rows(resolve_source(s3.url("corpus/**/*.parquet"))) == expected
        assert reference.read_rows(s3.url("corpus")) == expected
        (tmp_path / "t.txt").write_bytes(TRICKY)
        remote = resolve_source(s3.url("texts/t.txt"), unit_bytes=7)
        assert len(remote.units) > 5 and unit_rows(remote) == reference.read_text_file(str(tmp_path / "t.txt"))
        with pytest.raises(UsageError, match="no such file or folder"):
            resolve_source(s3.url("nothing/here"))


@pytest.fixture
def offline(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return datasets


TEXTS = [f" Row {i} : Mary met her friend .\r\n" if i % 4 else ("" if i % 8 else None) for i in range(40)]
EXPECTED = [(t or "").replace("\r\n", "\n") for t in TEXTS]


def dataset_folder(datasets, root):
    """Parquet shards in the hub's layout (data/<split>-NNNNN-of-NNNNN.parquet), as load_dataset(folder) reads them."""
    ds = datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(len(TEXTS)))})
    (root / "data").mkdir(parents=True)
    for i in range(3):
        ds.shard(3, i, contiguous=True).to_parquet(str(root / "data" / f"train-{i:05d}-of-00003.parquet"))
    ds.select(range(5)).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return str(root)


def test_dataset_folder_streams_shards_in_order(tmp_path, offline):
    folder = dataset_folder(offline, tmp_path / "ds")
    src = resolve_source(folder, split="train")
    assert [(u.kind, u.start, u.stop, u.shards, u.split) for u in src.units] == [("hub", i, i + 1, 3, "train") for i in range(3)]
    assert src.files == () and "streamed (3 shards)" in src.description
    assert unit_rows(src) == EXPECTED == reference.read_rows(folder, split="train")
    assert unit_rows(resolve_source(folder, split="test")) == EXPECTED[:5]
    assert resolve_source(folder, split="test").fingerprint != src.fingerprint
    with pytest.raises(UsageError, match="has no 'body' column"):
        resolve_source(folder, split="train", text_column="body")
    with pytest.raises(UsageError, match="column 'n' holds .*not strings"):
        resolve_source(folder, split="train", text_column="n")
    with pytest.raises(UsageError, match="cannot load dataset .*split nope"):
        resolve_source(folder, split="nope")


def test_saved_dataset_row_range_units(tmp_path, offline):
    ds = offline.Dataset.from_dict({"text": TEXTS})
    ds.save_to_disk(str(tmp_path / "saved"))
    src = resolve_source(str(tmp_path / "saved"), unit_bytes=200)
    assert len(src.units) > 2 and all(u.shards == 0 for u in src.units)
    assert unit_rows(src) == EXPECTED == reference.read_rows(str(tmp_path / "saved"))
    offline.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dict"))
    assert unit_rows(resolve_source(str(tmp_path / "dict"), split="test")) == EXPECTED[:3]
    with pytest.raises(UsageError, match="no split 'x'.*--data-split"):
        resolve_source(str(tmp_path / "dict"), split="x")


def test_wikitext_shorthand_and_hub_ids_go_through_load_dataset(tmp_path, offline, monkeypatch):
    folder = dataset_folder(offline, tmp_path / "ds")
    real, calls = offline.load_dataset, []

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return real(folder, split="train", streaming=streaming)

    monkeypatch.setattr(offline, "load_dataset", load_dataset)
    src = resolve_source("wikitext-2-raw-v1:validation")
    assert unit_rows(src) == EXPECTED
    assert calls[0] == ("Salesforce/wikitext", "wikitext-2-raw-v1", "validation", True)
    resolve_source("wikitext-103-raw-v1")
    resolve_source("owner/name", config="en")
    resolve_source("owner/name:validation")
    assert [c[:3] for c in calls if c[0] != "Salesforce/wikitext" or c[2] != "validation"] == [
        ("Salesforce/wikitext", "wikitext-103-raw-v1", "test"), ("owner/name", "en", "train"), ("owner/name", None, "validation")]
    with pytest.raises(UsageError, match="split 'test' but --data-split is 'train'"):
        resolve_source("wikitext-2-raw-v1:test", split="train")


def test_hub_dataset_offline_says_what_to_do(offline):
    with pytest.raises(UsageError, match="cannot load dataset owner/missing split train from the hub.*offline, pass a local file"):
        resolve_source("owner/missing")


def test_bad_inputs_are_one_line(tmp_path):
    def refused(spec, match, **kw):
        with pytest.raises(UsageError, match=match) as e:
            resolve_source(str(spec), **kw)
        assert "\n" not in str(e.value)

    refused(tmp_path / "missing.txt", "no such file or folder")
    refused(tmp_path / "missing" / "folder", "no such file or folder")
    refused(tmp_path / "*.txt", "the glob matches no .txt/.raw/.tokens, .jsonl or .parquet file")
    (tmp_path / "e.txt").write_bytes(b"")
    refused(tmp_path / "e.txt", "e.txt is empty")
    refused(tmp_path / "*.txt", "e.txt is empty")
    (tmp_path / "c.csv").write_text("text\nMary\n")
    refused(tmp_path / "c.csv", "unknown file type")
    empty = tmp_path / "folder"
    (empty / ".git").mkdir(parents=True)
    (empty / ".git" / "x.txt").write_text("hidden\n")
    (empty / "c.csv").write_text("text\nMary\n")
    refused(empty, r"the folder holds no .*file \(it holds 1 files of other types")
    (empty / "a.txt").write_text("Mary\n")
    (empty / "b.jsonl").write_text('{"text": "Mary"}\n')
    refused(empty, r"mixes file types \(.jsonl/.txt\)")
    refused(empty / "a.txt", "--data-config/--data-split apply to hub datasets", split="train")
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    refused(tmp_path / "x.parquet", "x.parquet is not a readable Parquet file")
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "y.parquet")
    refused(tmp_path / "y.parquet", "y.parquet has no 'text' column .*--text-column")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "z.parquet")
    refused(tmp_path / "z.parquet", "z.parquet: column 'text' holds int64, not strings")
    refused(tmp_path / "e.txt", "--text-column is empty", text_column="")


def test_new_flags_reach_the_config(capsys, tmp_path):
    from jobs.config import build_config

    cfg = build_config({"data": "owner/name", "data_config": "en", "data_split": "validation", "text_column": "body"})
    assert (cfg.data_config, cfg.data_split, cfg.text_column) == ("en", "validation", "body")
    assert main(["run", "--text-column", "", "--out", str(tmp_path / "never")]) == 2
    assert "--text-column is empty" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_read_sentences(tmp_path):
    path = tmp_path / "s.txt"
    path.write_bytes(b"\xef\xbb\xbfMary thanked her brother.\r\n\r\n  \nWhen John arrived, Alice called her.\nHer.")
    assert read_sentences(str(path)) == ["Mary thanked her brother.", "When John arrived, Alice called her.", "Her."]
    with pytest.raises(UsageError, match="no such file"):
        read_sentences(str(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(UsageError, match="has no sentences"):
        read_sentences(str(tmp_path / "blank.txt"))
