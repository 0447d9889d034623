"""The path statistics task (``model_path_summary``) on a small synthetic run: its tables are
``probe_core.path_length.path_layer_correlations`` of the run's joined tokens and layer_metrics."""
import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from jobs.analyses import path
from jobs.store import Store
from probe_core.path_length import path_layer_correlations

MODEL, N_LAYER, N_CHUNKS = "tiny", 4, 12


def write_run(store: Store, chunk_tokens: int, seed: int = 0) -> None:
    """tokens and layer_metrics of one model, in several parts as the capture batches write them."""
    rng = np.random.default_rng(seed)
    for part in range(3):
        chunks = np.arange(part * N_CHUNKS // 3, (part + 1) * N_CHUNKS // 3, dtype=np.int32)
        chunk, pos = np.repeat(chunks, chunk_tokens), np.tile(np.arange(chunk_tokens, dtype=np.int32), len(chunks))
        logit = rng.normal(size=len(pos)).astype(np.float32)
        store.write_table(path.TOKENS, f"p{part}", pa.table({"chunk": chunk, "pos": pos, "next_token_logit": pa.array(
            logit, mask=pos == chunk_tokens - 1)}), model=MODEL)
        layer = np.repeat(np.arange(1, N_LAYER + 1, dtype=np.int16), len(pos))
        step = (rng.gamma(2.0, size=len(layer)) + 0.3 * (layer - 1) * np.tile(logit, N_LAYER)).astype(np.float32)
        step[rng.integers(0, len(step), 3)] = np.nan  # a non-finite step leaves out that token for its layer
        store.write_table(path.LAYER_METRICS, f"p{part}", pa.table({
            "chunk": np.tile(chunk, N_LAYER), "pos": np.tile(pos, N_LAYER), "layer": layer, "path_step": step,
            "path_cum": step, "angle_rad": step}), model=MODEL)


def read(store: Store, table: str) -> pl.DataFrame:
    return pl.read_parquet(store.list_files(table))


@pytest.mark.parametrize("chunk_tokens", [16, 2])  # 2: no token has both pos > 0 and a next token
def test_path_summary_tables_are_path_layer_correlations(tmp_path, chunk_tokens):
    store = Store(str(tmp_path / "run"))
    write_run(store, chunk_tokens)
    out = path.model_path_summary(store.uri, MODEL, N_LAYER)
    tokens = store.scan(f"tokens/model={MODEL}").select("chunk", "pos", "next_token_logit")
    steps = store.scan(f"layer_metrics/model={MODEL}").select("chunk", "pos", "layer", "path_step")
    want = path_layer_correlations(steps.join(tokens, on=["chunk", "pos"]))
    got = read(store, "path_layer_r").sort("layer")
    assert got.columns == want.columns and got.height == want.height == (N_LAYER if chunk_tokens > 2 else 0)
    assert got.select("layer", "n_tokens").equals(want.select("layer", "n_tokens"))
    # Polars' parallel joins and group_by sums take the rows in varying order: the last bits of r vary from
    # one run to the next, with the job's code as with this one.
    for c in ("r", "r_ci_low", "r_ci_high"):
        np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), rtol=1e-12)
    summary = read(store, "path_summary").row(0, named=True)
    last = want.filter(pl.col("layer") == N_LAYER)
    if chunk_tokens == 2:
        assert summary["n_tokens"] == 0 and np.isnan([summary[c] for c in ("r_path_logit", "r_ci_low", "r_ci_high")]).all()
        return
    assert summary["n_tokens"] == last["n_tokens"][0] == out["n_tokens"]
    np.testing.assert_allclose([summary["r_path_logit"], summary["r_ci_low"], summary["r_ci_high"]],
                               [last["r"][0], last["r_ci_low"][0], last["r_ci_high"][0]], rtol=1e-12)
    # As the job computed it before polars: np.corrcoef of the used tokens, the same up to the sums' order.
    j = steps.filter(pl.col("layer") == N_LAYER).join(tokens, on=["chunk", "pos"]).collect()
    x, y = j["path_step"].cast(pl.Float64).to_numpy(), j["next_token_logit"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    keep = (j["pos"].to_numpy() > 0) & np.isfinite(x) & np.isfinite(y)
    assert keep.sum() == summary["n_tokens"]
    assert summary["r_path_logit"] == pytest.approx(np.corrcoef(x[keep], y[keep])[0, 1], rel=1e-12)
