"""The "Across model sizes" section on synthetic tables (2 models, 3 and 4 layers) that carry the new
columns (CIs, MI null, AR significance), checked against numbers computed independently with numpy."""
import numpy as np
import polars as pl
import pytest

from jobs import across_sizes, figures
from jobs.analyses.neurons import figures as neuron_figures
from jobs.report import write_report
from tests.test_figures import MODELS, make_tables

pytestmark = pytest.mark.slow  # renders figures and runs the job end to end

PARAMS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168}
ACROSS_NAMES = ["across_path_r", "across_rotation_t", "across_neurons_frac", "across_mi_excess", "across_attn_ar"]


def with_new_columns(frames: dict, seed: int = 1) -> dict:
    """``frames`` plus the columns and the path_layer_r table that newer runs write."""
    rng = np.random.default_rng(seed)
    f = dict(frames)
    ps = f["path_summary"]
    f["path_summary"] = ps.with_columns(r_ci_low=pl.col("r_path_logit") - 0.1, r_ci_high=pl.col("r_path_logit") + 0.1)
    rows = [(m, lay) for m, c in MODELS.items() for lay in range(1, c["n_layer"] + 1)]
    r = rng.uniform(-0.5, 0.5, len(rows))
    f["path_layer_r"] = pl.DataFrame(dict(model=[m for m, _ in rows], layer=pl.Series([x for _, x in rows], dtype=pl.Int16),
                                          n_tokens=[69] * len(rows), r=r, r_ci_low=r - 0.1, r_ci_high=r + 0.1))
    mis = f["mi_summary"]
    null = rng.uniform(0, 0.02, mis.height)
    f["mi_summary"] = mis.with_columns(null_mean_bits=null, null_p95_bits=null * 2,
                                       excess_mean_bits=pl.col("mean_bits") - null, mean_bits_mm=pl.col("mean_bits"))
    f["attn_ar"] = f["attn_ar"].with_columns(significant1=pl.col("p1") < 0.01, significant2=pl.col("p2") < 0.01)
    return f


@pytest.fixture(scope="module")
def new_frames():
    return with_new_columns(make_tables())


def _manifest():
    return {"run_id": "r", "models": {m: {"n_layer": c["n_layer"], "n_params": PARAMS[m]} for m, c in MODELS.items()}}


def test_summary_table_matches_the_per_model_tables(new_frames):
    got = across_sizes.summary_table({k: v.lazy() for k, v in new_frames.items()}, _manifest())
    assert got["model"].to_list() == ["gpt2", "gpt2-medium"]  # by params
    for m, c in MODELS.items():
        row = got.filter(pl.col("model") == m).row(0, named=True)
        assert row["params"] == PARAMS[m] and row["n_layer"] == c["n_layer"]
        ps = new_frames["path_summary"].filter(pl.col("model") == m)
        for col in ("r_path_logit", "r_ci_low", "r_ci_high"):
            assert row[col] == pytest.approx(ps[col][0])
        sig = new_frames["neuron_logit"].filter(pl.col("model") == m)["significant"].to_numpy()
        assert (row["n_significant_neurons"], row["n_neurons"]) == (sig.sum(), c["n_layer"] * c["d_mlp"])
        assert row["frac_significant_neurons"] == pytest.approx(sig.mean())
        mis = new_frames["mi_summary"].filter(pl.col("model") == m)
        assert row["mi_excess_bits"] == pytest.approx(np.mean(mis["mean_bits"].to_numpy() - mis["null_mean_bits"].to_numpy()))
        ar = new_frames["attn_ar"].filter((pl.col("model") == m) & pl.col("chunk").is_null())
        assert len(ar) == c["n_layer"] and row["mean_ar_b1"] == pytest.approx(np.mean(ar["b1"].to_numpy()))


def test_summary_table_without_manifest_or_tables(new_frames):
    t = {k: v.lazy() for k, v in new_frames.items() if k != "attn_ar"}
    got = across_sizes.summary_table(t, {})  # an analysis not run: its cells vanish, no crash
    assert "mean_ar_b1" not in got.columns and "mi_excess_bits" in got.columns
    assert dict(zip(got["model"], got["n_layer"])) == {m: c["n_layer"] for m, c in MODELS.items()}  # from the tables
    assert got["params"].null_count() == 2
    assert across_sizes.summary_table({}, {}).height == 0


