"""Corpus-wide neuron pages: for every MLP neuron, its activation statistics (``neuron_stats``), the contexts
that drive it most and a random sample of those that activate it (``neuron_examples``), and the tokens its
output promotes and suppresses through the direct path (``neuron_vocab``).

Each model actor keeps a ``probe_core.neuron_pages.PagesState`` on its device and merges every batch into it
inside the forward pass (the ``mlp_visit`` hook sees one layer's (B, T, d_mlp) pre-activations at a time).
A batch's deltas are committed only once its forward pass has finished, so a batch that runs out of memory
and is split is never counted twice; chunks a state already holds are not merged again. Every
``--pages-checkpoint-s`` seconds an actor saves its state to ``OUT/_state/neuron_pages/model=<name>/<actor>.pt``,
after the markers of every batch it holds are written, so a checkpoint holds only finished batches: a resumed
run skips them in the capture and reads them back in the statistics. The statistics task gathers every live
replica's state and every checkpoint, keeps states of disjoint chunks, has replica 0 recompute the chunks no
kept state covers (batches after the last checkpoint of a killed run, a dead actor's: the merge is exact, so
the tables are those of an uninterrupted run), writes the tables and removes the checkpoints.
"""
import io
import os
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from jobs.analysis import Analysis, BatchContext, Capture, Command, Option, Table
from jobs.analyses.neuron_pages.figures import FIGURES, summaries
from jobs.analyses.neuron_pages.html import write_pages
from jobs.analyses.neuron_pages.page import neuron_page, page_text, select_neurons  # noqa: F401  (the API's entry points)
from jobs.errors import UsageError
from jobs.store import Store, size_text
from probe_core import neuron_pages as pages

NAME = "neuron_pages"
STATS = Table("neuron_stats", pa.schema([
    ("layer", pa.int16()), ("neuron", pa.int32()), ("n", pa.int64()), ("mean", pa.float64()), ("sd", pa.float64()),
    ("min", pa.float32()), ("max", pa.float32()), ("frac_active", pa.float64()), ("hist", pa.list_(pa.int64())),
]))
EXAMPLES = Table("neuron_examples", pa.schema([
    ("layer", pa.int16()), ("neuron", pa.int32()), ("kind", pa.string()), ("rank", pa.int16()), ("chunk", pa.int32()),
    ("pos", pa.int32()), ("activation", pa.float32()), ("context", pa.list_(pa.float32())),
]))
VOCAB = Table("neuron_vocab", pa.schema([
    ("layer", pa.int16()), ("neuron", pa.int32()), ("kind", pa.string()), ("rank", pa.int16()), ("token_id", pa.int32()),
    ("token", pa.string()), ("weight", pa.float32()),
]))
OPTIONS = (
    Option("examples_k", {"type": int, "help": "neuron_pages: top, bottom and random-active examples kept per neuron, and "
                                               "promoted/suppressed tokens; default 20"}),
    Option("context_tokens", {"type": int, "help": "neuron_pages: tokens of context on each side of an example; default 10"}),
    Option("pages_checkpoint_s", {"type": float, "help": "neuron_pages: seconds of capture between checkpoints of each actor's "
                                                         "state (a resumed run starts from them; 0: before every batch); default 600"}),
)
CHECKPOINTS = f"_state/{NAME}"  # OUT/_state/neuron_pages/model=<name>/<actor>.pt
STATE_SHARE = 0.5  # at most this share of an actor's memory for the state (the model and its batch need the rest)


def check(cfg) -> None:
    if cfg.examples_k < 1:
        raise UsageError(f"--examples-k must be an integer >= 1, got {cfg.examples_k}")
    if cfg.context_tokens < 0:
        raise UsageError(f"--context-tokens must be an integer >= 0, got {cfg.context_tokens}")
    if not cfg.pages_checkpoint_s >= 0:
        raise UsageError(f"--pages-checkpoint-s must be a number of seconds >= 0, got {cfg.pages_checkpoint_s}")


@dataclass(frozen=True)
class Part:
    """k examples per kind, W context tokens per side, each model's state size in bytes, seconds between checkpoints."""

    k: int
    window: int
    state_bytes: dict
    checkpoint_s: float = 600.0


