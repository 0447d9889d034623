"""Rotation: the angle between a target token's hidden states in consecutive layers, against the token
before it and a shuffled baseline (``rotation_angles``); paired t-tests per layer, Bonferroni (``rotation``).
``--sentences`` adds the angles of a file of sentences (source ``sentences``), run as one padded batch."""
import zlib
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from jobs.analysis import Analysis, Capture, FigureSpec, Option, Table, Write, table_layers
from jobs.errors import UsageError
from jobs.plotting import (add_lines, by_model, collect, depth_legend, depth_lines, int_x, models_of, panels, safe, thin,
                           wide, with_depth)
from jobs.sources import numbered_sentences
from jobs.store import Store
from probe_core.rotation import rotation_angles, rotation_tests, target_occurrences

NAME = "rotation"
KINDS = ("target", "previous", "shuffled")
KIND_COLORS = {"target": "tab:red", "previous": "tab:blue", "shuffled": "tab:gray"}
ANGLES = Table("rotation_angles", pa.schema([
    ("target", pa.string()), ("source", pa.string()), ("chunk", pa.int32()), ("pos", pa.int32()),
    ("layer", pa.int16()), ("kind", pa.string()), ("angle_rad", pa.float32()),
]))
TESTS = Table("rotation", pa.schema([
    ("target", pa.string()), ("source", pa.string()), ("layer", pa.int16()), ("n", pa.int32()),
    ("mean_target_rad", pa.float64()), ("mean_previous_rad", pa.float64()), ("mean_shuffled_rad", pa.float64()),
    ("t", pa.float64()), ("p", pa.float64()), ("significant", pa.bool_()), ("d_z", pa.float64()),
    ("diff_ci_low_rad", pa.float64()), ("diff_ci_high_rad", pa.float64()),
]))
OPTIONS = (
    Option("target", {"help": "rotation target, one BPE token; default ' her'"}),
    Option("sentences", {"help": "rotation: a file of extra sentences, one per line (run as a right-padded batch)"}),
)


@dataclass(frozen=True)
class Part:
    """The target's token id, --sentences as (ids, mask) (n, width), right-padded with EOS, or None, and the
    --sentences lines without the target after another token (they add no occurrence)."""

    target_id: int
    sentences: tuple[np.ndarray, np.ndarray] | None
    idle_lines: tuple[int, ...] = ()


def check(cfg) -> None:
    if cfg.sentences is not None and NAME not in cfg.analyses:
        raise UsageError(f"--sentences feeds the {NAME} analysis, which is not in --analyses: add {NAME} or drop --sentences")


def single_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise UsageError(f"--target {text!r} is {len(ids)} BPE tokens ({pieces}), not one: choose a single-token target such as ' her'")
    return ids[0]


def pad_sentences(encoded: list[list[int]], eos: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(e) for e in encoded)
    ids = np.full((len(encoded), width), eos, dtype=np.int64)
    mask = np.zeros((len(encoded), width), dtype=np.int64)
    for i, e in enumerate(encoded):
        ids[i, : len(e)], mask[i, : len(e)] = e, 1
    return ids, mask


def check_sentences(cfg, tokenizer, models, target_id: int) -> tuple[list[list[int]], tuple[int, ...]]:
    """--sentences tokenized, and the lines without the target after another token; refused: a line longer than
    some model's n_positions (its forward pass would fail after the whole capture stage), or a file where no line
    has the target after another token (the rotation compares an occurrence with the token before it, so such a
    file measures nothing: a mistake). A single line without it is kept (a file may serve several targets) and
    the plan names it."""
    numbered = numbered_sentences(cfg.sentences)
    encoded = tokenizer([s for _, s in numbered], add_special_tokens=False)["input_ids"]
    shortest = min(models, key=lambda m: m.n_positions)
    for (line, _), ids in zip(numbered, encoded):
        if len(ids) > shortest.n_positions:
            raise UsageError(f"--sentences {cfg.sentences}: line {line} is {len(ids)} tokens, more than {shortest.name}'s "
                             f"n_positions {shortest.n_positions}: shorten or split it")
    idle = tuple(line for (line, _), ids in zip(numbered, encoded) if target_id not in ids[1:])
    if len(idle) == len(numbered):
        where = f"line {idle[0]}" if len(idle) == 1 else f"lines {idle[0]}-{idle[-1]}"
        raise UsageError(f"--sentences {cfg.sentences}: no line has --target {cfg.target!r} after another token ({where}), "
                         f"so the rotation has nothing to measure: add the target to the sentences or drop --sentences")
    return encoded, idle


