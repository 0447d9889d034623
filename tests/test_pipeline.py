"""End to end: `probe run` through a local Ray instance on two tiny GPT-2s, checked against an
independent Hugging Face computation and against the reference statistics libraries."""
import json
import os

import numpy as np
import polars as pl
import pytest
import torch
from transformers import GPT2LMHeadModel

from jobs.cli import main
from tests.conftest import build_tokenizer, two_model_inputs

pytestmark = pytest.mark.slow  # runs the job end to end on Ray

CHUNK = 64


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return two_model_inputs(tmp_path_factory.mktemp("e2e"))


@pytest.fixture(scope="module")
def run_dir(ray_local, inputs):
    out = str(inputs["root"] / "run")
    code = main(["run", "--models", ",".join(inputs["models"]), "--data", inputs["data"], "--out", out,
                 "--chunk-tokens", str(CHUNK), "--max-tokens", str(CHUNK * 9 + 5), "--batch-size", "2",
                 "--max-samples", "40", "--mi-tokens", "100", "--seed", "3"])
    assert code == 0
    return out


def table(run_dir, name) -> pl.DataFrame:
    from jobs.api import run_query

    return run_query(run_dir, f"SELECT * FROM {name}")


def reference_chunks(inputs, run_dir):
    """The chunks the job saw, rebuilt independently from the text with the tokenizer."""
    tok = build_tokenizer()
    with open(inputs["data"], encoding="utf-8") as f:
        rows = [line + "\n" for line in f.read().split("\n")[:-1]]
    ids = [t for r in rows if r.strip() for t in tok(r)["input_ids"]][: CHUNK * 9 + 5]
    return np.asarray(ids[: CHUNK * 9]).reshape(9, CHUNK)


def test_manifest_and_layout(run_dir, inputs):
    with open(os.path.join(run_dir, "manifest.json")) as f:
        manifest = json.load(f)
    assert set(manifest["models"]) == {"tiny-a", "tiny-b"}
    assert manifest["data"]["chunks"] == 9 and manifest["data"]["tokens"] == 9 * CHUNK
    assert all(manifest["stages"][s]["status"] == "done" for s in ("plan", "capture", "stats", "report"))
    assert {"python", "torch", "transformers", "ray"} <= set(manifest["versions"])
    for t in ("tokens", "layer_metrics", "attn_norms", "rotation_angles", "neuron_logit", "mi", "attn_ar", "path_summary"):
        assert os.path.isdir(os.path.join(run_dir, t, "model=tiny-a")), t
    assert os.path.isdir(os.path.join(run_dir, "activations", "model=tiny-b", "layer=2"))
    leftovers = [f for _, _, fs in os.walk(run_dir) for f in fs if f.endswith(".tmp")]
    assert not leftovers


