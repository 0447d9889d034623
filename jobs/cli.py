"""The ``probe`` command: ``probe run``, ``probe query``, ``probe report`` and the analyses' subcommands. The parser
needs the analyses' flags and subcommands, so it imports the registry (and with it torch and Ray: a few seconds);
each command imports the rest of what it needs."""
import argparse
import os
import signal
import sys

from jobs import analyses
from jobs.config import build_config
from jobs.errors import UsageError


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (``probe: error: ...``, exit 2) like every other bad input."""

    def error(self, message):
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        hint = f" (see probe {command + ' ' if command else ''}--help)"
        self.exit(2, f"probe: error: {message}{hint}\n")


def run_parser(sub) -> None:
    p = sub.add_parser("run", help="run the analyses and write a run folder",
                       description="Run the analyses over a corpus for every model; every flag is also a key of --config YAML (the CLI wins).")
    a = p.add_argument
    a("--config", help="YAML file of options (keys as below, dashes or underscores)")
    a("--models", help="comma list of hub ids (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or local folders saved with save_pretrained(); default: all four sizes")
    a("--data", help="the corpus: wikitext-2-raw-v1[:split] or wikitext-103-raw-v1[:split] (hub, split test), a hub dataset id "
                     "(read streaming through datasets), or a file, folder or glob (local or a pyarrow URI such as s3://bucket/prefix) of "
                     ".txt/.raw/.tokens (one row per line), .jsonl or .parquet files, read in sorted path order; default: wikitext-2-raw-v1:test")
    a("--data-config", help="the dataset config (name) of a hub dataset, or of a local dataset folder read through datasets.load_dataset")
    a("--data-split", help="the split of a hub dataset or local dataset folder; default train (test for the WikiText shorthand)")
    a("--text-column", help="the .jsonl field, Parquet column or dataset column holding the text; default text")
    a("--out", help="the run folder: a local path or a pyarrow filesystem URI such as s3://bucket/prefix; default: results/<run-id>")
    a("--run-id", help="name of the run; default: a UTC timestamp")
    a("--analyses", help=f"comma list of {','.join(analyses.names())}; default: {','.join(analyses.defaults())}")
    a("--max-tokens", type=_int, help="use only the first N tokens of the corpus")
    a("--chunk-tokens", type=_int, help="tokens per chunk (at most the model's n_positions); default 1024")
    a("--batch-size", type=_int, help="chunks per forward pass; default: chosen from memory")
    a("--device", help="auto|cpu|cuda; default auto (a GPU where the cluster has one)")
    a("--dtype", help="float32|bfloat16|float16 weights and activations; statistics are computed in float32/64; default float32")
    a("--address", help="Ray address of an existing cluster; default: start a local Ray instance")
    a("--seed", type=_int, help="seed of every random draw (samples, shuffled baseline, KSG jitter); default 0")
    a("--final-hidden", help="hf (last hidden state after ln_f, as HF returns it) or pre_ln_f (last block output); default hf")
    a("--tokenizer", help="tokenizer hub id or folder; default: the first model's")
    a("--alpha", type=float, help="family-wise significance level before Bonferroni; default 0.05")
    a("--max-in-flight", type=_int, help="batches queued per model actor; default 2")
    a("--replicas", help='actors per model: auto (on GPUs, slots in proportion to each model\'s n_params, so the largest '
      'model is not the straggler; one per model on CPUs), N for every model, or JSON such as \'{"gpt2-xl": 3}\' '
      '(models not named get 1); replicas share their model\'s batches through one queue; default auto')
    a("--placement-timeout", type=float, help="with --address: seconds to wait for the cluster to place the model actors before failing; default 180")
    a("--actor-resources", help='JSON: extra Ray resources per model actor, e.g. \'{"gpt2-xl": {"node_b": 1}}\' to place actors on nodes')
    a("--resume", action="store_true", default=None, help="finish an interrupted run (same --run-id/--out): only missing shards are computed")
    a("--allow-pickle", action="store_true", default=None, help="allow pickle (.bin) weights; default: safetensors only")
    a("--no-space-check", action="store_true", default=None,
      help="run even where --out's filesystem has less free space than the plan's disk estimate (checked after the corpus stage)")
    for analysis in analyses.REGISTRY.values():
        for option in analysis.options:
            kwargs = {**option.kwargs, "type": _int} if option.kwargs.get("type") is int else option.kwargs
            a(f"--{option.field.replace('_', '-')}", **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="probe", description="Observational interpretability of GPT-2 at corpus scale, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser(sub)
    q = sub.add_parser("query", help="SQL over a run's tables (polars)", description="Every table of the run is registered under its name.")
    q.add_argument("out", help="the run folder or URI")
    q.add_argument("sql", help='e.g. "SELECT model, avg(path_step) FROM layer_metrics GROUP BY model"')
    q.add_argument("--output", help="write the result to a .csv or .parquet file instead of printing it")
    r = sub.add_parser("report", help="(re)write OUT/report.html, OUT/figures/ and the analyses' pages")
    r.add_argument("out", help="the run folder or URI")
    for analysis in analyses.REGISTRY.values():
        for command in analysis.commands:
            c = sub.add_parser(command.name, help=command.help, description=command.help)
            c.add_argument("out", help="the run folder or URI")
            for flags, kwargs in command.arguments:
                c.add_argument(*flags, **({**kwargs, "type": _int} if kwargs.get("type") is int else kwargs))
            c.set_defaults(analysis_command=command)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag already reported in one line
        return e.code if isinstance(e.code, int) else 2
    try:
        command = getattr(args, "analysis_command", None)
        return cmd_analysis(command, args) if command else COMMANDS[args.command](args)
    except UsageError as e:
        print(f"probe: error: {e}", file=sys.stderr)
        return 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a cluster scheduler sends), raised like Ctrl-C so the run stops the same way."""


