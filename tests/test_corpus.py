"""The corpus stage on Ray Data against the single-process stream (``tests.reference``), its shards, its
sample and its resume."""
import os

import numpy as np
import polars as pl
import pytest

from jobs import corpus as stage
from jobs.config import RunConfig
from jobs.errors import UsageError
from jobs.sources import resolve_source
from jobs.store import Store
from probe_core.tokens import chunk_stream, decode_table, proper_noun_labels
from tests.corpus import write_corpus
from tests.reference import read_rows, tokenize_rows

pytestmark = pytest.mark.slow  # the corpus stage on Ray Data

CHUNK = 16


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three text files in a folder (one with a BOM and CRLF line ends, blank lines), read in sorted order."""
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "texts"
    folder.mkdir()
    write_corpus(folder / "b.txt", n_rows=12, seed=1)
    write_corpus(folder / "a.txt", n_rows=9, seed=2)
    text = open(write_corpus(root / "c-src.txt", n_rows=15, seed=3), encoding="utf-8").read()
    text = text.replace("\n", "\r\n", 5).replace("\r\n", "\r\n\r\n", 2)
    (folder / "c.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    return folder


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(stage, "SHARD_TOKENS", 3 * CHUNK)  # 3 chunks a shard: several shards on a small corpus


def config(data, out, **kw) -> RunConfig:
    return RunConfig(models=("unused",), data=str(data), out=str(out), chunk_tokens=CHUNK, **kw)


def reference(paths, tokenizer, max_tokens=None):
    """The single-process stream: rows of every file in sorted order, tokenized, chunked, labelled."""
    rows = [r for p in sorted(paths) for r in read_rows(str(p))]
    corpus = tokenize_rows(rows, tokenizer, "ref", max_tokens)
    chunks = chunk_stream(corpus.token_ids, CHUNK)
    decode = decode_table(tokenizer)
    labels = proper_noun_labels([decode[i] for i in corpus.token_ids])[: chunks.size]
    return chunks, corpus.rows[: chunks.size], labels, len(rows)


def run_stage(cfg, tokenizer, unit_bytes=2**20, read_tasks=None):
    source = resolve_source(cfg.data, text_column=cfg.text_column, unit_bytes=unit_bytes)
    store = Store(cfg.out)
    index = stage.run_corpus_stage(source, tokenizer, decode_table(tokenizer), cfg, store, read_tasks=read_tasks, log=lambda m: None)
    return source, store, index


def corpus_table(store) -> pl.DataFrame:
    return pl.read_parquet(store.list_files("corpus")).sort("chunk", "pos")


@pytest.mark.parametrize("max_tokens", [None, 7 * CHUNK + 5])
def test_stage_equals_single_process_stream(ray_local, files, gpt2_tokenizer, tmp_path, small_shards, max_tokens):
    cfg = config(files, tmp_path / "run", max_tokens=max_tokens)
    source, store, index = run_stage(cfg, gpt2_tokenizer, unit_bytes=300)  # several byte-range units per file
    assert len(source.units) > len(source.files) == 3
    chunks, rows, labels, n_rows = reference(list(files.iterdir()), gpt2_tokenizer, max_tokens)
    got = corpus_table(store)
    assert got["token_id"].to_numpy().tolist() == chunks.ravel().tolist()
    assert got["row"].to_numpy().tolist() == rows.tolist()
    assert got["is_proper_noun"].to_list() == labels.tolist()
    assert got["chunk"].to_numpy().tolist() == np.repeat(np.arange(len(chunks)), CHUNK).tolist()
    assert got["pos"].to_numpy().tolist() == np.tile(np.arange(CHUNK), len(chunks)).tolist()
    nxt = got["next_token_id"].to_numpy().reshape(-1, CHUNK)
    assert (nxt[:, :-1] == chunks[:, 1:]).all() and got.filter(pl.col("pos") == CHUNK - 1)["next_token_id"].null_count() == len(chunks)
    decode = decode_table(gpt2_tokenizer)
    assert got["token"].to_list() == [decode[i] for i in chunks.ravel()]
    # Rows are numbered over the files in sorted order: a.txt's rows first.
    in_b = got.filter(pl.col("source_file").str.ends_with("b.txt"))
    if max_tokens is None:
        assert int(in_b["row"].min()) == len(read_rows(str(files / "a.txt")))
    else:
        assert in_b.height == 0 and got["source_file"].str.ends_with("a.txt").all()
    assert index.n_chunks == len(chunks) and index.n_rows == n_rows
    assert index.n_shards == -(-len(chunks) // 3) and len(store.list_files("corpus")) == index.n_shards
    sample_range = got.filter(pl.col("chunk") < index.n_chunks - 1)
    assert sum(index.proper) == int(sample_range["is_proper_noun"].sum())
    assert sum(index.other) == sample_range.height - sum(index.proper)


def test_same_corpus_and_sample_for_1_and_4_read_tasks(ray_local, gpt2_tokenizer, tmp_path, small_shards):
    data = write_corpus(tmp_path / "one.txt", n_rows=60, seed=4)
    one_cfg, four_cfg = config(data, tmp_path / "one"), config(data, tmp_path / "four")
    one_src, one_store, one = run_stage(one_cfg, gpt2_tokenizer, unit_bytes=2**20, read_tasks=1)
    size = os.path.getsize(data)
    four_src, four_store, four = run_stage(four_cfg, gpt2_tokenizer, unit_bytes=size // 4 + 1, read_tasks=4)
    assert len(one_src.units) == 1 and len(four_src.units) == 4
    assert corpus_table(one_store).equals(corpus_table(four_store))
    assert one.fingerprint == four.fingerprint and one.proper == four.proper and one.n_shards > 2
    a = stage.draw_sample(one, one_store, 25, seed=7)
    b = stage.draw_sample(four, four_store, 25, seed=7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[1].sum() == 25 and (~a[1]).sum() == 25  # balanced
    table = corpus_table(one_store)
    labels = dict(zip(zip(table["chunk"].to_list(), table["pos"].to_list()), table["is_proper_noun"].to_list()))
    assert [labels[tuple(k)] for k in a[0].tolist()] == a[1].tolist()
    assert (a[0][:, 0] < one.n_chunks - 1).all()  # the last chunk is held out
    assert len(np.unique(a[0], axis=0)) == len(a[0])
    other = stage.draw_sample(one, one_store, 25, seed=8)
    assert not np.array_equal(a[0], other[0])


def test_sample_needs_proper_nouns_and_other_tokens():
    index = stage.CorpusIndex(source="s", source_fingerprint="f", n_rows=1, stream_tokens=1, chunk_tokens=1, n_chunks=1,
                              shard_chunks=1, proper=(0, 0), other=(3, 4), digests=("",) * 2)
    with pytest.raises(UsageError, match="no proper nouns"):
        stage.draw_sample(index, None, 10, 0)


def test_resume_reuses_the_stage_and_rewrites_only_missing_shards(ray_local, files, gpt2_tokenizer, tmp_path, small_shards):
    cfg = config(files, tmp_path / "run")
    _, store, first = run_stage(cfg, gpt2_tokenizer)
    before = corpus_table(store)
    resumed = config(files, tmp_path / "run", resume=True)
    assert run_stage(resumed, gpt2_tokenizer)[2] == first  # the finished stage's index is reused as it is
    # A stage cut short: its index is missing and one shard lost its file; the others' markers verify.
    os.remove(store.path(stage.INDEX))
    victim = store.list_files("corpus")[1]
    os.remove(victim)
    mtimes = {f: os.path.getmtime(f) for f in store.list_files("corpus")}
    _, _, again = run_stage(resumed, gpt2_tokenizer)
    assert again == first and corpus_table(store).equals(before)
    assert os.path.exists(victim) and all(os.path.getmtime(f) == t for f, t in mtimes.items())


@pytest.mark.parametrize("text,match", [("\n\n  \n", "no text"), ("Mary met her.\n", "fewer than one chunk")])
def test_unusable_corpus_is_one_line(ray_local, gpt2_tokenizer, tmp_path, text, match):
    path = tmp_path / "c.txt"
    path.write_text(text)
    with pytest.raises(UsageError, match=match):
        run_stage(config(path, tmp_path / "run"), gpt2_tokenizer)


def test_reader_returns_chunks_across_shards(ray_local, files, gpt2_tokenizer, tmp_path, small_shards):
    cfg = config(files, tmp_path / "run")
    _, store, index = run_stage(cfg, gpt2_tokenizer)
    chunks, *_ = reference(list(files.iterdir()), gpt2_tokenizer)
    reader = stage.CorpusReader(store.uri, CHUNK, index.shard_chunks, cache_shards=1)
    pick = np.array([0, 4, 2, index.n_chunks - 1, 3])
    assert np.array_equal(reader.ids(pick), chunks[pick])
    assert np.array_equal(stage.ArrayChunks(chunks).ids(pick), chunks[pick])


def test_stage_reads_a_streamed_dataset_in_order(ray_local, gpt2_tokenizer, tmp_path, small_shards):
    """The datasets path through the stage's Ray tasks: a dataset saved as hub-layout Parquet shards,
    read with --data-split (streamed shards as units), equals the rows read in one process."""
    import datasets

    texts = [(" = Title = \n" if i % 10 == 0 else "") if i % 3 == 0 else f" {write_names(i)} met her friend in Paris . \n"
             for i in range(90)]
    ds = datasets.Dataset.from_dict({"text": texts})
    (tmp_path / "ds" / "data").mkdir(parents=True)
    for i in range(3):
        ds.shard(3, i, contiguous=True).to_parquet(str(tmp_path / "ds" / "data" / f"train-{i:05d}-of-00003.parquet"))
    cfg = RunConfig(models=("unused",), data=str(tmp_path / "ds"), data_split="train", out=str(tmp_path / "run"), chunk_tokens=CHUNK)
    source = resolve_source(cfg.data, split="train")
    assert len(source.units) == 3 and {u.kind for u in source.units} == {"hub"}
    index = stage.run_corpus_stage(source, gpt2_tokenizer, decode_table(gpt2_tokenizer), cfg, Store(cfg.out), log=lambda m: None)
    stream = tokenize_rows(read_rows(cfg.data, split="train"), gpt2_tokenizer, "ref")
    chunks = chunk_stream(stream.token_ids, CHUNK)
    got = corpus_table(Store(cfg.out))
    assert got["token_id"].to_numpy().tolist() == chunks.ravel().tolist()
    assert got["row"].to_numpy().tolist() == stream.rows[: chunks.size].tolist()
    assert index.n_rows == len(texts)


def write_names(i: int) -> str:
    return ["Mary", "John", "Alice"][i % 3] + " and " + ["Robert", "Sarah"][i % 2]


def test_stage_prints_units_tokenized_and_shards_written(ray_local, files, gpt2_tokenizer, tmp_path, small_shards, capsys):
    """Progress lines on stderr (one a line off a terminal): counts of units and shards, rate and ETA."""
    source, _, index = run_stage(config(files, tmp_path / "run"), gpt2_tokenizer, unit_bytes=300)
    lines = capsys.readouterr().err.splitlines()
    units = [line for line in lines if line.startswith("[corpus] units tokenized: ")]
    shards = [line for line in lines if line.startswith("[corpus] shards written: ")]
    assert units[0].startswith(f"[corpus] units tokenized: 0/{len(source.units)} units")  # shown before any unit is done
    assert units[-1].startswith(f"[corpus] units tokenized: {len(source.units)}/{len(source.units)} units")
    assert shards[-1].startswith(f"[corpus] shards written: {index.n_shards}/{index.n_shards} shards")
    assert all(", ETA " in line and "/s" in line and "\r" not in line for line in units + shards)
