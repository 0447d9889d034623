"""Figures and the offline HTML report on small synthetic, schema-correct tables (2 models, 3 and 4 layers)."""
import base64
import re

import numpy as np
import polars as pl
import pytest

from jobs import figures
from jobs.report import write_report

MODELS = {"gpt2": dict(n_layer=3, n_embd=6, d_mlp=10), "gpt2-medium": dict(n_layer=4, n_embd=7, d_mlp=12)}
N_CHUNK, N_POS = 3, 24
VOCAB = [" the", " Paris", "<script>", " $5", "\n", " of", " Ada", ".", " and", "\t"]
I16, I32 = pl.Int16, pl.Int32
ALL_FIGURES = ["path_cumulative", "path_logit_vs_step", "rotation_angles", "rotation_t", "neurons_beta",
               "neurons_per_layer", "neurons_heatmap", "mi_layer", "mi_density", "attn_strip", "attn_hist",
               "attn_ar_coefs"]


def _grid(model, n_layer=None, chunks=range(N_CHUNK)):
    """(model, chunk, pos[, layer]) rows in key order."""
    axes = [np.array(list(chunks)), np.arange(N_POS)] + ([np.arange(1, n_layer + 1)] if n_layer else [])
    mesh = [a.ravel() for a in np.meshgrid(*axes, indexing="ij")]
    cols = {"model": [model] * len(mesh[0]), "chunk": pl.Series(mesh[0], dtype=I32),
            "pos": pl.Series(mesh[1], dtype=I32)}
    if n_layer:
        cols["layer"] = pl.Series(mesh[2], dtype=I16)
    return pl.DataFrame(cols)


def _model_tables(model, n_layer, n_embd, d_mlp, rng):
    n_tok = N_CHUNK * N_POS
    tok = _grid(model).with_columns(
        row=pl.int_range(pl.len(), dtype=pl.Int64), token_id=pl.Series(rng.integers(0, 50257, n_tok), dtype=I32),
        token=pl.Series(rng.choice(VOCAB, n_tok)), next_token_id=pl.Series(rng.integers(0, 50257, n_tok), dtype=I32),
        next_token_logit=pl.Series(rng.normal(5, 2, n_tok), dtype=pl.Float32),
        is_proper_noun=pl.Series(rng.random(n_tok) < 0.2))
    last = pl.col("pos") == N_POS - 1
    tok = tok.with_columns(pl.when(~last).then(pl.col(c)).alias(c) for c in ("next_token_id", "next_token_logit"))
    lm = _grid(model, n_layer).with_columns(path_step=pl.Series(rng.gamma(2.0, 1.0, n_tok * n_layer), dtype=pl.Float32),
                                            angle_rad=pl.Series(rng.uniform(0, 3, n_tok * n_layer), dtype=pl.Float32))
    lm = lm.with_columns(path_cum=pl.col("path_step").cum_sum().over("chunk", "pos"))
    occ = [(t, s, c, p) for t in (" Paris", "<script>") for s in ("corpus", "sentences") for c, p in [(0, 3), (1, 5), (2, 7)]]
    ra = pl.DataFrame([dict(model=model, target=t, source=s, chunk=c, pos=p, layer=lay, kind=k,
                            angle_rad=float(rng.uniform(0, 2))) for t, s, c, p in occ
                       for lay in range(1, n_layer + 1) for k in figures.KIND_COLORS],
                      schema_overrides=dict(chunk=I32, pos=I32, layer=I16, angle_rad=pl.Float32))
    rot = (ra.group_by("model", "target", "source", "layer")
           .agg(pl.len().cast(I32).alias("n"), *[pl.col("angle_rad").filter(pl.col("kind") == k).mean().cast(pl.Float64)
                                                 .alias(f"mean_{k}_rad") for k in figures.KIND_COLORS])
           .with_columns(t=pl.lit(rng.normal(0, 3)), p=pl.lit(float(rng.uniform()))))
    rot = rot.with_columns(t=pl.Series(rng.normal(0, 3, rot.height)), p=pl.Series(rng.uniform(0, 0.1, rot.height)))
    rot = rot.with_columns(significant=pl.col("p") < 0.02)
    act = _grid(model, n_layer, chunks=[1, 2]).with_columns(
        label=pl.Series(rng.random(2 * N_POS * n_layer) < 0.3),
        values=pl.Series([rng.normal(size=d_mlp).astype(np.float16) for _ in range(2 * N_POS * n_layer)],
                         dtype=pl.Array(pl.Float16, d_mlp)))
    n_nl = n_layer * d_mlp
    beta, p = rng.normal(0, 1, n_nl), rng.uniform(0, 1, n_nl) ** 3
    nl = pl.DataFrame(dict(model=[model] * n_nl, layer=pl.Series(np.repeat(np.arange(1, n_layer + 1), d_mlp), dtype=I16),
                           neuron=pl.Series(np.tile(np.arange(d_mlp), n_layer), dtype=I32), n=pl.Series([n_tok] * n_nl, dtype=I32),
                           beta=beta, se=np.full(n_nl, 0.5), z=beta / 0.5, p=p, significant=p < 0.05, q_bh=np.minimum(p * 3, 1),
                           status=["ok"] * n_nl, converged=[True] * n_nl, n_iter=pl.Series([6] * n_nl, dtype=I16)))
    iu, ju = np.triu_indices(n_embd, 1)
    mi = pl.DataFrame(dict(model=model, layer=pl.Series(np.repeat(np.arange(n_layer + 1), len(iu)), dtype=I16),
                           dim_i=pl.Series(np.tile(iu, n_layer + 1), dtype=I32), dim_j=pl.Series(np.tile(ju, n_layer + 1), dtype=I32),
                           mi_bits=rng.gamma(1.0, 0.05, len(iu) * (n_layer + 1))))
    mis = mi.group_by("model", "layer").agg(pl.lit(n_tok, I32).alias("n_tokens"), pl.col("mi_bits").mean().alias("mean_bits"),
                                            pl.col("mi_bits").median().alias("median_bits"),
                                            pl.col("mi_bits").quantile(0.05).alias("p05_bits"),
                                            pl.col("mi_bits").quantile(0.95).alias("p95_bits"))
    an = _grid(model, n_layer).with_columns(log_norm=pl.Series(rng.normal(2, 0.5, n_tok * n_layer), dtype=pl.Float32))
    ar_keys = [(lay, c) for lay in range(1, n_layer + 1) for c in [None, 0, 1, 2]]
    ar = pl.DataFrame(dict(model=model, layer=pl.Series([k[0] for k in ar_keys], dtype=I16),
                           chunk=pl.Series([k[1] for k in ar_keys], dtype=I32), n=pl.Series([N_POS] * len(ar_keys), dtype=I32),
                           b0=rng.normal(size=len(ar_keys)), b1=rng.normal(0.4, 0.2, len(ar_keys)),
                           b2=rng.normal(0.1, 0.2, len(ar_keys)), p1=rng.uniform(0, 0.05, len(ar_keys)),
                           p2=rng.uniform(0, 1, len(ar_keys)), r2=rng.uniform(size=len(ar_keys)), status="ok"))
    hm = tok.select("model", "chunk", "pos", "token").with_columns(
        activation=pl.Series(rng.normal(size=n_tok), dtype=pl.Float32), sampled=pl.col("chunk") >= 1)
    ps = pl.DataFrame(dict(model=[model], n_tokens=[n_tok - N_CHUNK], r_path_logit=[float(rng.uniform(-1, 1))]))
    return dict(tokens=tok, layer_metrics=lm, path_summary=ps, rotation_angles=ra, rotation=rot, activations=act,
                neuron_logit=nl, mi=mi, mi_summary=mis, attn_norms=an, attn_ar=ar, heatmap=hm)


