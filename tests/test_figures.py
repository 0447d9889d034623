"""Figures and the offline HTML report on small synthetic, schema-correct tables (2 models, 3 and 4 layers)."""
import base64
import re

import matplotlib
import numpy as np
import polars as pl
import pytest

from jobs import figures, plotting
from jobs.analyses import attn_ar, path, rotation
from jobs.analyses.mi import figures as mi_figures
from jobs.analyses.neurons import figures as token_heatmap
from jobs.plotting import NoData
from jobs.report import write_report

MODELS = {"gpt2": dict(n_layer=3, n_embd=6, d_mlp=10), "gpt2-medium": dict(n_layer=4, n_embd=7, d_mlp=12)}
N_CHUNK, N_POS = 3, 24
VOCAB = [" the", " Paris", "<script>", " $5", "$x$", "\n", " of", " Ada", ".", " and", "\t"]  # $..$: no mathtext
I16, I32 = pl.Int16, pl.Int32
ALL_FIGURES = ["path_cumulative", "path_logit_vs_step", "rotation_angles", "rotation_t", "neurons_beta",
               "neurons_per_layer", "token_heatmap_in_sample", "token_heatmap_held_out", "mi_layer", "mi_density",
               "attn_strip", "attn_hist", "attn_ar_coefs"]


def _grid(model, n_layer=None, chunks=range(N_CHUNK)):
    """(model, chunk, pos[, layer]) key rows in key order."""
    axes = [np.array(list(chunks)), np.arange(N_POS)] + ([np.arange(1, n_layer + 1)] if n_layer else [])
    mesh = [a.ravel() for a in np.meshgrid(*axes, indexing="ij")]
    cols = {"model": [model] * len(mesh[0]), "chunk": pl.Series(mesh[0], dtype=I32),
            "pos": pl.Series(mesh[1], dtype=I32)}
    if n_layer:
        cols["layer"] = pl.Series(mesh[2], dtype=I16)
    return pl.DataFrame(cols)


def _f32(values):
    return pl.Series(values, dtype=pl.Float32)


def _token_tables(model, n_layer, rng):
    n = N_CHUNK * N_POS
    tok = _grid(model).with_columns(
        row=pl.int_range(pl.len(), dtype=pl.Int64), token_id=pl.Series(rng.integers(0, 50257, n), dtype=I32),
        token=pl.Series(rng.choice(VOCAB, n)), next_token_id=pl.Series(rng.integers(0, 50257, n), dtype=I32),
        next_token_logit=_f32(rng.normal(5, 2, n)), is_proper_noun=pl.Series(rng.random(n) < 0.2))
    at_end = pl.col("pos") == N_POS - 1  # no next token at the chunk end
    tok = tok.with_columns(pl.when(~at_end).then(pl.col(c)).alias(c) for c in ("next_token_id", "next_token_logit"))
    lm = _grid(model, n_layer).with_columns(path_step=_f32(rng.gamma(2.0, 1.0, n * n_layer)),
                                            angle_rad=_f32(rng.uniform(0, 3, n * n_layer)))
    lm = lm.with_columns(path_cum=pl.col("path_step").cum_sum().over("chunk", "pos"))
    r = float(rng.uniform(-0.9, 0.9))
    ps = pl.DataFrame(dict(model=[model], n_tokens=[n - N_CHUNK], r_path_logit=[r], r_ci_low=[r - 0.1], r_ci_high=[r + 0.1]))
    r_layer = rng.uniform(-0.9, 0.9, n_layer)
    plr = pl.DataFrame(dict(model=model, layer=pl.Series(np.arange(1, n_layer + 1), dtype=I16),
                            n_tokens=[n - N_CHUNK] * n_layer, r=r_layer, r_ci_low=r_layer - 0.1, r_ci_high=r_layer + 0.1))
    an = _grid(model, n_layer).with_columns(log_norm=_f32(rng.normal(2, 0.5, n * n_layer)))
    return dict(tokens=tok, layer_metrics=lm, path_summary=ps, path_layer_r=plr, attn_norms=an)