def inputs(cfg, tokenizer, models) -> Part:
    target_id = single_token(tokenizer, cfg.target)
    if not cfg.sentences:
        return Part(target_id, None)
    encoded, idle = check_sentences(cfg, tokenizer, models, target_id)
    return Part(target_id, pad_sentences(encoded, tokenizer.eos_token_id), idle)


def count_in_shard(store_uri: str, shard_file: str, target_id: int) -> int:
    """Occurrences of the target after another token of its chunk, in one corpus shard."""
    store = Store(store_uri)
    table = pq.read_table(shard_file, columns=["pos", "token_id"], filesystem=store.fs)
    return int(((table.column("token_id").to_numpy() == target_id) & (table.column("pos").to_numpy() > 0)).sum())


def plan(ctx) -> Part:
    """The target must occur after another token, in the corpus or in --sentences (counted shard by shard on the cluster)."""
    part = ctx.part
    if part.sentences is not None and (part.sentences[0][:, 1:] == part.target_id).any():
        return part
    files = ctx.store.list_files("corpus")
    if not sum(ray.get([ray.remote(count_in_shard).remote(ctx.store.uri, f, part.target_id) for f in files])):
        raise UsageError(f"--target {ctx.cfg.target!r} never occurs after another token in the corpus: choose another target")
    return part


# ---------------------------------------------------------------- capture
def sequence_seeds(seed: int, chunks: np.ndarray, salt: str = "corpus") -> np.ndarray:
    """One seed per sequence from (run seed, chunk, salt): random draws do not depend on batching."""
    return np.array([zlib.crc32(f"{seed}:{salt}:{int(c)}".encode()) for c in chunks], dtype=np.int64)


def angles_table(chunk_ids, input_ids, hidden, attention_mask, source: str, n_layer: int, cfg, target_id: int) -> pa.Table:
    """Rows of ``rotation_angles`` for every occurrence of the target in these sequences (B, T); hidden
    (L+1, B, T, d). ``source``: "corpus" (chunk = chunk index) or "sentences" (chunk = sentence index)."""
    b_idx, t_idx = target_occurrences(input_ids, target_id, attention_mask)
    angles = rotation_angles(hidden, b_idx, t_idx, sequence_seeds(cfg.seed, np.asarray(chunk_ids), source), attention_mask)
    n = len(b_idx)
    columns = {"chunk": [], "pos": [], "layer": [], "kind": [], "angle_rad": []}
    for kind in KINDS:
        columns["chunk"].append(np.repeat(np.asarray(chunk_ids, dtype=np.int32)[b_idx], n_layer))
        columns["pos"].append(np.repeat(t_idx.astype(np.int32), n_layer))
        columns["layer"].append(np.tile(table_layers(n_layer), n))
        columns["kind"].append(np.full(n * n_layer, kind, dtype=object))
        columns["angle_rad"].append(np.asarray(angles[kind], dtype=np.float32).reshape(-1))
    data = {k: np.concatenate(v) for k, v in columns.items()}
    rows = len(data["chunk"])
    return pa.table({"target": np.full(rows, cfg.target, dtype=object), "source": np.full(rows, source, dtype=object), **data})


def reduce(ctx) -> list:
    data = angles_table(ctx.chunk, ctx.input_ids, ctx.out["hidden"], None, "corpus", ctx.n_layer, ctx.cfg, ctx.part.target_id)
    return [Write(ANGLES, data)]