@pytest.mark.parametrize("model_index", [0, 1])
def test_path_metrics_match_hf(run_dir, inputs, model_index):
    folder = inputs["models"][model_index]
    name = os.path.basename(folder)
    chunks = reference_chunks(inputs, run_dir)
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(torch.as_tensor(chunks), output_hidden_states=True)
    hidden = torch.stack(out.hidden_states).double().numpy()  # (L+1, B, T, d)
    step = np.linalg.norm(hidden[1:] - hidden[:-1], axis=-1)
    cos = (hidden[1:] * hidden[:-1]).sum(-1) / (np.linalg.norm(hidden[1:], axis=-1) * np.linalg.norm(hidden[:-1], axis=-1))
    angle = np.arccos(np.clip(cos, -1, 1))
    logits = out.logits.double().numpy()
    next_logit = np.take_along_axis(logits[:, :-1], chunks[:, 1:, None], axis=-1)[..., 0]

    metrics = table(run_dir, "layer_metrics").filter(pl.col("model") == name).sort("chunk", "pos", "layer")
    n_layer = model.config.n_layer
    assert metrics.height == 9 * CHUNK * n_layer
    got = {c: metrics[c].to_numpy().reshape(9, CHUNK, n_layer).transpose(2, 0, 1) for c in ("path_step", "path_cum", "angle_rad")}
    np.testing.assert_allclose(got["path_step"], step, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["path_cum"], np.cumsum(step, axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["angle_rad"], angle, atol=1e-5)

    tokens = table(run_dir, "tokens").filter(pl.col("model") == name).sort("chunk", "pos")
    assert tokens["token_id"].to_numpy().tolist() == chunks.ravel().tolist()
    logit = tokens["next_token_logit"].to_numpy().reshape(9, CHUNK)
    np.testing.assert_allclose(logit[:, :-1], next_logit, rtol=1e-5, atol=1e-5)
    assert tokens.filter(pl.col("pos") == CHUNK - 1)["next_token_logit"].null_count() == 9


def test_path_summary_is_pearson(run_dir):
    from scipy.stats import pearsonr

    q = table(run_dir, "layer_metrics").filter((pl.col("model") == "tiny-a") & (pl.col("layer") == 3))
    t = table(run_dir, "tokens").filter(pl.col("model") == "tiny-a")
    j = q.join(t, on=["chunk", "pos"]).filter((pl.col("pos") > 0) & pl.col("next_token_logit").is_not_null())
    r = pearsonr(j["path_step"].to_numpy().astype(float), j["next_token_logit"].to_numpy().astype(float)).statistic
    s = table(run_dir, "path_summary").filter(pl.col("model") == "tiny-a")
    assert s["n_tokens"][0] == j.height
    assert s["r_path_logit"][0] == pytest.approx(r, abs=1e-9)


def test_tokens_rows_and_labels(run_dir, inputs):
    from probe_core.tokens import proper_noun_labels

    t = table(run_dir, "tokens").filter(pl.col("model") == "tiny-a").sort("chunk", "pos")
    assert t["row"].is_sorted() and t["row"].min() == 0
    assert t["is_proper_noun"].to_list() == proper_noun_labels(t["token"].to_list()).tolist()
    assert " Mary" in t.filter(pl.col("is_proper_noun"))["token"].to_list() or " London" in t.filter(pl.col("is_proper_noun"))["token"].to_list()
    other = table(run_dir, "tokens").filter(pl.col("model") == "tiny-b").sort("chunk", "pos")
    assert other["token_id"].to_list() == t["token_id"].to_list()


def test_every_file_has_the_documented_schema(run_dir):
    import pyarrow.parquet as pq

    from jobs import analyses
    from jobs.analyses.neurons import activations_schema
    from jobs.schema import all_tables
    from jobs.store import Store

    store = Store(run_dir)
    written = {"corpus"} | {t.name for a in analyses.selected(analyses.defaults()) for t in a.tables}
    assert set(store.tables()) == written  # the default analyses' tables and the corpus
    for name, table in all_tables().items():
        for path in store.list_files(name):
            schema = pq.read_schema(path)
            expected = activations_schema(schema.field("values").type.list_size, "float16") if name == "activations" else table.schema
            assert schema.remove_metadata().equals(expected), (name, path)


def test_readme_documents_every_column():
    from jobs.schema import all_tables

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    schema_part = readme[readme.index("## Schema"):]
    for name, schema in ((n, t.schema) for n, t in all_tables().items()):
        assert f"| {name} |" in schema_part, name
        for column in schema.names:
            assert column in schema_part, (name, column)


def test_query_cli_prints_and_writes(run_dir, tmp_path, capsys):
    assert main(["query", run_dir, "SELECT model, count(*) AS n FROM tokens GROUP BY model ORDER BY model"]) == 0
    printed = capsys.readouterr().out
    assert "tiny-a" in printed and "tiny-b" in printed and str(9 * CHUNK) in printed
    out = tmp_path / "q.csv"
    assert main(["query", run_dir, "SELECT layer, avg(path_step) AS s FROM layer_metrics WHERE model = 'tiny-a' GROUP BY layer", "--output", str(out)]) == 0
    assert len(pl.read_csv(out)) == 3
    assert main(["query", run_dir, "SELECT * FROM no_such_table"]) == 2
    assert "tables:" in capsys.readouterr().err


def test_report_has_every_section(run_dir):
    assert main(["report", run_dir]) == 0
    html = open(os.path.join(run_dir, "report.html"), encoding="utf-8").read()
    assert html.count("data:image/png;base64,") >= 10
    for section in ("path", "rotation", "neurons", "mi", "attn_ar"):
        assert f'id="{section}"' in html or section in html
    figures = os.listdir(os.path.join(run_dir, "figures"))
    assert any(f.endswith(".svg") for f in figures) and any(f.endswith(".png") for f in figures)


def test_neuron_fits_match_statsmodels_on_float32_activations(run_dir, inputs):
    """The fits see the model's float32 pre-activations (an independent forward), not the float16 storage."""
    import warnings

    import statsmodels.api as sm

    acts = table(run_dir, "activations").filter((pl.col("model") == "tiny-a") & (pl.col("layer") == 2)).sort("chunk", "pos")
    fits = table(run_dir, "neuron_logit").filter((pl.col("model") == "tiny-a") & (pl.col("layer") == 2)).sort("neuron")
    folder = next(f for f in inputs["models"] if os.path.basename(f) == "tiny-a")
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    chunks = reference_chunks(inputs, run_dir)
    captured = {}
    hook = model.transformer.h[1].mlp.c_fc.register_forward_hook(lambda m, i, o: captured.update(pre=o.detach()))
    with torch.no_grad():
        model(torch.as_tensor(chunks))
    hook.remove()
    x = captured["pre"].float().numpy()[acts["chunk"].to_numpy(), acts["pos"].to_numpy()].astype(np.float64)
    stored = np.stack(acts["values"].to_numpy()).astype(np.float64)
    np.testing.assert_allclose(stored, x, rtol=1e-3, atol=1e-3)  # the float16 storage rounds these
    y = acts["label"].to_numpy().astype(float)
    assert 0 < y.sum() < len(y) and y.sum() == len(y) / 2  # balanced sample
    assert fits.height == x.shape[1]
    checked = 0
    for j in range(0, x.shape[1], 7):
        if fits["status"][j] != "ok":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            res = sm.Logit(y, sm.add_constant(x[:, j])).fit(disp=0)
        assert fits["beta"][j] == pytest.approx(res.params[1], rel=1e-6)
        assert fits["p"][j] == pytest.approx(res.pvalues[1], rel=1e-6)
        np.testing.assert_allclose([fits["beta_ci_low"][j], fits["beta_ci_high"][j]], res.conf_int()[1], rtol=1e-6)
        checked += 1
    assert checked >= 3


def test_path_layer_r_matches_scipy(run_dir):
    from scipy.stats import pearsonr

    tokens = table(run_dir, "tokens").filter(pl.col("model") == "tiny-a")
    metrics = table(run_dir, "layer_metrics").filter(pl.col("model") == "tiny-a")
    got = table(run_dir, "path_layer_r").filter(pl.col("model") == "tiny-a").sort("layer")
    summary = table(run_dir, "path_summary").filter(pl.col("model") == "tiny-a")
    assert got["layer"].to_list() == sorted(metrics["layer"].unique().to_list())
    for row in got.iter_rows(named=True):
        d = metrics.filter(pl.col("layer") == row["layer"]).join(tokens, on=["chunk", "pos"])
        d = d.filter((pl.col("pos") > 0) & pl.col("next_token_logit").is_not_null())
        ref = pearsonr(d["path_step"].cast(pl.Float64).to_numpy(), d["next_token_logit"].cast(pl.Float64).to_numpy())
        ci = ref.confidence_interval(0.95)
        assert row["n_tokens"] == d.height
        np.testing.assert_allclose([row["r"], row["r_ci_low"], row["r_ci_high"]], [ref.statistic, ci.low, ci.high], rtol=1e-9)
    last = got.row(-1, named=True)
    assert summary["r_path_logit"][0] == pytest.approx(last["r"], rel=1e-9)
    np.testing.assert_allclose([summary["r_ci_low"][0], summary["r_ci_high"][0]], [last["r_ci_low"], last["r_ci_high"]], rtol=1e-9)


def test_mi_matches_notebook_function(run_dir, inputs):
    from probe_core.mutual_info import notebook_pair_mi

    chunks = reference_chunks(inputs, run_dir)
    model = GPT2LMHeadModel.from_pretrained(inputs["models"][1]).eval()
    with torch.no_grad():
        hidden = model(torch.as_tensor(chunks[:2]), output_hidden_states=True).hidden_states[1]
    h = hidden.reshape(-1, hidden.shape[-1])[:100].double().numpy()
    mi = table(run_dir, "mi").filter((pl.col("model") == "tiny-b") & (pl.col("layer") == 1))
    d = h.shape[1]
    assert mi.height == d * (d - 1) // 2
    for row in mi.sample(20, seed=0).iter_rows(named=True):
        assert row["mi_bits"] == pytest.approx(notebook_pair_mi(h[:, row["dim_i"]], h[:, row["dim_j"]]), abs=1e-6)


def test_attn_ar_pooled_matches_statsmodels(run_dir):
    import statsmodels.api as sm

    norms = table(run_dir, "attn_norms").filter((pl.col("model") == "tiny-a") & (pl.col("layer") == 1)).sort("chunk", "pos")
    y = norms["log_norm"].to_numpy().astype(np.float64).reshape(9, CHUNK)
    t = np.arange(3, CHUNK)
    Y, X1, X2 = y[:, t].ravel(), y[:, t - 1].ravel(), y[:, t - 2].ravel()
    res = sm.OLS(Y, sm.add_constant(np.column_stack([X1, X2]))).fit()
    row = table(run_dir, "attn_ar").filter((pl.col("model") == "tiny-a") & (pl.col("layer") == 1) & pl.col("chunk").is_null())
    assert row["n"][0] == len(Y)
    np.testing.assert_allclose([row["b0"][0], row["b1"][0], row["b2"][0]], res.params, rtol=1e-8)
    np.testing.assert_allclose([row["p1"][0], row["p2"][0]], res.pvalues[1:], rtol=1e-6)


def test_rotation_matches_scipy(run_dir):
    from scipy.stats import ttest_rel

    angles = table(run_dir, "rotation_angles").filter((pl.col("model") == "tiny-a") & (pl.col("layer") == 2))
    tgt = angles.filter(pl.col("kind") == "target").sort("chunk", "pos")["angle_rad"].to_numpy().astype(float)
    prev = angles.filter(pl.col("kind") == "previous").sort("chunk", "pos")["angle_rad"].to_numpy().astype(float)
    assert len(tgt) >= 5
    res = ttest_rel(tgt, prev)
    row = table(run_dir, "rotation").filter((pl.col("model") == "tiny-a") & (pl.col("layer") == 2) & (pl.col("source") == "corpus"))
    assert row["n"][0] == len(tgt)
    assert row["t"][0] == pytest.approx(res.statistic, rel=1e-9)
    assert row["p"][0] == pytest.approx(res.pvalues if hasattr(res, "pvalues") else res.pvalue, rel=1e-9)
    ids = table(run_dir, "tokens").filter(pl.col("model") == "tiny-a").join(
        angles.filter(pl.col("kind") == "target").select("chunk", "pos"), on=["chunk", "pos"])
    assert set(ids["token_id"].to_list()) == {607}  # " her"


@pytest.fixture(scope="module")
def options_run(ray_local, inputs):
    sentences = inputs["root"] / "sentences.txt"
    sentences.write_text("Mary thanked her brother.\nWhen John arrived, Alice called her sister again in Paris.\n\nHer.\n")
    out = str(inputs["root"] / "run-options")
    code = main(["run", "--models", inputs["models"][0], "--data", inputs["data"], "--out", out, "--chunk-tokens", str(CHUNK),
                 "--max-tokens", str(CHUNK * 3), "--analyses", "path,rotation,mi", "--sentences", str(sentences),
                 "--mi-method", "ksg", "--mi-tokens", "40", "--final-hidden", "pre_ln_f"])
    assert code == 0
    return out


def test_sentences_use_real_positions_only(options_run, gpt2_tokenizer):
    angles = table(options_run, "rotation_angles").filter(pl.col("source") == "sentences")
    occ = angles.filter(pl.col("kind") == "target").select("chunk", "pos").unique().sort("chunk", "pos")
    # " her" (607) follows another token in sentences 0 and 1; "Her." starts sentence 2, so no occurrence there.
    expected = []
    for i, s in enumerate(["Mary thanked her brother.", "When John arrived, Alice called her sister again in Paris.", "Her."]):
        ids = gpt2_tokenizer(s)["input_ids"]
        expected += [(i, t) for t in range(1, len(ids)) if ids[t] == 607]
    assert [tuple(r) for r in occ.iter_rows()] == expected
    summary = table(options_run, "rotation")
    assert set(summary["source"].to_list()) == {"corpus", "sentences"}
    assert summary.filter(pl.col("source") == "sentences")["n"].to_list() == [len(expected)] * 3


def test_pre_ln_f_changes_only_the_last_step(options_run, run_dir):
    a = table(options_run, "layer_metrics").filter(pl.col("model") == "tiny-a").sort("chunk", "pos", "layer")
    b = table(run_dir, "layer_metrics").filter((pl.col("model") == "tiny-a") & (pl.col("chunk") < 3)).sort("chunk", "pos", "layer")
    early_a, early_b = a.filter(pl.col("layer") < 3), b.filter(pl.col("layer") < 3)
    np.testing.assert_allclose(early_a["path_step"].to_numpy(), early_b["path_step"].to_numpy(), rtol=1e-6)
    last_a, last_b = a.filter(pl.col("layer") == 3)["path_step"].to_numpy(), b.filter(pl.col("layer") == 3)["path_step"].to_numpy()
    assert not np.allclose(last_a, last_b)


def test_ksg_mi_runs_per_layer(options_run, inputs):
    from probe_core.metrics import forward_metrics
    from probe_core.mutual_info import ksg_mi_matrix, upper_pairs

    chunks = reference_chunks(inputs, options_run)
    model = GPT2LMHeadModel.from_pretrained(inputs["models"][0]).eval()
    with torch.no_grad():
        hidden = forward_metrics(model, torch.as_tensor(chunks[:1]), final_hidden="pre_ln_f")["hidden"]
    mi = table(options_run, "mi").sort("layer", "dim_i", "dim_j")
    assert sorted(set(mi["layer"].to_list())) == [0, 1, 2, 3]
    last = hidden[3, 0, :40].numpy()
    expected = upper_pairs(ksg_mi_matrix(last, seed=0))[2]
    np.testing.assert_allclose(mi.filter(pl.col("layer") == 3)["mi_bits"].to_numpy(), expected, atol=1e-6)


def test_neuron_heatmap_agrees_with_sampled_activations(run_dir):
    heat = table(run_dir, "neuron_heatmap").filter(pl.col("model") == "tiny-a")
    assert heat.height > 0 and heat["in_sample_chunk"].any()
    held_out = heat.filter(~pl.col("in_sample_chunk"))
    assert held_out.height == CHUNK and not held_out["sampled"].any()  # always one chunk without sampled tokens
    assert 8 not in set(table(run_dir, "activations")["chunk"].to_list())  # the last chunk is kept out of the sample
    layer, neuron = int(heat["layer"][0]), int(heat["neuron"][0])
    fits = table(run_dir, "neuron_logit").filter((pl.col("model") == "tiny-a") & (pl.col("status") == "ok"))
    per_layer = fits.group_by("layer").agg(pl.col("significant").sum().alias("k"))
    assert per_layer.filter(pl.col("layer") == layer)["k"][0] == per_layer["k"].max()
    acts = table(run_dir, "activations").filter((pl.col("model") == "tiny-a") & (pl.col("layer") == layer))
    joined = heat.filter(pl.col("sampled")).join(acts, on=["chunk", "pos"])
    assert joined.height == heat["sampled"].sum() > 0
    stored = np.array([v[neuron] for v in joined["values"].to_list()], dtype=np.float64)
    np.testing.assert_allclose(joined["activation"].to_numpy(), stored, rtol=2e-3, atol=2e-3)  # float16 storage


def test_mi_null_columns_consistent(run_dir):
    mi = table(run_dir, "mi")
    summary = table(run_dir, "mi_summary")
    joined = mi.join(summary.select("model", "layer", "null_p99_bits", "null_mean_bits", "excess_mean_bits", "mean_bits"),
                     on=["model", "layer"])
    assert (joined["above_null"] == (joined["mi_bits"] > joined["null_p99_bits"])).all()
    assert summary["null_mean_bits"].is_not_nan().all()
    np.testing.assert_allclose(summary["excess_mean_bits"], summary["mean_bits"] - summary["null_mean_bits"])
    assert mi["mi_bits_mm"].is_not_nan().all()