def host_memory() -> int | None:
    """Bytes of memory available on this host (None where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info.get("MemFree"))
    except (OSError, ValueError, IndexError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None


def plan(ctx) -> Part:
    """Sizes every model's state and refuses a run whose states cannot fit: each model has at least one
    actor, so each gets at most 1/models of the host's available memory, and the state may take half of it."""
    cfg = ctx.cfg
    sizes = {m.name: pages.state_bytes(m.n_layer, m.d_mlp, cfg.examples_k, cfg.context_tokens) for m in ctx.inputs.models}
    available = host_memory()
    if available and cfg.address is None:  # a cluster's actors are on other hosts: their memory is not known here
        share = available / len(sizes) * STATE_SHARE
        big = {name: b for name, b in sizes.items() if b > share}
        if big:
            name, b = max(big.items(), key=lambda kv: kv[1])
            raise UsageError(f"{NAME}: the state of {name} needs {size_text(b)}, more than its actor's share "
                             f"({size_text(share)} of {size_text(available)} available): lower --examples-k or --context-tokens")
    return Part(cfg.examples_k, cfg.context_tokens, sizes, cfg.pages_checkpoint_s)


def describe(plan, part) -> list:
    sizes = ", ".join(f"{name} {size_text(b)}" for name, b in part.state_bytes.items())
    return [f"  {NAME}: k={part.k} examples per kind, {part.window} context tokens per side; "
            f"state per actor: {sizes}, saved every {part.checkpoint_s:g} s"]


# ---------------------------------------------------------------- capture: the actor's running state
class Holder:
    """The actor's state, the deltas of the batch being computed ({layer index: LayerDelta}, committed by
    ``reduce``), and its checkpoint: the actor (for its store and writer), seconds between saves, its file."""

    def __init__(self, state: pages.PagesState, worker=None, every: float | None = None):
        self.state, self.pending, self.chunks = state, None, None
        self.worker, self.every, self.saved_at, self.saved = worker, every, time.monotonic(), 0
        self.file = f"{CHECKPOINTS}/model={worker.spec.name}/{uuid.uuid4().hex}.pt" if worker else None  # a restarted actor writes its own

    def checkpoint(self) -> None:
        """Save the state when due and grown. Waiting for the actor's writer first means every batch in the
        state has its marker, so a resumed run never captures a batch a checkpoint holds."""
        if self.file is None or self.state.chunks.size == self.saved or time.monotonic() - self.saved_at < self.every:
            return
        self.worker.flush()
        buffer = io.BytesIO()
        torch.save(pages.to_tensors(self.state), buffer)
        self.worker.store.write_bytes(self.file, buffer.getbuffer())  # a view: no third copy of a multi-GB state
        self.saved_at, self.saved = time.monotonic(), self.state.chunks.size


def pages_config(worker, part: Part) -> pages.PagesConfig:
    return pages.PagesConfig(part.k, part.window, worker.cfg.chunk_tokens, worker.cfg.seed, pages.model_salt(worker.spec.name))


def new_state(worker, part: Part, save: bool = True) -> Holder:
    state = pages.empty_state(worker.spec.n_layer, worker.spec.d_mlp, pages_config(worker, part), worker.device)
    return Holder(state, worker, part.checkpoint_s) if save else Holder(state)


def forward(ctx) -> dict:
    """The hook computing each layer's delta of this batch against the committed state (chunks it already holds are skipped)."""
    holder = ctx.state
    holder.checkpoint()
    chunks = np.asarray(ctx.chunk, np.int64)
    keep = np.nonzero(~np.isin(chunks, holder.state.chunks))[0]
    holder.pending = None  # a batch that failed part way (and is split) leaves nothing behind
    if not len(keep):
        return {}
    order = keep[np.argsort(chunks[keep], kind="stable")]  # the state wants chunks ascending
    holder.pending, holder.chunks = {}, chunks[order]
    chunk_t = torch.as_tensor(holder.chunks)

    whole = np.array_equal(order, np.arange(len(chunks)))  # the usual batch: every chunk new, ascending

    def visit(layer: int, pre: torch.Tensor) -> None:
        x = pre if whole else pre.index_select(0, torch.as_tensor(order, device=pre.device))
        holder.pending[layer] = pages.layer_delta(holder.state.layers[layer], x, chunk_t, holder.state.cfg, layer + 1)

    return {"mlp_visit": visit}