def sentence_angles(worker, input_ids: np.ndarray, attention_mask: np.ndarray, target_id: int) -> int:
    """In the model actor (``apply``): rotation angles of --sentences; returns rows written."""
    out = worker.forward(input_ids, attention_mask=torch.tensor(attention_mask, dtype=torch.long, device=worker.device))
    data = angles_table(np.arange(len(input_ids)), input_ids, out["hidden"], attention_mask, "sentences",
                        worker.spec.n_layer, worker.cfg, target_id)
    if data.num_rows:
        worker.store.write_table(ANGLES, "sentences", data, model=worker.spec.name)
    return data.num_rows


# ---------------------------------------------------------------- statistics
def model_rotation(store_uri: str, model: str, alpha: float, *after) -> int:
    """Paired t-tests per layer (target vs previous) for each source of occurrences.

    ``after``: refs of tasks that must finish first, passed as top-level arguments so Ray waits for them."""
    store = Store(store_uri)
    angles = store.scan_model(ANGLES, model).collect()
    frames = []
    for (target, source), part in angles.group_by("target", "source", maintain_order=True):
        wide_by_kind = {k: _occurrence_matrix(part, k) for k in KINDS}
        table = rotation_tests(wide_by_kind["target"], wide_by_kind["previous"], wide_by_kind["shuffled"], alpha=alpha)
        frames.append(table.with_columns(pl.lit(target).alias("target"), pl.lit(source).alias("source")))
    if not frames:
        return 0
    result = pl.concat(frames)
    store.write_table(TESTS, "all", result.to_arrow(), model=model)
    return result.height


def _occurrence_matrix(frame: pl.DataFrame, kind: str) -> np.ndarray:
    """(n_occurrences, n_layer) angles of one kind, occurrences ordered by (chunk, pos)."""
    w = frame.filter(pl.col("kind") == kind).pivot(on="layer", index=["chunk", "pos"], values="angle_rad").sort("chunk", "pos")
    layers = sorted((c for c in w.columns if c not in ("chunk", "pos")), key=int)
    return w.select(layers).to_numpy().astype(np.float64)


def stats(ctx, m) -> list:
    part = ctx.plan.parts[NAME]
    # Sentences first: the t-tests read every occurrence, corpus and sentences.
    first = [] if part.sentences is None else [ctx.workers[m.name].apply.remote(sentence_angles, *part.sentences, part.target_id)]
    return [ray.remote(model_rotation).remote(ctx.store.uri, m.name, ctx.plan.cfg.alpha, *first)]


# ---------------------------------------------------------------- report
def fig_rotation_angles(rotation_angles: pl.LazyFrame, max_lines: int = 150) -> Figure:
    """Thin line per occurrence and thick mean per kind (target/previous/shuffled) across layers.

    Panels: columns = models, rows = (target, source). Means use every occurrence; thin lines a sample.
    """
    ra = rotation_angles.select("model", "target", "source", "chunk", "pos", "layer", "kind", "angle_rad")
    group, occ = ["model", "target", "source"], ["chunk", "pos"]
    means = collect(ra.group_by(*group, "kind", "layer").agg(pl.col("angle_rad").mean()), "rotation angles")
    few = thin(ra, group, occ, max_lines, count=pl.struct(occ).n_unique()).collect()
    models = models_of(means)
    rows = means.select("target", "source").unique().sort("target", "source").rows()
    fig, axes = panels(len(rows) * len(models), ncols=len(models))
    for i, (target, source) in enumerate(rows):
        for ax, m in zip(axes[i * len(models):], models):
            sel = (pl.col("model") == m) & (pl.col("target") == target) & (pl.col("source") == source)
            for kind, color in KIND_COLORS.items():
                d = few.filter(sel & (pl.col("kind") == kind))
                if d.height:
                    _, layers, Y = wide(d, occ, "angle_rad")
                    add_lines(ax, layers, Y, colors=color, linewidths=0.4, alpha=0.25, rasterized=True)
                mu = means.filter(sel & (pl.col("kind") == kind)).sort("layer")
                ax.plot(mu["layer"], mu["angle_rad"], color=color, lw=2.5, label=f"{kind} (mean)")
            ax.plot([], [], color="grey", lw=0.5, label="single occurrences")
            ax.set(title=safe(f"{m}: target {target!r} ({source})"), ylabel="rotation angle (rad)")
            int_x(ax)
            ax.legend(fontsize=8)
    fig.suptitle(FIGURES[0].title)
    return fig


