"""OUT/manifest.json: what a run was (config, versions, models, data) and how far it got (stages)."""
import os
import platform
import subprocess

from jobs.config import FIELDS
from jobs.errors import UsageError, one_line
from jobs.models import weights_fingerprint
from jobs.sources import GLOB_CHARS
from jobs.store import Store

# Settings that change only speed or location, never a result; every other RunConfig field (also any
# field added later) changes results, so a --resume must repeat it. ``models`` is compared separately
# (adding a model on resume is allowed).
STAGES = ("plan", "corpus", "capture", "stats", "report")  # in run order; each in manifest.json's ``stages`` when reached
SPEED_SETTINGS = frozenset({"batch_size", "max_in_flight", "replicas", "device", "address", "placement_timeout", "actor_resources",
                            "models", "out", "run_id", "resume", "allow_pickle", "no_space_check",
                            "pages_checkpoint_s"})


# Settings that may name a local path: compared as absolute paths, so "c.txt" and "/data/c.txt" are one setting.
PATH_SETTINGS = ("data", "sentences", "tokenizer")


def resolved_paths(config: dict) -> dict:
    """{setting: absolute path} of the PATH_SETTINGS that name a local file, folder or glob (no URI, no hub id)."""
    out = {}
    for key in PATH_SETTINGS:
        value = config.get(key)
        if isinstance(value, str) and "://" not in value and (os.path.exists(value) or any(c in value for c in GLOB_CHARS)):
            out[key] = os.path.abspath(os.path.expanduser(value))
    return out


def result_settings(config: dict) -> dict:
    """The RunConfig values (as in manifest.json's ``config``) that change results."""
    return {k: config.get(k) for k in sorted(FIELDS) if k not in SPEED_SETTINGS}


def differing_settings(old: dict, new: dict) -> list[str]:
    """'--name OLD (run) vs NEW (now)' for each result-changing setting that differs; JSON-normalised."""
    a, b = result_settings(old), result_settings(new)
    norm = lambda v: list(v) if isinstance(v, tuple) else v
    return [f"--{k.replace('_', '-')} {norm(a[k])!r} (run) vs {norm(b[k])!r} (now)"
            for k in a if k in old and norm(a[k]) != norm(b[k])]


def own_run_id(cfg) -> str:
    """The run's own id for messages: a resume without --run-id has a fresh timestamp in ``cfg``; the manifest keeps the run's."""
    if cfg.resume:
        try:
            return read_manifest(Store(cfg.out)).get("run_id") or cfg.run_id
        except (OSError, UsageError):
            pass
    return cfg.run_id


def read_manifest(store: Store) -> dict:
    """OUT/manifest.json, or UsageError saying what to do when it is cut short or not JSON."""
    try:
        data = store.read_json("manifest.json")
    except ValueError as e:
        raise UsageError(f"{store.path('manifest.json')} is damaged ({one_line(e)}): "
                         "the run cannot be resumed or read; start it again with a new --out") from None
    if not isinstance(data, dict):
        raise UsageError(f"{store.path('manifest.json')} is damaged (not a JSON object): start the run again with a new --out")
    return data


class Manifest:
    """OUT/manifest.json: resolved config, versions, models, data fingerprint, stage status and timings.

    Built from the checked inputs (``jobs.plan.Inputs``); ``set_corpus`` adds the corpus stage's counts.
    """

    def __init__(self, store: Store, inputs):
        self.store = store
        previous = read_manifest(store) if inputs.cfg.resume else {}
        self.previous = previous
        run_id = previous.get("run_id") or inputs.cfg.run_id  # a resume never renames the run
        self.data = {
            "run_id": run_id,
            "config": {**inputs.cfg.to_dict(), "run_id": run_id},
            "paths": resolved_paths(inputs.cfg.to_dict()),
            "versions": versions(),
            "git_commit": git_commit(),
            "models": {m.name: {"source": m.source, "n_layer": m.n_layer, "n_embd": m.n_embd, "n_params": m.n_params, "config": m.config,
                                "weights": weights_fingerprint(m.source)} for m in inputs.models},
            "data": {**previous.get("data", {}), "source": inputs.source.spec, "source_fingerprint": inputs.source.fingerprint},
            "batch_size": previous.get("batch_size"),
            "stages": previous.get("stages", {}),
        }
        old = previous.get("data", {}).get("source_fingerprint")
        if previous and old != inputs.source.fingerprint:
            raise UsageError("--resume: the data differ from the run being resumed (files, sizes or times changed); use the same inputs")
        if previous:
            self._check_weights(previous.get("models", {}))
            # The run's own settings, paths compared absolute; a setting added after the manifest was written has no key
            # there and is not compared.
            changed = differing_settings({**previous.get("config", {}), **previous.get("paths", {})},
                                         {**self.data["config"], **self.data["paths"]})
            if changed:
                raise UsageError("--resume with settings that change results: " + "; ".join(changed)
                                 + "; repeat the run's settings (only --batch-size, --max-in-flight, --replicas, --device, --address, "
                                 "--placement-timeout may differ, and --models may add models)")

    def _check_weights(self, old_models: dict) -> None:
        """A model's finished chunks were computed with the weights the run recorded: other weights would mix two models."""
        for name, now in self.data["models"].items():
            then = old_models.get(name, {}).get("weights")
            if then and now["weights"] and then != now["weights"]:
                raise UsageError(f"--resume: the weights of model {name} ({now['source']}) differ from the run being resumed "
                                 f"({then[:19]}... then, {now['weights'][:19]}... now), so its finished chunks used other weights: "
                                 f"restore them, or start a new run with another --out")

    def set_corpus(self, corpus) -> None:
        """Record the corpus stage's counts (``jobs.corpus.CorpusIndex``); a resumed run's content must match."""
        old = self.previous.get("data", {}).get("fingerprint")
        if old is not None and old != corpus.fingerprint:
            raise UsageError("--resume: the corpus tokenizes differently from the run being resumed; use the same inputs")
        self.data["data"].update({"fingerprint": corpus.fingerprint, "rows": corpus.n_rows, "tokens": corpus.n_tokens,
                                  "chunks": corpus.n_chunks, "chunk_tokens": corpus.chunk_tokens, "shards": corpus.n_shards,
                                  "shard_chunks": corpus.shard_chunks})

    def stage(self, name: str, status: str, seconds: float | None = None, **extra) -> None:
        entry = {"status": status, **extra}
        if seconds is not None:
            entry["seconds"] = round(seconds, 3)
        self.data["stages"][name] = entry
        self.store.write_json("manifest.json", self.data)


def versions() -> dict:
    # Here, not at the top: torch and transformers take seconds to import, and probe query reads manifests.
    import polars
    import ray
    import pyarrow
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "ray": ray.__version__, "pyarrow": pyarrow.__version__, "polars": polars.__version__}


def git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