def make_tables(seed=0) -> dict[str, pl.DataFrame]:
    rng = np.random.default_rng(seed)
    per_model = [_model_tables(m, rng=rng, **cfg) for m, cfg in MODELS.items()]
    return {k: pl.concat([t[k] for t in per_model], how="vertical_relaxed") for k in per_model[0]}


@pytest.fixture(scope="module")
def frames():
    return make_tables()


@pytest.fixture(scope="module")
def rendered(frames, tmp_path_factory):
    fig_dir = tmp_path_factory.mktemp("run") / "figures"
    return figures.render_all({k: v.lazy() for k, v in frames.items()}, str(fig_dir)), fig_dir


def test_render_all_writes_every_figure(rendered):
    entries, _ = rendered
    assert [e["name"] for e in entries] == ALL_FIGURES
    for e in entries:
        assert e["section"] in {"path", "rotation", "neurons", "mi", "attn_ar"} and e["title"]
        png, svg = open(e["png"], "rb").read(), open(e["svg"], "rb").read()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
        assert b"<svg" in svg[:2000] and len(svg) > 5000


def test_render_all_skips_missing_and_empty_tables(frames, tmp_path):
    keep = {k: v.lazy() for k, v in frames.items() if k not in {"mi", "heatmap", "rotation_angles"}}
    keep["attn_norms"] = frames["attn_norms"].lazy().head(0)  # empty table: figures skipped, no error
    keep["rotation"] = None
    names = [e["name"] for e in figures.render_all(keep, str(tmp_path))]
    assert names == ["path_cumulative", "path_logit_vs_step", "neurons_beta", "neurons_per_layer", "attn_ar_coefs"]
    assert figures.render_all({}, str(tmp_path / "none")) == []
    no_sig = frames["neuron_logit"].with_columns(significant=pl.lit(False))
    only = {"heatmap": frames["heatmap"].lazy(), "neuron_logit": no_sig.lazy()}
    assert "neurons_heatmap" in [e["name"] for e in figures.render_all(only, str(tmp_path / "h"))]


