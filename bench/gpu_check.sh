#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one prepared command for a lent GPU machine, under 8 minutes on one H100.
#   on the device machine:  bash bench/gpu_check.sh            (writes bench/results/gpu_check_gpu.*, throughput_*_cuda*)
#   here, to check the script: DEVICE=cpu QUICK=1 bash bench/gpu_check.sh
# The device image has torch, timm, torchvision, safetensors, scipy, sklearn; pyautoattack travels as a wheel:
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps -d .whl pyautoattack==0.2.0
# and the device tool's call carries .whl (carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec $PY bench/gpu_check.py --device "${DEVICE:-cuda}" ${QUICK:+--quick}
