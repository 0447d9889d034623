"""Input readers and local Ray defaults, without a hub or a cluster."""
import numpy as np
import pytest

from jobs.corpus import encode_rows
from jobs.errors import UsageError
from tests import reference


class FakeDataset(dict):
    pass


def test_hub_dataset_is_read_through_datasets(monkeypatch, gpt2_tokenizer):
    import datasets

    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return FakeDataset(text=["", " = Title = \n", " Mary met her friend . \n", ""])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rows = reference.read_rows("wikitext-2-raw-v1:validation")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "validation")]
    corpus = reference.tokenize_rows(rows, gpt2_tokenizer, "hub")
    # Blank rows are skipped but keep their index, so `row` points at the dataset's own rows.
    assert set(corpus.rows.tolist()) == {1, 2}


def test_hub_dataset_offline_says_what_to_do(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match="pass a local file"):
        reference.read_rows("wikitext-2-raw-v1")


def test_text_file_rows_match_hub_rows(tmp_path, gpt2_tokenizer):
    path = tmp_path / "t.raw"
    path.write_text(" = Title = \n\n Mary met her friend . \n")
    rows = reference.read_text_file(str(path))
    assert rows == [" = Title = \n", "\n", " Mary met her friend . \n"]
    corpus = reference.tokenize_rows(rows, gpt2_tokenizer, str(path), max_tokens=5)
    assert len(corpus.token_ids) == 5 and corpus.token_ids.dtype == np.int32
    assert corpus.fingerprint() != reference.tokenize_rows(rows, gpt2_tokenizer, str(path)).fingerprint()


def test_parquet_needs_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(UsageError, match="no 'text' column"):
        reference.read_rows(str(tmp_path / "x.parquet"))
    pq.write_table(pa.table({"text": ["Mary met her.\n", None]}), tmp_path / "y.parquet")
    assert reference.read_rows(str(tmp_path / "y.parquet")) == ["Mary met her.\n", ""]


def test_local_ray_dashboard_binds_loopback(monkeypatch):
    from jobs import cluster
    from jobs.config import RunConfig

    seen = {}
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster.start_ray(RunConfig())
    # a new local instance (never a cluster `ray start` left on the machine), its dashboard on loopback
    assert seen["dashboard_host"] == "127.0.0.1" and seen["address"] == "local"


def test_blocked_tokenization_equals_one_pass(gpt2_tokenizer):
    rows = [f" Row {i} : Mary met her friend in London .\n" if i % 3 else "\n" for i in range(50)]
    whole = reference.tokenize_rows(rows, gpt2_tokenizer, "x", block_rows=10_000)
    blocked = reference.tokenize_rows(rows, gpt2_tokenizer, "x", block_rows=7)
    np.testing.assert_array_equal(whole.token_ids, blocked.token_ids)
    np.testing.assert_array_equal(whole.rows, blocked.rows)
    capped = reference.tokenize_rows(rows, gpt2_tokenizer, "x", max_tokens=23, block_rows=2)
    np.testing.assert_array_equal(capped.token_ids, whole.token_ids[:23])


def test_encode_rows_gives_the_tokenizers_own_ids(gpt2_tokenizer):
    """encode_rows calls the Rust tokenizer directly (no offsets): the ids of tokenizer(...), whatever
    padding state the tokenizer was left in."""
    rows = [" = Café Müller = \n", "  two  spaces\tand tab\n", " naïve 日本語 emoji 🙂 ' s\n", "x" * 300 + "\n",
            " Mary met her friend in London .\n", "\n", " end"]
    which = [0, 1, 2, 3, 4, 6]
    want = gpt2_tokenizer([rows[i] for i in which], add_special_tokens=False)["input_ids"]
    ids, row_of = encode_rows(rows, which, gpt2_tokenizer)
    np.testing.assert_array_equal(ids, np.concatenate(want))
    np.testing.assert_array_equal(row_of, np.repeat(which, [len(w) for w in want]))
    try:
        gpt2_tokenizer.backend_tokenizer.enable_padding(pad_id=gpt2_tokenizer.eos_token_id)  # left by a padded call
        np.testing.assert_array_equal(encode_rows(rows, which, gpt2_tokenizer)[0], np.concatenate(want))
    finally:
        gpt2_tokenizer.backend_tokenizer.no_padding()


def test_bom_crlf_and_jsonl_are_normalised(tmp_path):
    (tmp_path / "unix.txt").write_bytes(b" = Title = \n\n Mary met her friend . \n")
    (tmp_path / "dos.txt").write_bytes(b"\xef\xbb\xbf = Title = \r\n\r\n Mary met her friend . \r\n")
    assert reference.read_rows(str(tmp_path / "dos.txt")) == reference.read_rows(str(tmp_path / "unix.txt"))
    lines = ['{"text": " = Title = \\r\\n"}', "", '{"text": " Mary met her friend . \\n", "id": 3}']
    (tmp_path / "c.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    assert reference.read_rows(str(tmp_path / "c.jsonl")) == [" = Title = \n", "", " Mary met her friend . \n"]
