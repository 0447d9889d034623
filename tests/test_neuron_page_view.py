"""What users see of the neuron pages, on a small synthetic run folder written with ``jobs.store`` (no Ray):
``neuron_page``'s frames, the selected neurons, ``probe neuron``'s text and errors, and the static HTML pages."""
import os
import re

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from jobs.analyses import neuron_pages
from jobs.analyses.neuron_pages import html as pages_html
from jobs.analyses.neuron_pages import page
from jobs.analyses.neurons import LOGIT
from jobs.cli import main
from jobs.corpus import CORPUS
from jobs.api import open_run
from jobs.manifest import STAGES
from jobs.query import make_report
from jobs.store import Store
from probe_core.neuron_pages import HIST_EDGES

N_CHUNK, T, W, K = 3, 16, 2, 3
MODELS = {"gpt2": (2, 8), "gpt2-medium": (3, 6)}  # n_layer, d_mlp
VOCAB = [" the", " Paris", "<b>&", "\n", " of", " Ada", ".", " & co", "\t"]


def corpus(rng) -> pa.Table:
    n = N_CHUNK * T
    ids = rng.integers(0, len(VOCAB), n)
    return pa.table({"chunk": np.repeat(np.arange(N_CHUNK), T).astype(np.int32), "pos": np.tile(np.arange(T), N_CHUNK).astype(np.int32),
                     "row": np.arange(n), "token_id": ids.astype(np.int32), "token": [VOCAB[i] for i in ids],
                     "next_token_id": np.roll(ids, -1).astype(np.int32), "is_proper_noun": ids == 1, "source_file": ["c.txt"] * n})


def neuron_tables(x: np.ndarray) -> tuple[pa.Table, pa.Table, pa.Table]:
    """neuron_stats, neuron_examples and neuron_vocab of activations x (chunk, pos, layer, neuron), by brute force."""
    stats, examples, vocab = [], [], []
    _, _, n_layer, d_mlp = x.shape
    for li in range(n_layer):
        for j in range(d_mlp):
            v = x[:, :, li, j]
            flat = v.reshape(-1)
            stats.append({"layer": li + 1, "neuron": j, "n": flat.size, "mean": float(flat.mean()), "sd": float(flat.std(ddof=1)),
                          "min": float(flat.min()), "max": float(flat.max()), "frac_active": float((flat > 0).mean()),
                          "hist": np.bincount(np.searchsorted(HIST_EDGES, flat, side="left"), minlength=len(HIST_EDGES) + 1).tolist()})
            active = np.nonzero(flat > 0)[0]
            for kind, order in (("top", np.argsort(-flat, kind="stable")), ("bottom", np.argsort(flat, kind="stable")),
                                ("random_active", active[::-1])):
                for rank, r in enumerate(order[:K]):
                    c, p = divmod(int(r), T)
                    ctx = [float(v[c, q]) if 0 <= q < T else None for q in range(p - W, p + W + 1)]
                    examples.append({"layer": li + 1, "neuron": j, "kind": kind, "rank": rank, "chunk": c, "pos": p,
                                     "activation": float(flat[r]), "context": ctx})
            for kind, sign in (("promoted", 1), ("suppressed", -1)):
                for rank in range(K):
                    tid = (j + rank * 2 + (kind == "suppressed")) % len(VOCAB)
                    vocab.append({"layer": li + 1, "neuron": j, "kind": kind, "rank": rank, "token_id": tid,
                                  "token": VOCAB[tid], "weight": sign * (1.0 - 0.1 * rank)})
    return pa.Table.from_pylist(stats), pa.Table.from_pylist(examples), pa.Table.from_pylist(vocab)


def logit(rng, n_layer, d_mlp) -> pa.Table:
    n = n_layer * d_mlp
    beta, p = rng.normal(0, 2, n), rng.uniform(0, 1, n) ** 4
    return pa.table({"layer": np.repeat(np.arange(1, n_layer + 1), d_mlp), "neuron": np.tile(np.arange(d_mlp), n_layer),
                     "n": [100] * n, "beta": beta, "se": [0.5] * n, "z": beta / 0.5, "p": p, "beta_ci_low": beta - 1,
                     "beta_ci_high": beta + 1, "auroc": [0.6] * n, "significant": p < 0.01, "q_bh": np.minimum(3 * p, 1),
                     "status": ["ok"] * n, "converged": [True] * n, "n_iter": [5] * n})


