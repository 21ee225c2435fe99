#!/usr/bin/env bash
# The device check: tests that need a device, the parity report, the train step at 512x512 (U-Net
# and EC-CaM-UNet, float32/bfloat16 x remat none/blocks) beside the PyTorch reference step on the
# same chip, scaling over the devices present and the input pipeline against the step, in under
# 8 minutes, into one markdown report (benchmarks/device_check.py says what each section does).
#
#   benchmarks/device_check.sh [--smoke] [--report device_check.md] [--budget 450] [--size 512]
#
# --smoke: every section on the CPU at a tiny size, in a few minutes (tests/test_device_check.py).
#
# On a machine whose Python lacks this project's pure-Python dependencies (an accelerator image
# with jax, flax, optax, orbax and torch but no grain, nibabel or ml_collections), carry them as
# wheels in a folder (default .whl, or $WHEELS), prepared where pip can reach PyPI:
#   benchmarks/device_check.sh --prepare-wheels        # pip download into .whl (Python 3.12)
# This script then installs them into /tmp/ecm_site (--no-index: nothing is fetched) and puts
# that on PYTHONPATH before it starts. $PYTHON (default python3) is the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
# Pure-Python packages of requirements.txt missing from a typical accelerator image, with the
# dependencies of theirs it lacks too (grain: array-record, portpicker).
CARRIED="grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 nibabel==5.4.2 ml-collections==1.1.0
pydicom==3.0.2 tensorboardX==2.6.5"

if [[ "${1:-}" == "--prepare-wheels" ]]; then
  mkdir -p "$WHEELS"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$WHEELS" $CARRIED
  exit 0
fi

if ! "$PYTHON" -c 'import grain, nibabel, ml_collections' 2>/dev/null; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/ecm_site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/ecm_site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "missing grain/nibabel/ml_collections and no wheels in $WHEELS:" \
         "run benchmarks/device_check.sh --prepare-wheels where pip works" >&2
    exit 2
  fi
fi

export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
# JAX and PyTorch share the chip: no preallocation, so each takes what it uses and the device
# peaks compare.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
for arg in "$@"; do
  if [[ "$arg" == "--smoke" ]]; then export JAX_PLATFORMS=cpu; fi
done
exec "$PYTHON" -m benchmarks.device_check "$@"
