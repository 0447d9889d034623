"""Resolving model ids and folders to GPT-2 configs, and loading weights safely.

transformers and torch are imported by the functions that load a model or tokenizer: they take seconds to
import, and every Ray task that unpickles a ModelSpec imports this module."""
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass

from safetensors import SafetensorError, safe_open

from jobs.errors import UsageError, one_line

WEIGHT_FILES_SAFE = ("model.safetensors", "model.safetensors.index.json")
WEIGHT_FILES_PICKLE = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HASH_BLOCK = 2**20


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
        """Exact parameter count, LM head tied to wte (counted once), as ``sum(p.numel() for p in
        model.parameters())``. Per block (d = n_embd, m = d_mlp): ln_1, ln_2 4d; attn c_attn 3d^2 + 3d and
        c_proj d^2 + d; mlp c_fc dm + m and c_proj md + d. Plus wte, wpe and ln_f."""
        d, m = self.n_embd, self.d_mlp
        block = 4 * d * d + 2 * d * m + 9 * d + m
        return self.n_layer * block + (self.vocab_size + self.n_positions) * d + 2 * d


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
        raise UsageError(
            f"cannot load model {source!r} ({one_line(e)[:200]}); offline, pass a local folder saved with save_pretrained()"
        ) from None
    if getattr(config, "model_type", None) != "gpt2":
        raise UsageError(f"model {source!r} is a {getattr(config, 'model_type', 'unknown')!r} model, not GPT-2")
    if os.path.isdir(source) and files.intersection(WEIGHT_FILES_SAFE):
        check_safetensors(source, expected_shapes(config))
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


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Shape of every GPT-2 weight tensor from config.json (Conv1D weights are (in, out)); keys without
    the ``transformer.`` prefix. lm_head is tied to wte and not saved."""
    d, d_mlp = config.n_embd, config.n_inner or 4 * config.n_embd
    shapes = {"wte.weight": (config.vocab_size, d), "wpe.weight": (config.n_positions, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(config.n_layer):
        block = {"ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
                 "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
                 "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
                 "mlp.c_fc.weight": (d, d_mlp), "mlp.c_fc.bias": (d_mlp,),
                 "mlp.c_proj.weight": (d_mlp, d), "mlp.c_proj.bias": (d,)}
        shapes.update({f"h.{i}.{k}": v for k, v in block.items()})
    return shapes


def safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header; the library checks the header and that the tensors'
    data offsets cover the file exactly (a truncated or padded file fails). Reads no tensor data."""
    if os.path.getsize(path) == 0:
        raise UsageError(f"{path} is empty: save the model again with save_pretrained()")
    try:
        with safe_open(path, "np") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{path} is not a complete safetensors file ({one_line(e)[:160]}): copy or save it again") from None


def check_safetensors(folder: str, expected: dict[str, tuple[int, ...]]) -> None:
    """Every GPT-2 tensor present with the shape config.json implies, before any actor loads the weights."""
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        paths = [single]
    else:
        index = os.path.join(folder, "model.safetensors.index.json")
        try:
            with open(index, encoding="utf-8") as f:
                paths = sorted({os.path.join(folder, shard) for shard in json.load(f)["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"{index} is not a valid safetensors index ({type(e).__name__}: {str(e)[:120]})") from None
        for p in paths:
            if not os.path.isfile(p):
                raise UsageError(f"{index} lists {os.path.basename(p)}, which is missing from {folder}")
    found = {}
    for p in paths:
        for key, shape in safetensors_shapes(p).items():
            found[key.removeprefix("transformer.")] = (shape, p)
    for key, shape in expected.items():
        if key not in found:
            raise UsageError(f"model folder {folder}: the weights have no tensor {key!r}: not a complete GPT-2 checkpoint")
        if found[key][0] != shape:
            raise UsageError(f"model folder {folder}: tensor {key!r} in {os.path.basename(found[key][1])} has shape "
                             f"{list(found[key][0])}, but config.json implies {list(shape)}: the weights do not match the config")


def hash_file(path: str) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _hash_cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpt2-probe", "weights.json")


def _weight_files(folder: str) -> list[str]:
    """Every file a model's weights are read from: the single files and indexes present, and the shards an index names."""
    paths = set()
    for name in WEIGHT_FILES_SAFE + WEIGHT_FILES_PICKLE:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            paths.add(path)
            if name.endswith(".index.json"):
                try:
                    with open(path, encoding="utf-8") as f:
                        paths.update(os.path.join(folder, s) for s in json.load(f)["weight_map"].values())
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    pass  # a bad index is check_safetensors' to report; its bytes are hashed all the same
    return sorted(p for p in paths if os.path.isfile(p))


def weights_fingerprint(source: str) -> str | None:
    """What identifies a model's weights: for a local folder, a sha256 over its weight files' contents (each file's
    hash cached under ~/.cache/gpt2-probe, keyed by path, size and mtime, so an unchanged multi-GB model is read
    once); for a hub id, the commit of the cached snapshot; None where neither is known."""
    if not os.path.isdir(source):
        return hub_commit(source)
    cache_path = _hash_cache_path()
    try:
        with open(cache_path, encoding="utf-8") as f:
            cache = json.load(f)
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    total, changed = hashlib.sha256(), False
    for path in _weight_files(os.path.abspath(source)):
        st = os.stat(path)
        key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
        if key not in cache:
            # The file changed or is new: forget its older entries, so the cache does not grow with every re-save.
            cache = {k: v for k, v in cache.items() if not k.startswith(f"{path}|")}
            cache[key], changed = hash_file(path), True
        total.update(f"{os.path.basename(path)}:{cache[key]}\n".encode())
    if changed:
        try:  # a cache that cannot be written only costs a re-read next time
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(cache_path), delete=False, encoding="utf-8") as f:
                json.dump(cache, f)
            os.replace(f.name, cache_path)
        except OSError:
            pass
    return "sha256:" + total.hexdigest()


def hub_commit(repo_id: str) -> str | None:
    """The commit of the hub model's cached snapshot (its config.json's snapshot folder), or None offline without one."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub cache cannot even parse: nothing to compare
        return None
    if not isinstance(path, str):
        return None
    snapshot = os.path.basename(os.path.dirname(path))
    return f"commit:{snapshot}" if re.fullmatch(r"[0-9a-f]{40}", snapshot) else None


def load_model(spec: ModelSpec, device: str, dtype: str, allow_pickle: bool = False):
    """Load a GPT2LMHeadModel in eval mode; safetensors only unless allow_pickle, never remote code."""
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a carriage-return bar per actor garbles job logs; capture prints model loading
    model = GPT2LMHeadModel.from_pretrained(
        spec.source, use_safetensors=None if allow_pickle else True, trust_remote_code=False, dtype=getattr(torch, dtype)
    )
    return model.to(device).eval()


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    if os.path.isdir(source):
        files = set(os.listdir(source))
        if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
            raise UsageError(f"{source} has no tokenizer (no tokenizer.json, nor vocab.json with merges.txt): "
                             f"save the tokenizer there with save_pretrained() or pass --tokenizer FOLDER")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as e:
        raise UsageError(f"cannot load a tokenizer from {source!r} ({one_line(e)[:200]}); pass --tokenizer FOLDER") from None
    if tokenizer.eos_token_id is None:
        raise UsageError(f"tokenizer {source!r} has no end-of-text token: not a GPT-2 tokenizer")
    if not tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        raise UsageError(f"tokenizer {source!r} turns text into no tokens: its vocabulary is missing; pass --tokenizer FOLDER")
    return tokenizer