def write_run(root, with_pages=True) -> tuple[str, dict]:
    """A run folder: manifest, corpus, the neuron_pages tables of both models, neuron_logit of gpt2 only."""
    rng = np.random.default_rng(0)
    store = Store(str(root))
    store.write_json("manifest.json", {"run_id": "synthetic", "models": {m: {"n_layer": n} for m, (n, _) in MODELS.items()},
                                       "stages": {s: {"status": "done"} for s in STAGES}})  # a finished run: no warning
    store.write_table(CORPUS, "0", corpus(rng), shard=0)
    acts = {}
    for model, (n_layer, d_mlp) in MODELS.items():
        x = (rng.standard_normal((N_CHUNK, T, n_layer, d_mlp)) * 3).astype(np.float32)
        x[..., 0, 1] = -np.abs(x[..., 0, 1])  # layer 1 neuron 1 never active
        acts[model] = x
        if with_pages:
            for table, data in zip(neuron_pages.ANALYSIS.tables, neuron_tables(x)):
                store.write_table(table, "all", data, model=model)
    store.write_table(LOGIT, "all", logit(rng, *MODELS["gpt2"]), model="gpt2")
    return str(root), acts


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("run") / "out")


@pytest.fixture(scope="module")
def tables(run):
    return open_run(run[0]).tables()


def test_neuron_page_frames(run, tables):
    _, acts = run
    tokens = pl.DataFrame(corpus(np.random.default_rng(0)))
    got = page.neuron_page(tables, "gpt2", 2, 3)
    assert set(got) == {"stats", "fit", "examples", "vocab"}
    x = acts["gpt2"][:, :, 1, 3]
    s = got["stats"].row(0, named=True)
    assert s["max"] == pytest.approx(float(x.max())) and s["n"] == x.size and sum(s["hist"]) == x.size
    assert got["fit"].height == 1 and got["fit"]["beta"][0] is not None
    ex = got["examples"]
    assert ex["kind"].unique(maintain_order=True).to_list() == list(page.KINDS)
    own = ex.filter(pl.col("offset") == 0)
    assert own.height == 3 * K and (own["value"] == own["activation"]).all()
    assert own.filter(pl.col("kind") == "top")["activation"].to_list() == pytest.approx(sorted(x.ravel(), reverse=True)[:K])
    for r in ex.iter_rows(named=True):  # every context token: its text from the corpus, its value from the activations
        assert 0 <= r["token_pos"] < T
        assert r["value"] == pytest.approx(float(x[r["chunk"], r["token_pos"]]))
        assert r["token"] == tokens.filter((pl.col("chunk") == r["chunk"]) & (pl.col("pos") == r["token_pos"]))["token"][0]
    assert got["vocab"].filter(pl.col("kind") == "promoted")["rank"].to_list() == list(range(K))


def test_a_model_without_fits_and_a_neuron_never_active(tables):
    got = page.neuron_page(tables, "gpt2-medium", 1, 1)
    assert got["fit"].is_empty() and "random_active" not in got["examples"]["kind"].to_list()
    no_logit = {k: v for k, v in tables.items() if k != "neuron_logit"}
    assert page.neuron_page(no_logit, "gpt2", 1, 0)["fit"].is_empty()


def test_select_neurons(tables, monkeypatch):
    monkeypatch.setattr(page, "N_SIGNIFICANT", 2)
    got = page.select_neurons(tables)
    logit_df = tables["neuron_logit"].collect()
    want_sig = (logit_df.filter("significant").with_columns(a=pl.col("beta").abs()).sort("a", descending=True).head(2))
    sig = got.filter(pl.col("why").str.contains("significant"))
    assert sorted(sig.select("layer", "neuron").rows()) == sorted(want_sig.select("layer", "neuron").rows())
    stats = tables["neuron_stats"].collect()
    for (model, layer), rows in stats.group_by("model", "layer"):
        top = set(rows.sort("max", descending=True).head(page.N_PER_LAYER)["neuron"].to_list())
        mine = got.filter((pl.col("model") == model) & (pl.col("layer") == layer) & pl.col("why").str.contains("max"))
        assert set(mine["neuron"].to_list()) == top
    assert got.height == got.unique(["model", "layer", "neuron"]).height