def fig_rotation_t(rotation: pl.LazyFrame) -> Figure:
    """Paired t statistic per layer, one line per model, significant layers starred; panel per (target, source)."""
    df = collect(rotation.select("model", "target", "source", "layer", "t", "significant").sort("layer"), "rotation t")
    models, rows = models_of(df), df.select("target", "source").unique().sort("target", "source").rows()
    fig, axes = panels(len(rows))
    for ax, (target, source) in zip(axes, rows):
        handles = []
        for m in models:
            d = df.filter((pl.col("model") == m) & (pl.col("target") == target) & (pl.col("source") == source))
            (line,) = ax.plot(d["layer"], d["t"], marker=".", label=m)
            s = d.filter(pl.col("significant"))
            ax.scatter(s["layer"], s["t"], marker="*", s=120, color=line.get_color(), edgecolors="black", zorder=3)
            handles.append(line)
        handles.append(Line2D([], [], marker="*", ls="", color="grey", mec="black", ms=11, label="significant layer"))
        ax.axhline(0, color="black", lw=0.8)
        ax.set(title=safe(f"target {target!r} ({source})"), ylabel="paired t statistic")
        int_x(ax)
        ax.legend(handles=handles, fontsize=8)
    fig.suptitle(FIGURES[1].title)
    return fig


def fig_across_t(rotation: pl.LazyFrame, n_layers: dict[str, int] | None = None) -> Figure:
    """Across sizes: paired t per layer, one line per model, panel per (target, source); filled = significant."""
    df = with_depth(collect(rotation.select("model", "target", "source", "layer", "t", "significant"), "rotation t"), n_layers)
    keys = df.select("target", "source").unique().sort("target", "source").rows()
    fig, axes = panels(len(keys))
    for ax, (target, source) in zip(axes, keys):
        depth_lines(ax, df.filter((pl.col("target") == target) & (pl.col("source") == source)), "t", marks="significant")
        ax.axhline(0, color="black", lw=0.8)
        ax.set(title=safe(f"target {target!r} ({source})"), ylabel="paired t statistic")
        depth_legend(ax, "significant layer (filled)")
    fig.suptitle(ACROSS_FIGURES[0].title)
    return fig


def summaries(t: dict, manifest: dict) -> list:
    if "rotation" not in t:
        return []
    return [by_model("Rotation tests per layer", t["rotation"].collect(), "target", "source", "layer")]


def describe(plan, part) -> list:
    extra = f", plus {len(part.sentences[0])} sentences" if part.sentences is not None else ""
    if part.idle_lines:
        extra += f" (line{'s' if len(part.idle_lines) > 1 else ''} {', '.join(map(str, part.idle_lines))} of --sentences "
        extra += "without the target after another token: no occurrence there)"
    return [f"  {NAME}: target {plan.cfg.target!r} (token id {part.target_id}){extra}"]


FIGURES = (
    FigureSpec("rotation_angles", "Rotation angles across layers: target vs previous vs shuffled tokens", ("rotation_angles",),
               lambda t, n_layers: fig_rotation_angles(t["rotation_angles"])),
    FigureSpec("rotation_t", "Rotation: paired t statistic per layer", ("rotation",), lambda t, n_layers: fig_rotation_t(t["rotation"])),
)
ACROSS_FIGURES = (
    FigureSpec("across_rotation_t", "Across sizes: rotation t statistic per layer", ("rotation",),
               lambda t, n_layers: fig_across_t(t["rotation"], n_layers)),
)

ANALYSIS = Analysis(
    name=NAME, heading="Rotation", blurb="Residual-stream rotation angles of target tokens vs previous and shuffled tokens.",
    tables=(ANGLES, TESTS), options=OPTIONS, check=check, inputs=inputs, plan=plan, describe=describe,
    capture=Capture(reduce=reduce), stats=stats, disk_bytes=lambda plan, m: 0,  # a few rows per occurrence of the target
    summaries=summaries, figures=FIGURES, across_figures=ACROSS_FIGURES,
)