def _rotation_tables(model, n_layer, rng):
    occ = [(t, s, c, p) for t in (" Paris", "<script>") for s in ("corpus", "sentences") for c, p in [(0, 3), (1, 5)]]
    ra = pl.DataFrame([dict(model=model, target=t, source=s, chunk=c, pos=p, layer=lay, kind=k,
                            angle_rad=float(rng.uniform(0, 2)))
                       for t, s, c, p in occ for lay in range(1, n_layer + 1) for k in rotation.KIND_COLORS],
                      schema_overrides=dict(chunk=I32, pos=I32, layer=I16, angle_rad=pl.Float32))
    means = [pl.col("angle_rad").filter(pl.col("kind") == k).mean().cast(pl.Float64).alias(f"mean_{k}_rad")
             for k in rotation.KIND_COLORS]
    rot = ra.group_by("model", "target", "source", "layer", maintain_order=True).agg(
        (pl.len() // 3).cast(I32).alias("n"), *means)
    rot = rot.with_columns(t=pl.Series(rng.normal(0, 3, rot.height)), p=pl.Series(rng.uniform(0, 0.1, rot.height)))
    rot = rot.with_columns(significant=pl.col("p") < 0.02, d_z=pl.col("t") / 3.0,
                           diff_ci_low_rad=pl.lit(-0.1), diff_ci_high_rad=pl.lit(0.1))
    return dict(rotation_angles=ra, rotation=rot)


def _neuron_tables(model, n_layer, d_mlp, rng):
    act = _grid(model, n_layer, chunks=[1, 2])  # chunk 0 is out of sample
    act = act.with_columns(label=pl.Series(rng.random(act.height) < 0.3), values=pl.Series(
        rng.normal(size=(act.height, d_mlp)).astype(np.float16), dtype=pl.Array(pl.Float16, d_mlp)))
    n = n_layer * d_mlp
    beta, p = rng.normal(0, 1, n), rng.uniform(0, 1, n) ** 3
    nl = pl.DataFrame(dict(
        model=[model] * n, layer=pl.Series(np.repeat(np.arange(1, n_layer + 1), d_mlp), dtype=I16),
        neuron=pl.Series(np.tile(np.arange(d_mlp), n_layer), dtype=I32), n=pl.Series([N_CHUNK * N_POS] * n, dtype=I32),
        beta=beta, se=np.full(n, 0.5), z=beta / 0.5, p=p, beta_ci_low=beta - 0.98, beta_ci_high=beta + 0.98,
        auroc=rng.uniform(0, 1, n), significant=p < 0.05, q_bh=np.minimum(p * 3, 1),
        status=["ok"] * n, converged=[True] * n, n_iter=pl.Series([6] * n, dtype=I16)))
    hm = _grid(model, chunks=[2, 0]).with_columns(  # chunk 2 from the neuron sample, chunk 0 held out
        layer=pl.lit(n_layer, I16), neuron=pl.lit(d_mlp - 1, I32), activation=_f32(rng.normal(0, 2, 2 * N_POS)),
        in_sample_chunk=pl.col("chunk") == 2)
    hm = hm.with_columns(sampled=pl.col("in_sample_chunk") & pl.Series(rng.random(hm.height) < 0.3))
    return dict(activations=act, neuron_logit=nl, neuron_heatmap=hm)


def _mi_tables(model, n_layer, n_embd, rng):
    iu, ju = np.triu_indices(n_embd, 1)
    reps = n_layer + 1  # hidden_states index 0..n_layer
    mi = pl.DataFrame(dict(model=model, layer=pl.Series(np.repeat(np.arange(reps), len(iu)), dtype=I16),
                           dim_i=pl.Series(np.tile(iu, reps), dtype=I32), dim_j=pl.Series(np.tile(ju, reps), dtype=I32),
                           mi_bits=rng.gamma(1.0, 0.05, len(iu) * reps)))
    mi = mi.with_columns(mi_bits_mm=pl.col("mi_bits") - 0.02, above_null=pl.col("mi_bits") > 0.1)
    v = pl.col("mi_bits")
    mis = mi.group_by("model", "layer").agg(
        pl.lit(N_CHUNK * N_POS, I32).alias("n_tokens"), v.mean().alias("mean_bits"), v.median().alias("median_bits"),
        v.quantile(0.05).alias("p05_bits"), v.quantile(0.95).alias("p95_bits"), pl.col("mi_bits_mm").mean().alias("mean_bits_mm"),
        pl.lit(0.02).alias("null_mean_bits"), pl.lit(0.05).alias("null_p95_bits"), pl.lit(0.1).alias("null_p99_bits"),
        (v.mean() - 0.02).alias("excess_mean_bits"))
    null = mi.select("model", "layer", "dim_i", "dim_j", mi_bits=pl.Series(rng.gamma(1.0, 0.01, mi.height)))
    return dict(mi=mi, mi_null=null, mi_summary=mis)


def _ar_table(model, n_layer, rng):
    keys = [(lay, c) for lay in range(1, n_layer + 1) for c in [None, 0, 1, 2]]  # chunk None = pooled row
    k = len(keys)
    return dict(attn_ar=pl.DataFrame(dict(
        model=model, layer=pl.Series([x[0] for x in keys], dtype=I16), chunk=pl.Series([x[1] for x in keys], dtype=I32),
        n=pl.Series([N_POS] * k, dtype=I32), b0=rng.normal(size=k), b1=rng.normal(0.4, 0.2, k),
        b2=rng.normal(0.1, 0.2, k), p1=rng.uniform(0, 0.05, k), p2=rng.uniform(0, 1, k), r2=rng.uniform(size=k),
        status="ok")).with_columns(significant1=pl.col("p1") < 0.01, significant2=pl.col("p2") < 0.01))


def make_tables(seed=0) -> dict[str, pl.DataFrame]:
    """Every table for both MODELS, schema-correct, random values."""
    rng = np.random.default_rng(seed)
    per_model = [{**_token_tables(m, c["n_layer"], rng), **_rotation_tables(m, c["n_layer"], rng),
                  **_neuron_tables(m, c["n_layer"], c["d_mlp"], rng), **_mi_tables(m, c["n_layer"], c["n_embd"], rng),
                  **_ar_table(m, c["n_layer"], rng)} for m, c in MODELS.items()]
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
    assert [e["name"] for e in entries if e["section"] != "across"] == ALL_FIGURES  # across: test_across_sizes
    for e in entries:
        assert e["section"] in {"across", "path", "rotation", "neurons", "mi", "attn_ar"} and e["title"]
        png, svg = open(e["png"], "rb").read(), open(e["svg"], "rb").read()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
        assert b"<svg" in svg[:2000] and len(svg) > 5000


def test_render_all_skips_missing_and_empty_tables(frames, tmp_path):
    keep = {k: v.lazy() for k, v in frames.items() if k not in {"mi", "neuron_heatmap", "rotation_angles"}}
    keep["attn_norms"] = frames["attn_norms"].lazy().head(0)  # empty table: figures skipped, no error
    keep["rotation"] = None
    names = [e["name"] for e in figures.render_all(keep, str(tmp_path)) if e["section"] != "across"]
    assert names == ["path_cumulative", "path_logit_vs_step", "neurons_beta", "neurons_per_layer", "attn_ar_coefs"]
    assert figures.render_all({}, str(tmp_path / "none")) == []
    hm, tok = frames["neuron_heatmap"].lazy(), frames["tokens"].lazy()
    assert figures.render_all({"neuron_heatmap": hm}, str(tmp_path / "h0")) == []  # token text needed
    names = [e["name"] for e in figures.render_all({"neuron_heatmap": hm, "tokens": tok}, str(tmp_path / "h2"))]
    assert names == ["token_heatmap_in_sample", "token_heatmap_held_out"]
    only_in = {"neuron_heatmap": hm.filter(pl.col("in_sample_chunk")), "tokens": tok}
    assert [e["name"] for e in figures.render_all(only_in, str(tmp_path / "h1"))] == ["token_heatmap_in_sample"]


def test_default_layers_follow_the_data(frames):
    nl = frames["neuron_logit"]
    for model in MODELS:
        d = nl.filter(pl.col("model") == model)
        counts = {lay: int(d.filter(pl.col("layer") == lay)["significant"].sum()) for lay in d["layer"].unique()}
        top = max(counts.values())
        assert token_heatmap.neuron_layers(nl.lazy())[model] == min(k for k, v in counts.items() if v == top)
    mi = frames["mi"]
    means = mi.group_by("model", "layer").agg(pl.col("mi_bits").mean())
    for model, layer in mi_figures.mi_layers(mi.lazy()).items():
        m = means.filter(pl.col("model") == model)
        assert layer == m.sort("mi_bits", descending=True)["layer"][0]
    assert mi_figures.mi_layers(mi.lazy(), layer=2) == {"gpt2": 2, "gpt2-medium": 2}


def test_binned_density_matches_numpy_histogram(frames):
    centres, dens = plotting.binned_density(frames["attn_norms"].lazy(), "log_norm", 0.0, 1.0, bins=20)
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
    a = plotting.thin(lf, ["model", "layer"], ["chunk", "pos"], 10).collect()
    b = plotting.thin(lf, ["model", "layer"], ["chunk", "pos"], 10).collect()
    assert a.equals(b) and 0 < a.height < frames["attn_norms"].height / 3
    assert a.columns == frames["attn_norms"].columns


@pytest.mark.parametrize("in_sample, chunk", [(True, 2), (False, 0)])
def test_token_heatmap_draws_the_chunk_text_coloured_by_the_neuron(frames, in_sample, chunk):
    hm, tok, nl = frames["neuron_heatmap"], frames["tokens"], frames["neuron_logit"]
    fig = token_heatmap.fig_token_heatmap(hm.lazy(), tok.lazy(), nl.lazy(), in_sample=in_sample, max_tokens=20)
    text_axes = [ax for ax in fig.axes if ax.get_title()]
    colorbars = [ax for ax in fig.axes if not ax.get_title()]
    assert len(text_axes) == len(colorbars) == len(MODELS)
    for ax, cax, (model, cfg) in zip(text_axes, colorbars, MODELS.items()):
        sel = (pl.col("model") == model) & (pl.col("chunk") == chunk)
        rows, words = hm.filter(sel).sort("pos").head(20), tok.filter(sel).sort("pos").head(20)["token"].to_list()
        assert [t.get_text() for t in ax.texts] == [w.replace("\t", " ").replace("\n", "↵") for w in words]
        vmax = float(np.abs(hm.filter(pl.col("model") == model)["activation"].to_numpy()).max())  # both chunks
        np.testing.assert_allclose(sorted(np.abs(cax.get_ylim())), [vmax, vmax], rtol=1e-6)
        want = matplotlib.colormaps["RdBu_r"]((rows["activation"].to_numpy() / vmax + 1) / 2)
        np.testing.assert_allclose([p.get_facecolor() for p in ax.patches], want, atol=0.02)  # one colormap step
        assert sum(p.get_edgecolor()[3] > 0 for p in ax.patches) == rows["sampled"].sum() > (0 if in_sample else -1)
        layer, neuron = cfg["n_layer"], cfg["d_mlp"] - 1
        beta = nl.filter((pl.col("model") == model) & (pl.col("layer") == layer) & (pl.col("neuron") == neuron))["beta"]
        title = ax.get_title()
        assert f"layer {layer} neuron {neuron} (β = {beta[0]:.3g}" in title and f"chunk {chunk} " in title
        assert ("in the neuron sample" in title) == in_sample and ("held out" in title) != in_sample
        assert f"first 20 of {N_POS} tokens" in title
    with pytest.raises(ValueError, match="max_tokens"):
        token_heatmap.heatmap_rows(hm.lazy(), tok.lazy(), in_sample, max_tokens=0)


def test_path_title_has_r(frames):
    lazy = {k: v.lazy() for k, v in frames.items()}
    fig = path.fig_logit_vs_step(lazy["tokens"], lazy["layer_metrics"], lazy["path_summary"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert [f"r = {r:.3f}" in t for r, t in zip(frames["path_summary"]["r_path_logit"], titles)] == [True, True]


def test_figure_rejects_empty_input(frames):
    with pytest.raises(NoData, match="no rows"):
        attn_ar.fig_attn_ar_coefs(frames["attn_ar"].lazy().filter(pl.col("chunk").is_not_null()))


def test_write_report_is_self_contained(frames, rendered, tmp_path):
    entries, _ = rendered
    manifest = {"run_id": "run-<1>", "models": {m: {"source": "hub", **c} for m, c in MODELS.items()},
                "data": {"source": "wikitext <raw>", "chunks": N_CHUNK},
                "stages": {"capture": {"seconds": 12.5, "status": "done"}, "mi": {"seconds": 3.25}}}
    tables = {k: v.lazy() for k, v in frames.items()}
    rot = frames["rotation"]  # 28 rows: triple it so the 50-row head (25 per model) has to cut
    tables["rotation"] = pl.concat([rot.with_columns(target=pl.col("target") + f"#{i}") for i in range(3)]).lazy()
    path = write_report(str(tmp_path), manifest, tables, entries)
    html = open(path, encoding="utf-8").read()
    assert path.endswith("report.html")
    for e in entries:
        b64 = base64.b64encode(open(e["png"], "rb").read()).decode()
        assert f"data:image/png;base64,{b64}" in html
    for heading in ("Path length", "Rotation", "Proper-noun neurons", "Mutual information", "Attention"):
        assert re.search(rf"<h2[^>]*>[^<]*{heading}", html), heading
    assert "&lt;script&gt;" in html and "run-&lt;1&gt;" in html and "capture" in html and "12.5" in html
    assert "gpt2 (3 layers), gpt2-medium (4 layers)" in html and "source: wikitext &lt;raw&gt;" in html
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert not re.search(r"(src|href)\s*=\s*[\"']?https?:", html) and "@import" not in html
    rotation = html[html.index('<section id="rotation">'):].split("</section>")[0]
    assert rotation.count("<tr>") == 1 + 25 + 25 and "50 of 84 shown" in rotation  # header + 25 rows per model
    assert "gpt2-medium" in html[html.index('<section id="neurons">'):]


def test_write_report_without_tables(tmp_path):
    path = write_report(str(tmp_path), {}, {}, [])
    html = open(path, encoding="utf-8").read()
    assert "<h2" in html and "not run" in html.lower() and "data:image" not in html


def test_synthetic_tables_match_the_parquet_schema(frames):
    from jobs.analyses import REGISTRY
    from jobs.query import TOKEN_COLUMNS
    from jobs.schema import all_tables

    # The figures see tables as scan_tables gives them: ``tokens`` is the view joined with the corpus table.
    assert sorted(frames["tokens"].columns) == sorted(TOKEN_COLUMNS)
    # Every table of the five analyses drawn here (neuron_pages has its own tests); corpus has no model
    # column: the tokens frame stands for it (above).
    covered = {t.name for a in REGISTRY.values() if a.name != "neuron_pages" for t in a.tables}
    assert covered <= set(frames)
    for name, table in all_tables().items():  # activations: the models' fixed-size lists concatenate to a plain list
        if name not in covered:
            continue
        expected = pl.from_arrow(table.schema.empty_table()).schema
        got = frames[name].filter(pl.col("model") == "gpt2").select(list(expected)).schema
        assert {c: str(t) for c, t in got.items()} == {c: str(t) for c, t in expected.items()}, name
        assert frames[name].schema["model"] == pl.String


def test_attn_ar_markers_follow_the_significant_columns(frames):
    """Filled markers are the table's significant flags (the run's --alpha), not a fixed alpha."""
    pooled = frames["attn_ar"].filter(pl.col("chunk").is_null())

    def filled(df):
        fig = attn_ar.fig_attn_ar_coefs(df.lazy())
        return [sum(len(c.get_offsets()) for c in ax.collections) for ax in fig.axes[:2]]

    none = pooled.with_columns(significant1=False, significant2=False)
    every = pooled.with_columns(significant1=True, significant2=True)
    assert filled(none) == [0, 0] and filled(every) == [pooled.height, pooled.height]
