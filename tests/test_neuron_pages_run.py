"""End to end: ``probe run --analyses neuron_pages`` on a tiny GPT-2 equals brute force over every token from
an independent Hugging Face forward pass (hooks on ``c_fc``), and its tables are the same with 1 or 2
replicas, batches of 1 or 8 chunks, and after an interrupted run is resumed."""
import numpy as np
import polars as pl
import pytest
import ray
import torch
from polars.testing import assert_frame_equal
from transformers import GPT2LMHeadModel

from jobs import capture
from jobs.cli import main
from jobs.api import run_query
from probe_core import neuron_pages as npg
from tests.corpus import write_corpus
from tests.test_neuron_pages import brute

pytestmark = pytest.mark.slow  # runs the job end to end on Ray

CHUNK, N_CHUNKS, K, W = 16, 8, 3, 2
TABLES = ("neuron_stats", "neuron_examples", "neuron_vocab")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("pages") / "corpus.txt", n_rows=30)


def run(tiny_model_dir, data, out, *extra) -> int:
    return main(["run", "--models", tiny_model_dir, "--data", data, "--out", str(out), "--run-id", out.name,
                 "--analyses", "neuron_pages", "--chunk-tokens", str(CHUNK), "--max-tokens", str(CHUNK * N_CHUNKS),
                 "--examples-k", str(K), "--context-tokens", str(W), "--seed", "5", *extra])


def tables(out) -> dict[str, pl.DataFrame]:
    keys = {"neuron_stats": ["layer", "neuron"], "neuron_examples": ["layer", "neuron", "kind", "rank"],
            "neuron_vocab": ["layer", "neuron", "kind", "rank"]}
    return {t: run_query(str(out), f"SELECT * FROM {t}").sort(keys[t]) for t in TABLES}


def assert_same(a: dict, b: dict) -> None:
    """Keys, ranks and counts exactly; float values to float32 noise of another batch shape, moments to 1e-6."""
    for name in TABLES:
        assert_frame_equal(a[name], b[name], check_exact=False, rtol=1e-5, atol=1e-6)
        ints = [c for c, t in a[name].schema.items() if t.is_integer() or t == pl.String]
        assert a[name].select(ints).equals(b[name].select(ints)), name


