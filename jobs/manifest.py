"""OUT/manifest.json: what a run was (config, versions, models, data) and how far it got (stages)."""
import os
import platform
import subprocess

from jobs.config import UsageError
from jobs.store import Store


class Manifest:
    """OUT/manifest.json: resolved config, versions, models, data fingerprint, stage status and timings."""

    def __init__(self, store: Store, plan):
        self.store = store
        previous = store.read_json("manifest.json") if plan.cfg.resume else {}
        self.previous = previous
        self.data = {
            "run_id": plan.cfg.run_id,
            "config": plan.cfg.to_dict(),
            "versions": versions(),
            "git_commit": git_commit(),
            "models": {m.name: {"source": m.source, "n_layer": m.n_layer, "n_embd": m.n_embd, "n_params": m.n_params, "config": m.config} for m in plan.models},
            "data": {"source": plan.corpus.source, "fingerprint": plan.corpus.fingerprint(), "rows": plan.corpus.n_rows,
                     "tokens": int(plan.chunks.size), "chunks": plan.n_chunks, "chunk_tokens": plan.cfg.chunk_tokens},
            "batch_size": plan.batch_size,
            "stages": previous.get("stages", {}),
        }
        if previous and previous.get("data", {}).get("fingerprint") != self.data["data"]["fingerprint"]:
            raise UsageError("--resume: the data or --max-tokens differ from the run being resumed; use the same inputs")

    def stage(self, name: str, status: str, seconds: float | None = None, **extra) -> None:
        entry = {"status": status, **extra}
        if seconds is not None:
            entry["seconds"] = round(seconds, 3)
        self.data["stages"][name] = entry
        self.store.write_json("manifest.json", self.data)


def versions() -> dict:
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
