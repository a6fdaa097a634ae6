#!/usr/bin/env bash
# effalg developer entry point.
#   bash scripts/dev.sh setup   # virtualenv in .venv, all four packages editable, test and benchmark extras
#   bash scripts/dev.sh demo    # setup, then run the demo
#   bash scripts/dev.sh test    # setup, then ruff and the whole test suite
#   bash scripts/dev.sh bench   # setup, then the benchmarks
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="${EFFALG_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

setup() {
    if [ ! -x "$PY" ]; then
        python3 -m venv "$VENV"
    fi
    "$PY" -m pip install -q --disable-pip-version-check --upgrade pip
    # torch is pinned to the CPU 2.13 build. Where the wheel lies on disk (this project's machines) it is
    # taken from there; a range admitting newer releases would pull a multi-GB CUDA build.
    local wheel
    wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13') else 1)" 2>/dev/null; then
        if [ -n "$wheel" ]; then "$PY" -m pip install -q "$wheel"; else "$PY" -m pip install -q "torch==2.13.0"; fi
    fi
    "$PY" -m pip install -q --disable-pip-version-check \
        -e packages/effalg-kernels -e packages/effalg-core \
        -e packages/effalg-diffusers -e packages/effalg-transformers \
        -r requirements-dev.txt
}

case "${1:-}" in
    setup) setup ;;
    demo)
        setup
        "$PY" examples/demo.py "${@:2}"
        ;;
    test)
        setup
        "$PY" -m ruff check packages tests benchmarks examples scripts reference_models
        # Triton kernels are checked on the CPU through the interpreter.
        export TRITON_INTERPRET=1
        set +e
        "$PY" -m pytest -n "${EFFALG_TEST_WORKERS:-2}" "${@:2}"
        rc=$?
        set -e
        # pytest exits 5 when no test was collected: that is a failure here.
        exit $rc
        ;;
    bench)
        setup
        "$PY" benchmarks/run_all.py "${@:2}"
        ;;
    *)
        echo "usage: bash scripts/dev.sh {setup|demo|test|bench}" >&2
        exit 2
        ;;
esac
