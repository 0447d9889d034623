"""The run configuration: one typed object built once from CLI flags and an optional YAML file."""
import dataclasses
import difflib
import json
import re
import time
import types
import typing
from dataclasses import dataclass, field

import yaml

from jobs import analyses
from jobs.errors import UsageError, one_line

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Ray addresses: auto, local, host:port, ray://host:port, or a dashboard URL (http(s)://host[:port][/...]).
ADDRESS = re.compile(r"^(auto|local|(ray://)?[A-Za-z0-9._\[\]:-]+:\d{1,5}|https?://[A-Za-z0-9._\[\]:-]+(:\d{1,5})?(/\S*)?)$")
# pyarrow filesystems --out may name (pyarrow.fs.FileSystem.from_uri).
OUT_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
MAX_SEED = 2**32 - 1  # sklearn's random_state (KSG jitter) takes at most this


@dataclass(frozen=True)
class RunConfig:
    models: tuple[str, ...] = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
    data: str = "wikitext-2-raw-v1:test"
    data_config: str | None = None  # a hub dataset's config (name), or a local dataset folder's
    data_split: str | None = None  # default: "test" for the WikiText shorthand, else "train"
    text_column: str = "text"  # the .jsonl field, Parquet column or dataset column holding the text
    out: str = ""  # default: results/<run_id>
    run_id: str = ""  # default: a UTC timestamp
    analyses: tuple[str, ...] = field(default_factory=analyses.defaults)  # default: every analysis that is on by default
    max_tokens: int | None = None
    chunk_tokens: int = 1024
    batch_size: int | None = None  # None: chosen from memory
    device: str = "auto"
    dtype: str = "float32"
    address: str | None = None  # None: start a local Ray instance
    seed: int = 0
    final_hidden: str = "hf"
    tokenizer: str | None = None  # default: the first model's tokenizer
    target: str = " her"
    sentences: str | None = None
    max_samples: int = 1000
    mi_tokens: int | None = None  # default: 16 chunks (histogram) or the first chunk (ksg)
    mi_method: str = "histogram"
    mi_bins: int = 15
    alpha: float = 0.05
    activations_dtype: str = "float16"  # storage of the activations table; fits always see the float32 values
    examples_k: int = 20  # neuron pages: examples per kind and neuron, and promoted/suppressed tokens
    context_tokens: int = 10  # neuron pages: context tokens on each side of an example
    pages_checkpoint_s: float = 600.0  # neuron pages: seconds of capture between checkpoints of an actor's state
    resume: bool = False
    no_space_check: bool = False  # run even where --out's filesystem has less free space than the plan's estimate
    allow_pickle: bool = False
    max_in_flight: int = 2
    # Actors per model: "auto" (GPU slots in proportion to model cost; one per model on CPU), "N", or JSON {"gpt2-xl": 3}.
    replicas: str = "auto"
    placement_timeout: float = 180.0  # seconds a cluster (--address) may take to place the model actors
    # Extra Ray resources per model actor, by partition name: {"gpt2-xl": {"big_gpu": 1}} pins actors to nodes.
    actor_resources: dict = field(default_factory=dict)

    def __post_init__(self):
        check_types(self)
        check = _Checker()
        check.choice("analyses", self.analyses, analyses.names(), many=True)
        check.choice("device", self.device, DEVICES)
        check.choice("dtype", self.dtype, DTYPES)
        check.choice("activations_dtype", self.activations_dtype, ("float16", "float32"))
        check.choice("final_hidden", self.final_hidden, ("hf", "pre_ln_f"))
        check.choice("mi_method", self.mi_method, ("histogram", "ksg"))
        check.positive("chunk_tokens", self.chunk_tokens, minimum=2)
        for analysis in analyses.selected(self.analyses):
            least, why = analysis.min_chunk_tokens or (0, "")
            if self.chunk_tokens < least:
                raise UsageError(f"--chunk-tokens {self.chunk_tokens} is too small for the {analysis.name} analysis: it needs at least "
                                 f"{least} ({why}); raise --chunk-tokens")
        check.positive("max_tokens", self.max_tokens)
        check.positive("batch_size", self.batch_size)
        check.positive("max_samples", self.max_samples)
        check.positive("mi_tokens", self.mi_tokens, minimum=2)
        check.positive("mi_bins", self.mi_bins, minimum=2)
        check.positive("max_in_flight", self.max_in_flight)
        if not self.text_column.strip():
            raise UsageError("--text-column is empty: name the field or column holding the text (default text)")
        for name in ("data_config", "data_split"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise UsageError(f"--{name.replace('_', '-')} is empty: drop it or give a value")
        from jobs.replicas import parse_replicas  # here: it imports numpy, which would triple probe --help's start-up
        parse_replicas(self.replicas)
        if self.seed > MAX_SEED:
            raise UsageError(f"--seed must be an integer in [0, {MAX_SEED}], got {self.seed}")
        if self.seed < 0:
            raise UsageError(f"--seed must be an integer >= 0, got {self.seed}")
        if self.max_tokens is not None and self.max_tokens < self.chunk_tokens:
            raise UsageError(f"--max-tokens {self.max_tokens} is below one chunk of --chunk-tokens {self.chunk_tokens}: "
                             f"raise --max-tokens or lower --chunk-tokens")
        if self.address is not None and not ADDRESS.match(self.address):
            raise UsageError(f"--address {self.address!r} is not a Ray address: use auto, host:port, ray://host:port or http://host:8265")
        if "://" in self.out and self.out.split("://", 1)[0].lower() not in OUT_SCHEMES:
            raise UsageError(f"--out {self.out}: unknown URI scheme {self.out.split('://', 1)[0]!r} (use a local path or one of "
                             f"{', '.join(s + '://' for s in OUT_SCHEMES)})")
        for analysis in analyses.REGISTRY.values():
            if analysis.check:
                analysis.check(self)
        if not self.models:
            raise UsageError("--models is empty: give a comma list of hub ids or local model folders")
        if len(set(self.models)) != len(self.models):
            raise UsageError(f"--models lists a model twice: {','.join(self.models)}")
        if not 0 < self.alpha < 1:
            raise UsageError(f"--alpha must be in (0, 1), got {self.alpha}")
        if self.run_id and not RUN_ID.match(self.run_id):
            raise UsageError(f"--run-id {self.run_id!r} must be letters, digits, '.', '_' or '-' (no path separators)")
        if not isinstance(self.actor_resources, dict) or not all(
            isinstance(v, dict) and all(isinstance(n, (int, float)) and not isinstance(n, bool) and n >= 0 for n in v.values()) for v in self.actor_resources.values()
        ):
            raise UsageError('--actor-resources must map model names to {"resource": amount}, e.g. {"gpt2-xl": {"node_b": 1}}')
        if self.resume and not self.run_id and not self.out:
            raise UsageError("--resume needs --run-id (or --out) naming the run to finish")

    def resolved(self) -> "RunConfig":
        """Fill defaults that depend on other fields (run id, output folder)."""
        run_id = self.run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out = self.out or f"results/{run_id}"
        return dataclasses.replace(self, run_id=run_id, out=out)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _expected(hint) -> tuple[object, bool]:
    """(the type a field holds, whether None is allowed) from its annotation."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def _type_ok(hint, value) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # a bool is an int to Python, never to a user
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(_type_ok(item, v) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    raise TypeError(f"no type check for {hint!r}")  # a new kind of field: teach _type_ok about it


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


def check_types(cfg) -> None:
    """Refuse every field whose value does not have its annotated type, driven by the dataclass fields,
    so a new field is checked too. float fields take ints (stored as float)."""
    for f in dataclasses.fields(cfg):
        hint, optional = _expected(_HINTS[f.name])
        value = getattr(cfg, f.name)
        if value is None and optional:
            continue
        if not _type_ok(hint, value):
            word = _TYPE_WORDS.get(hint) or ("a list of strings" if typing.get_origin(hint) is tuple else str(hint))
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise UsageError(f"--{f.name.replace('_', '-')} must be {word}, got {type(value).__name__} {shown}")
        if hint is float:
            object.__setattr__(cfg, f.name, float(value))


class _Checker:
    def choice(self, name, value, allowed, many=False):
        values = value if many else (value,)
        for v in values:
            if v not in allowed:
                raise UsageError(f"--{name.replace('_', '-')} {v!r} is not one of {', '.join(allowed)}")
        if many and not values:
            raise UsageError(f"--{name.replace('_', '-')} is empty: choose from {', '.join(allowed)}")

    def positive(self, name, value, minimum=1):
        if value is not None and (not isinstance(value, int) or value < minimum):
            raise UsageError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_HINTS = typing.get_type_hints(RunConfig)
LIST_FIELDS = ("models", "analyses")


def _coerce(name: str, value):
    if name == "replicas" and not isinstance(value, (bool, str)):  # YAML: replicas: 2, or a mapping
        return json.dumps(value) if isinstance(value, dict) else str(value) if isinstance(value, int) else value
    if name == "actor_resources" and isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise UsageError(f"--actor-resources is not valid JSON: {e}") from None
    if name in LIST_FIELDS:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"--{name} must be a list or a comma-separated string, got {type(value).__name__} {value!r}")
        return tuple(value)
    return value


def load_yaml(path: str) -> dict:
    """Read a YAML config: a mapping of RunConfig keys (dashes or underscores). Unknown keys are refused."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path} is not valid YAML: {one_line(e)}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path} must hold a mapping of option: value")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""
            raise UsageError(f"unknown key {key!r} in {path}{hint}")
        out[name] = value
    return out


def build_config(cli: dict, yaml_path: str | None = None) -> RunConfig:
    """YAML values first, then CLI values that were given (not None): the CLI wins."""
    values = load_yaml(yaml_path) if yaml_path else {}
    values.update({k: v for k, v in cli.items() if v is not None})
    values = {k: _coerce(k, v) for k, v in values.items()}
    try:
        return RunConfig(**values).resolved()
    except TypeError as e:
        raise UsageError(f"bad configuration: {e}") from None