def test_probe_neuron_prints_the_page(run, capsys):
    assert main(["neuron", run[0], "--model", "gpt2", "--layer", "2", "--neuron", "3"]) == 0
    out = capsys.readouterr().out
    x = run[1]["gpt2"][:, :, 1, 3]
    c, p = divmod(int(np.argmax(x)), T)
    top_token = pl.DataFrame(corpus(np.random.default_rng(0))).filter((pl.col("chunk") == c) & (pl.col("pos") == p))["token"][0]
    lines = out.splitlines()
    assert lines[0] == "gpt2 layer 2 neuron 3" and "neuron_logit: beta" in out
    first_top = lines[lines.index(next(l for l in lines if l.startswith("top ("))) + 1]
    assert f"⟦{page.visible(top_token)}⟧" in first_top and f"chunk {c} pos {p}" in first_top
    assert any(l.startswith("promoted: ") for l in lines) and any(l.startswith("suppressed: ") for l in lines)
    assert "\t" not in out  # tabs and line breaks in tokens are shown as symbols


@pytest.mark.parametrize("args,message", [
    (["--model", "gpt9", "--layer", "1", "--neuron", "0"], "no neuron pages for model 'gpt9'"),
    (["--model", "gpt2", "--layer", "0", "--neuron", "0"], "layers 1..2"),
    (["--model", "gpt2", "--layer", "1", "--neuron", "8"], "neurons 0..7"),
    (["--model", "gpt2", "--layer", "x", "--neuron", "8"], "expected an integer"),
])
def test_probe_neuron_refuses_in_one_line(run, capsys, args, message):
    assert main(["neuron", run[0], *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("probe: error:") and message in err[0]


def test_probe_neuron_on_a_run_without_the_tables(tmp_path, capsys):
    out, _ = write_run(tmp_path / "plain", with_pages=False)
    assert main(["neuron", out, "--model", "gpt2", "--layer", "1", "--neuron", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no neuron_stats" in err[0]
    assert main(["neuron", str(tmp_path / "nothing"), "--model", "gpt2", "--layer", "1", "--neuron", "0"]) == 2


def test_pages_are_written_escaped_and_linked(run, tables, tmp_path):
    links = pages_html.write_pages(tables, str(tmp_path), "#x")
    selected = page.select_neurons(tables)
    assert [href for _, href in links] == ["neuron_pages/gpt2/index.html", "neuron_pages/gpt2-medium/index.html"]
    for model in MODELS:
        index = (tmp_path / "neuron_pages" / model / "index.html").read_text(encoding="utf-8")
        hrefs = re.findall(r'href="([^"]+)"', index)
        chosen = selected.filter(pl.col("model") == model)
        assert len([h for h in hrefs if h.startswith("L")]) == chosen.height
        for layer, neuron in chosen.select("layer", "neuron").iter_rows():
            text = (tmp_path / "neuron_pages" / model / f"L{layer}-N{neuron}.html").read_text(encoding="utf-8")
            assert "<b>" not in text and "<script" not in text  # token text escaped; no script on a neuron page
            assert text.count('class="t a"') == len(re.findall(r"<tr><td>\d+</td><td data-v", text))  # one outlined token per example
            assert "<svg" in text and "Promoted tokens" in text
            assert re.search(r'href="\.\./\.\./report\.html#x"', text)
    assert "&lt;b&gt;" in "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "neuron_pages").rglob("L*.html"))


def _body_rows(text: str) -> list[str]:
    """The rows of a page's (one) table body."""
    return re.findall(r"<tr>(.*?)</tr>", text.split("<tbody>")[1].split("</tbody>")[0])


def test_layer_pages_list_every_neuron_and_link_the_selected(run, tables, tmp_path):
    pages_html.write_pages(tables, str(tmp_path), "#x")
    selected = page.select_neurons(tables)
    stats = tables["neuron_stats"].collect()
    for model, (n_layer, d_mlp) in MODELS.items():
        folder = tmp_path / "neuron_pages" / model
        index = (folder / "index.html").read_text(encoding="utf-8")
        assert re.findall(r'href="(layer-\d+\.html)"', index) == [f"layer-{l}.html" for l in range(1, n_layer + 1)]
        assert index.index("All neurons by layer:") < index.index("<table")
        for layer in range(1, n_layer + 1):
            text = (folder / f"layer-{layer}.html").read_text(encoding="utf-8")
            assert '<table class="sort">' in text and "<script>" in text and 'style="' not in text
            assert re.search(r'href="\.\./\.\./report\.html#x"', text) and 'href="index.html"' in text
            rows = _body_rows(text)
            keys = [tuple(int(v) for v in re.findall(r'data-v="([^"]*)"', r)[:2]) for r in rows]
            assert keys == [(layer, j) for j in range(d_mlp)]  # every neuron of the layer, in neuron order
            mine = stats.filter((pl.col("model") == model) & (pl.col("layer") == layer)).sort("neuron")
            assert [float(re.findall(r'data-v="([^"]*)"', r)[2]) for r in rows] == pytest.approx(mine["max"].to_list())
            chosen = set(selected.filter((pl.col("model") == model) & (pl.col("layer") == layer))["neuron"].to_list())
            assert [re.findall(r'href="([^"]+)"', r) for r in rows] == [[f"L{layer}-N{j}.html"] if j in chosen else []
                                                                        for j in range(d_mlp)]  # the page cell
            assert len(re.findall(r'href="(L\d+-N\d+\.html)"', text)) == len(chosen) > 0
            assert all((folder / f"L{layer}-N{j}.html").is_file() for j in chosen)
            assert all(r.endswith('<td class="s"></td>') for r in rows if "href=" not in r)
            assert "<b>" not in text
        layers = "".join((folder / f"layer-{l}.html").read_text(encoding="utf-8") for l in range(1, n_layer + 1))
        assert "&lt;b&gt;&amp;" in layers  # a promoted token with markup, escaped
    fitted = (tmp_path / "neuron_pages" / "gpt2" / "layer-1.html").read_text(encoding="utf-8")
    unfitted = (tmp_path / "neuron_pages" / "gpt2-medium" / "layer-1.html").read_text(encoding="utf-8")
    assert "<th>q_bh</th>" in fitted and "<th>q_bh</th>" in unfitted  # every model has the columns; unfitted: empty
    assert "—" in _body_rows(unfitted)[0] and "—" not in _body_rows(fitted)[0]


def test_layer_pages_of_a_model_without_selected_neurons(tables, tmp_path, monkeypatch):
    """A model none of whose neurons is selected still gets its layer pages and an index (an empty-table note)."""
    only_gpt2 = page.select_neurons(tables).filter(pl.col("model") == "gpt2")
    monkeypatch.setattr(pages_html, "select_neurons", lambda t: only_gpt2)
    links = pages_html.write_pages(tables, str(tmp_path))
    assert [href for _, href in links] == ["neuron_pages/gpt2/index.html", "neuron_pages/gpt2-medium/index.html"]
    folder = tmp_path / "neuron_pages" / "gpt2-medium"
    index = (folder / "index.html").read_text(encoding="utf-8")
    assert "<table" not in index and 'class="empty"' in index
    assert re.findall(r'href="(layer-\d+\.html)"', index) == ["layer-1.html", "layer-2.html", "layer-3.html"]
    assert sorted(p.name for p in folder.iterdir()) == ["index.html", "layer-1.html", "layer-2.html", "layer-3.html"]
    assert len(_body_rows((folder / "layer-2.html").read_text(encoding="utf-8"))) == MODELS["gpt2-medium"][1]


def test_make_report_links_the_pages(run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run[0], out)
    report = make_report(Store(str(out)))
    text = open(report, encoding="utf-8").read()
    for href in re.findall(r'href="(neuron_pages/[^"]+)"', text):
        assert os.path.isfile(out / href)
    assert "neuron_pages/gpt2/index.html" in text