def test_default_layers_follow_the_data(frames):
    nl = frames["neuron_logit"]
    for model in MODELS:
        d = nl.filter(pl.col("model") == model)
        counts = {lay: int(d.filter(pl.col("layer") == lay)["significant"].sum()) for lay in d["layer"].unique()}
        top = max(counts.values())
        assert figures.neuron_layers(nl.lazy())[model] == min(k for k, v in counts.items() if v == top)
        layer = figures.neuron_layers(nl.lazy())[model]
        cand = d.filter((pl.col("layer") == layer) & pl.col("significant") & (pl.col("beta") > 0))
        best = figures.best_neurons(nl.lazy(), {model: layer}).get(model)
        if cand.height:
            i = int(np.argmax(cand["beta"].to_numpy()))
            assert best == (layer, cand["neuron"][i], pytest.approx(cand["beta"][i]))
        else:
            assert best is None
    mi = frames["mi"]
    means = mi.group_by("model", "layer").agg(pl.col("mi_bits").mean())
    for model, layer in figures.mi_layers(mi.lazy()).items():
        m = means.filter(pl.col("model") == model)
        assert layer == m.sort("mi_bits", descending=True)["layer"][0]
    assert figures.mi_layers(mi.lazy(), layer=2) == {"gpt2": 2, "gpt2-medium": 2}


def test_binned_density_matches_numpy_histogram(frames):
    centres, dens = figures._binned_density(frames["attn_norms"].lazy(), "log_norm", 0.0, 1.0, bins=20)
    for model in MODELS:
        vals = frames["attn_norms"].filter(pl.col("model") == model)
        lo, hi = vals["log_norm"].min(), vals["log_norm"].max()
        for layer in (1, 3):
            v = vals.filter(pl.col("layer") == layer)["log_norm"].to_numpy().astype(np.float64)
            ref, edges = np.histogram(v, bins=20, range=(lo, hi), density=True)
            got = np.zeros(20)
            d = dens.filter((pl.col("model") == model) & (pl.col("layer") == layer))
            got[d["bin"].to_numpy()] = d["density"].to_numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-6)
            np.testing.assert_allclose(centres[model], (edges[:-1] + edges[1:]) / 2, rtol=1e-6)


def test_thin_caps_and_is_deterministic(frames):
    lf = frames["attn_norms"].lazy()
    a = figures._thin(lf, ["model", "layer"], ["chunk", "pos"], 10).collect()
    b = figures._thin(lf, ["model", "layer"], ["chunk", "pos"], 10).collect()
    assert a.equals(b) and 0 < a.height < frames["attn_norms"].height / 3
    assert a.columns == frames["attn_norms"].columns


def test_heatmap_uses_in_sample_chunk_and_path_title_has_r(frames):
    lazy = {k: v.lazy() for k, v in frames.items()}
    fig = figures.fig_token_heatmap(lazy["heatmap"], lazy["neuron_logit"], lazy["activations"], chunk=0)
    assert all("chunk 1" in ax.get_title() for ax in fig.axes if ax.get_title())  # chunk 0 has no activations
    fig = figures.fig_token_heatmap(lazy["heatmap"], chunk=2)
    assert all("chunk 2" in ax.get_title() for ax in fig.axes if ax.get_title())
    fig = figures.fig_logit_vs_step(lazy["tokens"], lazy["layer_metrics"], lazy["path_summary"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert [f"r = {r:.3f}" in t for r, t in zip(frames["path_summary"]["r_path_logit"], titles)] == [True, True]


def test_figure_rejects_empty_input(frames):
    with pytest.raises(figures.NoData, match="no rows"):
        figures.fig_attn_ar_coefs(frames["attn_ar"].lazy().filter(pl.col("chunk").is_not_null()))


def test_write_report_is_self_contained(frames, rendered, tmp_path):
    entries, _ = rendered
    manifest = {"run_id": "run-<1>", "models": list(MODELS), "data": {"dataset": "wikitext", "chunks": N_CHUNK},
                "stages": {"capture": {"seconds": 12.5, "status": "done"}, "mi": {"seconds": 3.25}}}
    path = write_report(str(tmp_path), manifest, {k: v.lazy() for k, v in frames.items()}, entries)
    html = open(path, encoding="utf-8").read()
    assert path.endswith("report.html")
    for e in entries:
        b64 = base64.b64encode(open(e["png"], "rb").read()).decode()
        assert f"data:image/png;base64,{b64}" in html
    for heading in ("Path length", "Rotation", "Proper-noun neurons", "Mutual information", "Attention"):
        assert re.search(rf"<h2[^>]*>[^<]*{heading}", html), heading
    assert "&lt;script&gt;" in html and "run-&lt;1&gt;" in html and "capture" in html and "12.5" in html
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert not re.search(r"(src|href)\s*=\s*[\"']?https?:", html) and "@import" not in html
    assert html.count("<tr>") <= 6 * 52 + 10  # every summary table is cut at 50 rows


def test_write_report_without_tables(tmp_path):
    path = write_report(str(tmp_path), {}, {}, [])
    html = open(path, encoding="utf-8").read()
    assert "<h2" in html and "not run" in html.lower() and "data:image" not in html
