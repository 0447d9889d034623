"""The analysis contract: a sixth analysis defined outside the package, in a temporary module, runs end to
end through ``probe run`` with no edit to ``jobs/``: its actor-side capture writes its per-token table, its
statistics task its summary (through ``ModelWorker.apply`` too), and the report shows its section and figure."""
import os
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from jobs import analyses
from jobs.cli import main
from tests.corpus import write_corpus

TOY = textwrap.dedent('''
    """A toy analysis: the L2 norm of each token's final hidden state, and per model its mean."""
    import numpy as np
    import polars as pl
    import pyarrow as pa
    import ray
    from matplotlib.figure import Figure

    from jobs.analysis import Analysis, Capture, FigureSpec, Table, Write
    from jobs.store import Store

    NORMS = Table("toy_norms", pa.schema([("chunk", pa.int32()), ("pos", pa.int32()), ("norm", pa.float32())]))
    SUMMARY = Table("toy_summary", pa.schema([("n_tokens", pa.int64()), ("mean_norm", pa.float64()), ("d_model", pa.int64())]))


    def reduce(ctx):
        chunk, pos = ctx.grid()
        norm = ctx.out["hidden"][-1].float().norm(dim=-1).reshape(-1).cpu().numpy()
        return [Write(NORMS, pa.table({"chunk": chunk, "pos": pos, "norm": norm}))]


    def d_model(worker):
        return worker.spec.n_embd


    def summarise(store_uri, model, d):
        store = Store(store_uri)
        norms = store.scan_model(NORMS, model).collect()["norm"].to_numpy().astype(np.float64)
        store.write_table(SUMMARY, "all", pa.table({"n_tokens": [len(norms)], "mean_norm": [norms.mean()], "d_model": [d]}),
                          model=model)
        return len(norms)


    def stats(ctx, m):
        return [ray.remote(summarise).remote(ctx.store.uri, m.name, ctx.workers[m.name].apply.remote(d_model))]


    def draw(t, n_layers):
        df = t["toy_norms"].collect()
        fig = Figure()
        fig.subplots().hist(df["norm"].to_numpy(), bins=20)
        fig.suptitle("Toy: final hidden-state norms")
        return fig


    ANALYSIS = Analysis(
        name="toy", heading="Toy norms", blurb="The norm of every token's final hidden state.",
        tables=(NORMS, SUMMARY), capture=Capture(reduce=reduce), stats=stats,
        summaries=lambda t, manifest: [("Toy summary", t["toy_summary"].collect())] if "toy_summary" in t else [],
        figures=(FigureSpec("toy_hist", "Toy: final hidden-state norms", ("toy_norms",), draw),),
    )
''')


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy module in a temporary package folder, importable here and in Ray's workers (PYTHONPATH,
    PROBE_ANALYSES), registered for this test only."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toy_analysis.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", ""), os.getcwd()]))
    monkeypatch.setenv("PROBE_ANALYSES", "toy_analysis")
    module = __import__("toy_analysis")
    monkeypatch.setitem(analyses.REGISTRY, "toy", module.ANALYSIS)
    yield module
    sys.modules.pop("toy_analysis", None)


@pytest.mark.slow
def test_a_new_analysis_runs_end_to_end_without_edits(toy, tmp_path, tiny_model_dir):
    import ray

    assert not ray.is_initialized()  # the run starts its own Ray, whose workers inherit PYTHONPATH and PROBE_ANALYSES
    data = write_corpus(tmp_path / "corpus.txt", n_rows=20)
    out = str(tmp_path / "run")
    assert main(["run", "--models", tiny_model_dir, "--data", data, "--out", out, "--analyses", "toy",
                 "--chunk-tokens", "32", "--max-tokens", "96", "--batch-size", "2"]) == 0

    from jobs.api import run_query

    norms = run_query(out, "SELECT * FROM toy_norms").sort("chunk", "pos")
    tokens = run_query(out, "SELECT chunk, pos, token_id FROM tokens").sort("chunk", "pos")
    ids = torch.tensor(tokens["token_id"].to_numpy().reshape(3, 32), dtype=torch.long)
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    with torch.inference_mode():
        want = model(ids, output_hidden_states=True).hidden_states[-1].norm(dim=-1).reshape(-1).numpy()
    assert norms.height == 96 and norms["model"].unique().to_list() == ["tiny-gpt2"]
    np.testing.assert_allclose(norms["norm"].to_numpy(), want, rtol=1e-5)

    summary = run_query(out, "SELECT * FROM toy_summary")
    assert summary["n_tokens"].to_list() == [96] and summary["d_model"].to_list() == [32]  # d_model came through apply
    assert summary["mean_norm"][0] == pytest.approx(float(want.astype(np.float64).mean()), rel=1e-6)

    html = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    section = html[html.index('<section id="toy">'):].split("</section>")[0]
    assert "Toy norms" in section and 'id="fig-toy_hist"' in section and "Toy summary" in section
    assert os.path.isfile(os.path.join(out, "figures", "toy_hist.png"))