def reduce(ctx) -> list:
    """Commit the batch's deltas; nothing is written per batch."""
    holder = ctx.state
    if holder.pending is not None:
        holder.state = pages.commit(holder.state, holder.pending, holder.chunks)
        holder.pending = holder.chunks = None
    return []


# ---------------------------------------------------------------- in the actor (``apply``)
def export_state(worker) -> pages.PagesState:
    return worker.state[NAME].state.to("cpu")


def recompute_state(worker, chunk_ids: np.ndarray, batch_size: int, part: Part) -> pages.PagesState:
    """A fresh state of these chunks (sorted), by forward passes of ``batch_size`` chunks through this analysis's
    own capture (``forward``, then ``reduce``); the actor's own state is untouched."""
    holder = new_state(worker, part, save=False)
    chunk_ids = np.sort(np.asarray(chunk_ids, np.int64))
    for lo in range(0, len(chunk_ids), max(1, batch_size)):
        batch = chunk_ids[lo:lo + max(1, batch_size)]
        ctx = BatchContext(batch, None, worker.spec.n_layer, worker.spec.d_mlp, worker.cfg, part, holder)
        worker.forward(worker.chunks.ids(batch), **forward(ctx))
        reduce(ctx)
    return holder.state.to("cpu")


def vocab_rows(worker, k: int) -> pa.Table:
    """``neuron_vocab`` rows from the actor's weights (token text added by the writer)."""
    model = worker.model
    parts = []
    with torch.inference_mode():
        for index, block in enumerate(model.transformer.h):
            pw, pi, sw, si = (t.cpu().numpy() for t in pages.vocab_directions(
                block.mlp.c_proj.weight, model.transformer.ln_f.weight, model.lm_head.weight, k))
            for kind, w, ids in (("promoted", pw, pi), ("suppressed", sw, si)):
                n, kk = w.shape
                parts.append(pa.table({
                    "layer": np.full(n * kk, index + 1, np.int16), "neuron": np.repeat(np.arange(n, dtype=np.int32), kk),
                    "kind": pa.array([kind] * (n * kk), pa.string()), "rank": np.tile(np.arange(kk, dtype=np.int16), n),
                    "token_id": ids.reshape(-1).astype(np.int32), "weight": w.reshape(-1).astype(np.float32),
                }))
    return pa.concat_tables(parts)


# ---------------------------------------------------------------- statistics
def checkpoints(store: Store, model: str):
    """The model's saved states (``Holder.checkpoint``), one at a time."""
    folder = f"{CHECKPOINTS}/model={model}"
    for name in sorted(store.list_parts(folder, ".pt")):
        yield pages.from_tensors(torch.load(io.BytesIO(store.read_bytes(f"{folder}/{name}.pt")), weights_only=True))


def finish(store_uri: str, model: str, n_chunks: int, batch_size: int, part: Part, actor, *states) -> dict:
    """Merge the replicas' states and the checkpoints, each kept only if its chunks are disjoint from those kept
    before (a checkpoint an actor of this run wrote is part of its live state), recompute the chunks none holds,
    write ``neuron_stats`` and ``neuron_examples``, and remove the checkpoints. Returns where the chunks came from."""
    store = Store(store_uri)
    merged, sources = None, {"actors": 0, "checkpoints": 0, "recomputed": 0}
    with torch.inference_mode():
        for source, group in (("actors", states), ("checkpoints", checkpoints(store, model))):
            for s in group:
                if merged is None or not np.intersect1d(s.chunks, merged.chunks).size:
                    merged = s if merged is None else pages.merge(merged, s)
                    sources[source] += int(s.chunks.size)
        missing = np.setdiff1d(np.arange(n_chunks, dtype=np.int64), merged.chunks if merged is not None else [])
        if missing.size:
            again = ray.get(actor.apply.remote(recompute_state, missing, batch_size, part))
            merged = again if merged is None else pages.merge(merged, again)
            sources["recomputed"] = int(missing.size)
        tables = [pages.layer_tables(s, merged.cfg, index + 1) for index, s in enumerate(merged.layers)]
    store.write_table(STATS, "all", pa.concat_tables([t[0] for t in tables]), model=model)
    store.write_table(EXAMPLES, "all", pa.concat_tables([t[1] for t in tables]), model=model)
    store.remove_folder(f"{CHECKPOINTS}/model={model}")
    print(f"[stats] {NAME} {model}: chunks from the actors {sources['actors']}, from checkpoints {sources['checkpoints']}, "
          f"recomputed {sources['recomputed']}", flush=True)
    return sources