def test_figures_use_relative_depth(new_frames, tmp_path):
    t = {k: v.lazy() for k, v in new_frames.items()}
    n_layers = {m: c["n_layer"] for m, c in MODELS.items()}
    entries = figures.render_all(t, str(tmp_path), n_layers=n_layers)
    names = [e["name"] for e in entries if e["section"] == "across"]
    assert names == list(ACROSS_NAMES)
    for e in entries[:5]:
        assert open(e["png"], "rb").read(8).startswith(b"\x89PNG") and open(e["svg"], "rb").read(2000).find(b"<svg") >= 0
    fig = neuron_figures.fig_neurons_frac(t["neuron_logit"], n_layers)
    (ax,) = fig.axes
    lines = [ln for ln in ax.get_lines() if ln.get_label().startswith("gpt2")]
    for ln, (m, c) in zip(lines, MODELS.items()):
        np.testing.assert_allclose(ln.get_xdata(), np.arange(1, c["n_layer"] + 1) / c["n_layer"])
        d = new_frames["neuron_logit"].filter(pl.col("model") == m)
        want = [d.filter(pl.col("layer") == lay)["significant"].mean() for lay in range(1, c["n_layer"] + 1)]
        np.testing.assert_allclose(ln.get_ydata(), want)


def test_report_section_shows_the_table_first(new_frames, tmp_path):
    t = {k: v.lazy() for k, v in new_frames.items()}
    entries = figures.render_all(t, str(tmp_path / "figures"))
    html = open(write_report(str(tmp_path), _manifest(), t, entries), encoding="utf-8").read()
    assert html.index('<section id="across">') < html.index('<section id="path">')
    assert html.index("<table", html.index('<section id="across">')) < html.index("<figure", html.index('<section id="across">'))
    sec = html[html.index('<section id="across">'):].split("</section>")[0]
    assert sec.count("<figure") == 5 and "124439808" in sec and "mean_ar_b1" in sec
    from jobs.report import _fmt
    table = across_sizes.summary_table(t, _manifest())
    for v in table.filter(pl.col("model") == "gpt2-medium").row(0):
        assert f">{_fmt(v)}<" in sec


# ---------------------------------------------------------------- end to end: a real run of two depths
E2E_COLUMNS = ["model", "params", "n_layer", "r_path_logit", "r_ci_low", "r_ci_high", "n_significant_neurons",
               "n_neurons", "frac_significant_neurons", "mi_excess_bits", "mean_ar_b1"]


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    """``probe run`` of all five analyses on two tiny GPT-2s (3 and 2 layers), 5 chunks of 64 tokens."""
    import ray

    from jobs.cli import main
    from tests.conftest import two_model_inputs

    inputs = two_model_inputs(tmp_path_factory.mktemp("across-e2e"))
    out = str(inputs["root"] / "run")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code = main(["run", "--models", ",".join(inputs["models"]), "--data", inputs["data"], "--out", out,
                     "--chunk-tokens", "64", "--max-tokens", str(64 * 5), "--max-samples", "30", "--mi-tokens", "128",
                     "--seed", "5"])
    finally:
        ray.shutdown()
    assert code == 0
    return {"out": out, **inputs}


def _read(out: str, table: str) -> dict[str, dict[str, np.ndarray]]:
    """{model: {column: array}} of one table, read with pyarrow straight from the hive folders."""
    import pyarrow.dataset as ds

    t = ds.dataset(f"{out}/{table}", format="parquet", partitioning="hive").to_table()
    models = np.asarray(t.column("model").to_pylist())
    return {m: {c: np.asarray(t.column(c).to_pylist(), dtype=object if c == "chunk" else None)[models == m]
                for c in t.column_names if c != "model"} for m in np.unique(models)}


