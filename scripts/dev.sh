#!/usr/bin/env bash
# effalg developer entry point.
#   bash scripts/dev.sh setup   # virtualenv in .venv, all four packages editable, test tools (bench adds the peers)
#   bash scripts/dev.sh demo    # setup, then run the demo
#   bash scripts/dev.sh test    # setup, then ruff and the whole test suite
#   bash scripts/dev.sh bench   # setup (+ benchmark peers), then the benchmarks
#   bash scripts/dev.sh aot     # setup, then compile every Triton kernel for sm_80/sm_90 and print the report
#   bash scripts/dev.sh aot-manifest  # re-record the Triton launches of tests/kernels (triton_launches.json)
#   bash scripts/dev.sh gpu-check [--quick] [--skip-tests] [--out DIR]
#                               # setup, then scripts/gpu_check.py on a CUDA GPU: the cuda-marked and Triton kernel
#                               # tests on the GPU plus GEMM / MoA attention / PixArt timings (< 10 min on an H100),
#                               # written to outputs/gpu_check/gpu_check.{json,md}. setup keeps torch only if it is
#                               # 2.13 (else it installs the CPU wheel): put a CUDA build of torch 2.13 in the venv
#                               # first, or point EFFALG_VENV at an existing CUDA venv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="${EFFALG_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

setup() {
    # Arguments: extra requirements files installed on top of requirements-dev.txt (`bench` passes
    # requirements-bench.txt, the benchmark peers; the test/demo environment never gets them).
    local extra=() req
    for req in "$@"; do extra+=(-r "$req"); done
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
        -r requirements-dev.txt ${extra[@]+"${extra[@]}"}
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
        setup requirements-bench.txt
        "$PY" benchmarks/run_all.py "${@:2}"
        ;;
    aot)
        setup
        env -u TRITON_INTERPRET "$PY" -m effalg.kernels.triton.aot report "${@:2}"
        ;;
    aot-manifest)
        setup
        # One process (no xdist): tests/kernels/conftest.py collects every launch and rewrites the manifest.
        TRITON_INTERPRET=1 EFFALG_AOT_MANIFEST_UPDATE=1 "$PY" -m pytest -p no:xdist -q tests/kernels \
            --deselect tests/kernels/test_triton_aot.py
        ;;
    gpu-check)
        setup
        "$PY" scripts/gpu_check.py "${@:2}"
        ;;
    *)
        echo "usage: bash scripts/dev.sh {setup|demo|test|bench|aot|aot-manifest|gpu-check}" >&2
        exit 2
        ;;
esac