def write_vocab(store_uri: str, model: str, tokenizer_source: str, rows: pa.Table) -> int:
    from jobs.models import load_tokenizer

    ids = rows["token_id"].to_numpy()
    unique, inverse = np.unique(ids, return_inverse=True)
    text = np.array(load_tokenizer(tokenizer_source).batch_decode([[int(i)] for i in unique]), dtype=object)[inverse]
    rows = rows.append_column("token", pa.array(text.tolist(), pa.string()))
    Store(store_uri).write_table(VOCAB, "all", rows, model=model)
    return rows.num_rows


def stats(ctx, m) -> list:
    """One merge task per model (each live replica's state through ``apply``) and one vocabulary task."""
    plan, workers, part = ctx.plan, ctx.workers, ctx.plan.parts[NAME]
    states = [workers.actors[m.name][r].apply.remote(export_state) for r in workers.live(m.name)]
    merged = ray.remote(finish).remote(ctx.store.uri, m.name, plan.n_chunks, plan.batch_size, part, workers[m.name], *states)
    rows = workers[m.name].apply.remote(vocab_rows, part.k)
    tokenizer = plan.cfg.tokenizer or plan.models[0].source
    return [merged, ray.remote(write_vocab).remote(ctx.store.uri, m.name, tokenizer, rows)]


def disk_bytes(plan, m) -> int:
    part = plan.parts[NAME]
    per_neuron = 60 + 8 * (len(pages.HIST_EDGES) + 1) + 3 * part.k * (30 + 4 * (2 * part.window + 1)) + 2 * part.k * 30
    return m.n_layer * m.d_mlp * per_neuron + part.state_bytes.get(m.name, 0)  # the tables and one checkpoint


# ---------------------------------------------------------------- what users see: pages and ``probe neuron``
def report_pages(t: dict, run_dir: str) -> list:
    """The neuron pages beside report.html (links back to this section)."""
    return write_pages(t, run_dir, f"#{NAME}")


def cmd_neuron(t: dict, args) -> int:
    """``probe neuron OUT --model M --layer L --neuron N``: the neuron's page as text."""
    print(page_text(neuron_page(t, args.model, args.layer, args.neuron), args.model, args.layer, args.neuron))
    return 0


NEURON = Command("neuron", "print one neuron's page: statistics, contexts (activating token in ⟦ ⟧), promoted tokens", (
    (("--model",), {"required": True, "help": "the model's name in the run (its model= partition)"}),
    (("--layer",), {"required": True, "type": int, "help": "block 1..n_layer"}),
    (("--neuron",), {"required": True, "type": int, "help": "index in d_mlp, from 0"}),
), cmd_neuron)


ANALYSIS = Analysis(
    name=NAME, heading="Neurons",
    blurb="Every MLP neuron over the whole corpus: activation statistics, the contexts that drive it most and a "
          "random sample of those that activate it, and the tokens its output promotes and suppresses.",
    tables=(STATS, EXAMPLES, VOCAB), options=OPTIONS, check=check, plan=plan, describe=describe,
    capture=Capture(reduce=reduce, forward=forward, state=new_state), stats=stats, disk_bytes=disk_bytes,
    summaries=summaries, figures=FIGURES, pages=report_pages, commands=(NEURON,), default=False,  # opt-in: its state update adds ~17% to capture time on CPU (bench/RESULTS.md)
)