def _expected_rows(run: dict) -> dict[str, dict]:
    """Every cell of the across table, recomputed from the run's per-model tables and the model folders."""
    import json
    import os

    from transformers import GPT2LMHeadModel

    path, neurons = _read(run["out"], "path_summary"), _read(run["out"], "neuron_logit")
    mi, null, ar = _read(run["out"], "mi"), _read(run["out"], "mi_null"), _read(run["out"], "attn_ar")
    with open(f"{run['out']}/manifest.json") as f:
        manifest = json.load(f)
    rows = {}
    for folder in run["models"]:
        m = os.path.basename(folder)
        with open(f"{folder}/config.json") as f:
            config = json.load(f)
        n_layer = config["n_layer"]
        assert manifest["models"][m]["n_layer"] == n_layer
        params = sum(p.numel() for p in GPT2LMHeadModel.from_pretrained(folder).parameters())  # tied head once
        sig = neurons[m]["significant"].astype(bool)
        assert sig.size == n_layer * (config["n_inner"] or 4 * config["n_embd"])  # every neuron of every block fitted
        excess = [mi[m]["mi_bits"][mi[m]["layer"] == lay].mean() - null[m]["mi_bits"][null[m]["layer"] == lay].mean()
                  for lay in range(n_layer + 1)]  # hidden_states 0..n_layer
        pooled = np.array([c is None for c in ar[m]["chunk"]]) & np.isfinite(ar[m]["b1"])
        assert sorted(ar[m]["layer"][pooled]) == list(range(1, n_layer + 1))
        assert len(path[m]["r_path_logit"]) == 1
        rows[m] = {"model": m, "params": params, "n_layer": n_layer,
                   **{c: float(path[m][c][0]) for c in ("r_path_logit", "r_ci_low", "r_ci_high")},
                   "n_significant_neurons": int(sig.sum()), "n_neurons": sig.size,
                   "frac_significant_neurons": float(sig.mean()), "mi_excess_bits": float(np.mean(excess)),
                   "mean_ar_b1": float(ar[m]["b1"][pooled].mean())}
    return rows


def _html_table(section: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, body rows) of the first <table> in ``section``, as text."""
    from html.parser import HTMLParser

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.cell = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            elif tag in ("th", "td"):
                self.cell = ""

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

        def handle_endtag(self, tag):
            if tag in ("th", "td"):
                self.rows[-1].append(self.cell)
                self.cell = None

    parser = Cells()
    parser.feed(section[section.index("<table"): section.index("</table>") + len("</table>")])
    return parser.rows[0], parser.rows[1:]


def test_across_table_of_a_real_run_matches_its_per_model_tables(e2e_run):
    """The report's across table and ``summary_table`` on a real two-depth run equal the values recomputed with
    numpy from the run's path_summary, neuron_logit, mi, mi_null and attn_ar tables, the manifest and the models."""
    from jobs.query import scan_tables
    from jobs.store import Store

    want = _expected_rows(e2e_run)
    order = sorted(want, key=lambda m: want[m]["params"])  # the table's order (by params; here not by depth)
    assert sorted(r["n_layer"] for r in want.values()) == [2, 3]

    got = across_sizes.summary_table(scan_tables(Store(e2e_run["out"])), Store(e2e_run["out"]).read_json("manifest.json"))
    assert got.columns == E2E_COLUMNS and got["model"].to_list() == order
    for row in got.iter_rows(named=True):
        for c, v in want[row["model"]].items():
            assert row[c] == (pytest.approx(v, rel=1e-12) if isinstance(v, float) else v), (row["model"], c)

    with open(f"{e2e_run['out']}/report.html", encoding="utf-8") as f:
        page = f.read()
    sec = page[page.index('<section id="across">'):].split("</section>")[0]
    assert sec.count("<figure") == len(ACROSS_NAMES)
    head, body = _html_table(sec)
    assert head == E2E_COLUMNS and [r[0] for r in body] == order
    for cells in body:
        for c, text in zip(head, cells):
            v = want[cells[0]][c]
            if isinstance(v, float):  # shown to 4 significant digits
                assert abs(float(text) - v) <= 5e-4 * abs(v) + 1e-15, (cells[0], c, text, v)
            else:
                assert text == str(v), (cells[0], c, text, v)
