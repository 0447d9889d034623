"""Resolving model ids and folders to GPT-2 configs, and loading weights safely."""
import os
import re
from dataclasses import dataclass

from jobs.config import UsageError

WEIGHT_FILES_SAFE = ("model.safetensors", "model.safetensors.index.json")
WEIGHT_FILES_PICKLE = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ModelSpec:
    """What the driver knows about a model before any weights load."""

    source: str  # hub id or absolute folder path
    name: str  # partition value in every table
    n_layer: int
    n_embd: int
    d_mlp: int
    n_positions: int
    vocab_size: int
    config: dict

    @property
    def n_params(self) -> int:
        return 12 * self.n_layer * self.n_embd**2 + (self.vocab_size + self.n_positions) * self.n_embd


def partition_name(source: str) -> str:
    base = os.path.basename(os.path.normpath(source)) if os.path.isdir(source) else source.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)


def resolve_model(source: str, allow_pickle: bool = False) -> ModelSpec:
    """Read a model's config (hub id or local folder) and check it is a GPT-2; loads no weights."""
    from transformers import AutoConfig

    if os.path.isdir(source):
        source = os.path.abspath(source)
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise UsageError(f"model folder {source} has no config.json: save it with save_pretrained()")
        files = set(os.listdir(source))
        allowed = WEIGHT_FILES_SAFE + (WEIGHT_FILES_PICKLE if allow_pickle else ())
        if not files.intersection(allowed):
            hint = " (it has pickle weights: convert to safetensors or pass --allow-pickle)" if files.intersection(WEIGHT_FILES_PICKLE) else ""
            raise UsageError(f"model folder {source} has no model.safetensors{hint}")
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:  # a path, not an "org/name" hub id
        raise UsageError(f"model folder {source} does not exist")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"cannot load model {source!r} ({first[:200]}); offline, pass a local folder saved with save_pretrained()"
        ) from None
    if getattr(config, "model_type", None) != "gpt2":
        raise UsageError(f"model {source!r} is a {getattr(config, 'model_type', 'unknown')!r} model, not GPT-2")
    return ModelSpec(
        source=source,
        name=partition_name(source),
        n_layer=config.n_layer,
        n_embd=config.n_embd,
        d_mlp=config.n_inner or 4 * config.n_embd,
        n_positions=config.n_positions,
        vocab_size=config.vocab_size,
        config=config.to_diff_dict(),
    )


def load_model(spec: ModelSpec, device: str, dtype: str, allow_pickle: bool = False):
    """Load a GPT2LMHeadModel in eval mode; safetensors only unless allow_pickle, never remote code."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(
        spec.source, use_safetensors=None if allow_pickle else True, trust_remote_code=False, dtype=getattr(torch, dtype)
    )
    return model.to(device).eval()


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"cannot load a tokenizer from {source!r} ({first[:200]}); pass --tokenizer FOLDER") from None
    if tokenizer.eos_token_id is None:
        raise UsageError(f"tokenizer {source!r} has no end-of-text token: not a GPT-2 tokenizer")
    return tokenizer
