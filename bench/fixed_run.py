"""Run the whole job on fixed inputs, so that two source trees can be compared run folder by run folder.

    python bench/fixed_run.py OUT [--two-models] [--replicas N] [--batch-size N]

Inputs go to OUT-inputs/: the tests' tiny random GPT-2 (seed 0), or with --two-models the two tiny
models of ``tests.conftest.two_model_inputs`` (3 and 2 layers), and the first 300 lines of the
WikiText-2 raw test split. The job is ``python -m jobs.cli run`` (all five analyses) started from the
source tree this script sits in (cwd and PYTHONPATH = its repo root, which Ray's workers inherit).
Compare two run folders with ``bench/equal_runs.py``.
"""
import argparse
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "wikitext-2-raw", "wiki.test.raw"))
sys.path.insert(0, REPO)


def prepare_inputs(inputs: str, two_models: bool) -> tuple[list[str], str]:
    """Save the model folder(s) and the 300-line corpus under ``inputs``; return (models, corpus path)."""
    from tests.conftest import save_tiny_model

    os.makedirs(inputs, exist_ok=True)
    if two_models:
        models = [save_tiny_model(os.path.join(inputs, "tiny-a"), seed=1),
                  save_tiny_model(os.path.join(inputs, "tiny-b"), seed=2, n_layer=2, n_embd=48, n_inner=96)]
    else:
        models = [save_tiny_model(os.path.join(inputs, "tiny-gpt2"), seed=0)]
    corpus = os.path.join(inputs, "corpus.txt")
    with open(CORPUS, encoding="utf-8") as src, open(corpus, "w", encoding="utf-8") as dst:
        for _, line in zip(range(300), src):
            dst.write(line)
    return models, corpus


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the run folder to write (must not exist yet)")
    p.add_argument("--two-models", action="store_true", help="two tiny models of different depths instead of one")
    p.add_argument("--replicas", type=int, default=None, help="actors per model (default: 2 with --two-models, else the job's default)")
    p.add_argument("--batch-size", type=int, default=None, help="chunks per batch (default: the job's, here all 16 chunks in one batch)")
    p.add_argument("--analyses", default=None, help="probe run --analyses (default: the default analyses)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        p.error(f"{out} exists: give a new run folder")
    models, corpus = prepare_inputs(out + "-inputs", args.two_models)
    replicas = args.replicas if args.replicas is not None else (2 if args.two_models else None)
    cmd = [sys.executable, "-m", "jobs.cli", "run", "--models", ",".join(models), "--data", corpus,
           "--chunk-tokens", "256", "--max-tokens", "4096", "--target", " the", "--seed", "0", "--out", out]
    if replicas is not None:
        cmd += ["--replicas", str(replicas)]
    if args.batch_size is not None:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.analyses:
        cmd += ["--analyses", args.analyses]
    env = {**os.environ, "PYTHONPATH": REPO}
    where = subprocess.run([sys.executable, "-c", "import jobs; print(jobs.__file__)"], cwd=REPO, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    print(f"fixed_run: jobs from {where}\n  {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
    print(f"fixed_run: exit {rc}, wall {time.perf_counter() - start:.1f} s -> {out}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