_SIGTERM_SEEN = []  # Ray's C extension can turn our exception into a plain KeyboardInterrupt: keep the fact


def _on_sigterm(signum, frame):
    _SIGTERM_SEEN.append(signum)
    raise Terminated()


def cmd_run(args) -> int:
    from jobs.manifest import own_run_id
    from jobs.run import run

    cli = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    cfg = build_config(cli, args.config)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run(cfg)
    except KeyboardInterrupt as e:
        _shutdown_ray()
        print(f"interrupted: resume with probe run --resume --run-id {own_run_id(cfg)} --out {cfg.out}", file=sys.stderr, flush=True)
        return 143 if isinstance(e, Terminated) or _SIGTERM_SEEN else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except BaseException:  # a second signal or a broken connection while stopping: exit anyway
        pass


def cmd_query(args) -> int:
    import polars as pl

    from jobs.api import run_query

    if args.output:
        check_output_file(args.output)
    result = run_query(args.out, args.sql)
    if args.output:
        write_result(result, args.output)
        print(f"{result.height} rows -> {args.output}")
    else:
        with pl.Config(tbl_rows=int(os.environ.get("PROBE_ROWS", "50")), tbl_cols=-1, fmt_str_lengths=60):
            print(result)
    return 0


def check_output_file(path: str) -> None:
    """Refuse a --output that cannot be written, before the query runs."""
    if not path.endswith((".csv", ".parquet")):
        raise UsageError(f"--output {path} must end in .csv or .parquet")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--output {path}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"--output {path} is a folder: give a file name")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--output {path}: folder {folder} is not writable")


def write_result(result, path: str) -> None:
    import polars as pl

    if path.endswith(".csv"):
        nested = [n for n, t in result.schema.items() if isinstance(t, (pl.List, pl.Array, pl.Struct))]
        if nested:
            raise UsageError(f"--output {path}: CSV cannot hold nested columns ({', '.join(nested)}): write .parquet, "
                             f"or select scalar columns (e.g. values[1] for one element of a list)")
        result.write_csv(path)
    else:
        result.write_parquet(path)


def cmd_report(args) -> int:
    from jobs.api import open_run
    from jobs.query import make_report

    print(make_report(open_run(args.out).store))
    return 0


def cmd_analysis(command, args) -> int:
    """An analysis's subcommand, given the opened run's tables."""
    from jobs.api import open_run

    return command.run(open_run(args.out).tables(), args)


COMMANDS = {"run": cmd_run, "query": cmd_query, "report": cmd_report}

if __name__ == "__main__":
    sys.exit(main())