@pytest.fixture(scope="module")
def base(ray_local, tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "b8"
    assert run(tiny_model_dir, data, out, "--batch-size", "8", "--replicas", "1") == 0
    return tables(out), out


@pytest.mark.slow
def test_tables_equal_brute_force(base, tiny_model_dir):
    got, out = base
    ids = run_query(str(out), "SELECT chunk, pos, token_id FROM tokens").sort("chunk", "pos")["token_id"].to_numpy()
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    pre = {}
    handles = [h.mlp.c_fc.register_forward_hook(lambda m, i, o, l=l: pre.__setitem__(l, o.detach().numpy()))
               for l, h in enumerate(model.transformer.h)]
    with torch.inference_mode():
        model(torch.tensor(ids.reshape(N_CHUNKS, CHUNK), dtype=torch.long))
    for h in handles:
        h.remove()
    config = npg.PagesConfig(K, W, CHUNK, 5, npg.model_salt("tiny-gpt2"))
    stats, examples = got["neuron_stats"], got["neuron_examples"]
    for index, x in pre.items():
        want, want_ex = brute(x, config, layer=index + 1)
        s = stats.filter(pl.col("layer") == index + 1)
        assert s["n"].to_list() == list(want["n"])
        np.testing.assert_allclose(s["mean"].to_numpy(), want["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s["sd"].to_numpy(), want["sd"], rtol=1e-5)
        np.testing.assert_allclose(s["max"].to_numpy(), want["max"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s["frac_active"].to_numpy(), want["frac_active"])
        assert np.array_equal(np.array(s["hist"].to_list()), want["hist"])
        ex = examples.filter(pl.col("layer") == index + 1)
        for (kind, j), rows in want_ex.items():
            e = ex.filter((pl.col("kind") == kind) & (pl.col("neuron") == j)).sort("rank")
            assert list(zip(e["chunk"], e["pos"])) == [(c, p) for c, p, _, _ in rows], (index, kind, j)
            np.testing.assert_allclose(e["activation"].to_numpy(), [v for _, _, v, _ in rows], rtol=1e-5, atol=1e-6)
            ctx = np.array([[np.nan if v is None else v for v in c] for c in e["context"].to_list()]).reshape(len(rows), -1)
            np.testing.assert_allclose(ctx, np.array([c for *_, c in rows]).reshape(len(rows), -1), rtol=1e-5, atol=1e-6)
    # neuron_vocab: the direct path from the weights, in float64 numpy
    vocab = got["neuron_vocab"]
    w_u = model.lm_head.weight.detach().double().numpy()
    gamma = model.transformer.ln_f.weight.detach().double().numpy()
    for index, block in enumerate(model.transformer.h):
        w_out = block.mlp.c_proj.weight.detach().double().numpy()  # Conv1D: (d_mlp, d)
        logits = ((w_out - w_out.mean(1, keepdims=True)) * gamma) @ w_u.T
        order = np.argsort(-logits, axis=1, kind="stable")
        for kind, ids_ in (("promoted", order[:, :K]), ("suppressed", order[:, ::-1][:, :K])):
            v = vocab.filter((pl.col("layer") == index + 1) & (pl.col("kind") == kind)).sort("neuron", "rank")
            assert np.array_equal(v["token_id"].to_numpy().reshape(-1, K), ids_)
            np.testing.assert_allclose(v["weight"].to_numpy().reshape(-1, K), np.take_along_axis(logits, ids_, 1), rtol=1e-4, atol=1e-5)
    assert vocab["token"].null_count() == 0


@pytest.mark.slow
def test_two_replicas_and_batches_of_one_give_the_same_tables(base, tiny_model_dir, data, tmp_path):
    assert run(tiny_model_dir, data, tmp_path / "b1r2", "--batch-size", "1", "--replicas", "2") == 0
    assert_same(tables(tmp_path / "b1r2"), base[0])


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_tables(base, tiny_model_dir, data, tmp_path, monkeypatch):
    """Ctrl-C after 2 batches (the actors and their states are gone), then --resume with 2 replicas."""
    update, done = capture.Progress.update, []

    def interrupt(self, *a, **kw):
        update(self, *a, **kw)
        done.append(1)
        if len(done) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(capture.Progress, "update", interrupt)
    out = tmp_path / "b2"
    assert run(tiny_model_dir, data, out, "--batch-size", "2", "--replicas", "1") == 130
    monkeypatch.setattr(capture.Progress, "update", update)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    assert run(tiny_model_dir, data, out, "--batch-size", "2", "--replicas", "2", "--resume") == 0
    assert_same(tables(out), base[0])


@pytest.mark.slow
def test_the_run_writes_pages_and_probe_neuron_reads_them(base, capsys):
    """The end of the run writes the selected neurons' pages, linked from report.html; ``probe neuron`` prints
    the top example with its own token marked."""
    got, out = base
    report = (out / "report.html").read_text(encoding="utf-8")
    index = out / "neuron_pages" / "tiny-gpt2" / "index.html"
    assert 'href="neuron_pages/tiny-gpt2/index.html"' in report and index.is_file()
    pages = sorted(p.name for p in index.parent.glob("L*-N*.html"))
    assert len(pages) == got["neuron_stats"]["layer"].n_unique() * 5
    top = got["neuron_examples"].filter((pl.col("layer") == 1) & (pl.col("neuron") == 0) & (pl.col("kind") == "top")
                                        & (pl.col("rank") == 0)).row(0, named=True)
    token = run_query(str(out), f"SELECT token FROM corpus WHERE chunk = {top['chunk']} AND pos = {top['pos']}").item()
    capsys.readouterr()
    assert main(["neuron", str(out), "--model", "tiny-gpt2", "--layer", "1", "--neuron", "0"]) == 0
    text = capsys.readouterr().out
    assert f"⟦{token.translate(str.maketrans({chr(10): '↵', chr(13): '␍', chr(9): '⇥'}))}⟧" in text
