#!/usr/bin/env bash
# The GPU measurements of docs/gpu_performance.md, in one prepared script (issue 14).
#
#   bash tools/benchmarks/gpu_run.sh [all|check|tests|bench-demo|bench-real|audit]...
#
# Run from the repository root on a CUDA machine. Results (logs, JSON reports) go to $OUT (default
# out/gpu). Python: $PYTHON (default python3) with torch (CUDA), transformers, timm, safetensors,
# scipy, pillow, tqdm, pytest. The packages such a machine may lack (segment-anything,
# mobilesam-mirror, pynrrd) are installed from wheels in .whl/ when that folder exists (a machine
# without internet; fetch them elsewhere with `bash tools/benchmarks/gpu_run.sh wheels`), else with pip.
# Each stage is a separate step so that a short device lease can run them one by one:
#   check       the GPU and the Python stack
#   tests       the tests marked gpu (parity fp16/bf16/compile vs fp32, overlapped copies, CUDA-graph
#               tracker, no undeclared host sync with every option)
#   bench-demo  bench pipeline, demo models, 256-px phantom: fp32 eager / fp16 / fp16+compile
#   bench-real  random weights in the real architectures at 1024 px: SAM ViT-B + D-FINE-L and
#               MobileSAM + D-FINE-S, same columns (+ reduce-overhead for ViT-B + D-FINE-L)
#   audit       runtime audit on CUDA (sync-debug mode + profiler memcpy counts), fp16 + compile
set -euo pipefail

PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu}
FRAMES=${FRAMES:-100}
WARMUP=${WARMUP:-10}
MODELS=${MODELS:-$OUT/models}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
CLI=("$PY" -m UltramotionIGTLib)
NEEDED=(segment-anything==1.0 mobilesam-mirror pynrrd)

install() {
    if "$PY" -c "import segment_anything, mobile_sam, nrrd" 2>/dev/null; then
        return
    fi
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/ultramotion-site .whl/*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/ultramotion-site"
    else
        "$PY" -m pip install -q "${NEEDED[@]}"
    fi
}

stage_wheels() {  # on a machine with internet: the wheels the GPU machine lacks, into .whl/
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform any -d .whl "${NEEDED[@]}"
}

stage_check() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    "$PY" - <<'EOF' | tee -a "$OUT/gpu.txt"
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(torch.cuda.get_device_name(0))
EOF
}

stage_tests() {
    "$PY" -m pytest -q -m gpu -p no:cacheprovider --durations=15 \
        Testing/test_acceleration.py Testing/test_tracking.py Testing/test_matching.py \
        Testing/test_segmenter.py Testing/test_detector.py Testing/test_sam_families.py \
        Testing/test_audit_runtime.py 2>&1 | tee "$OUT/tests.log"
}

bench() {  # bench NAME ARGS...: one bench pipeline run, text table and JSON
    local name=$1
    shift
    "${CLI[@]}" bench pipeline --device cuda --frames "$FRAMES" --warmup "$WARMUP" \
        --json-out "$OUT/bench-$name.json" "$@" 2>&1 | tee "$OUT/bench-$name.md"
}

stage_bench_demo() {
    bench demo --precision fp16 --compile
}

stage_bench_real() {
    if [ ! -d "$MODELS/detector-dfine-l" ]; then
        "${CLI[@]}" make-test-models --real-size --out "$MODELS"
    fi
    bench vitb-dfinel --detector "$MODELS/detector-dfine-l" --sam "$MODELS/sam/sam_vit_b.safetensors" \
        --frame-size 1024 --no-legacy --precision fp16 --compile
    bench mobilesam-dfines --detector "$MODELS/detector-dfine-s" \
        --sam "$MODELS/sam/mobile_sam_vit_t.safetensors" --frame-size 1024 --no-legacy --precision fp16 --compile
    bench vitb-dfinel-cudagraphs --detector "$MODELS/detector-dfine-l" \
        --sam "$MODELS/sam/sam_vit_b.safetensors" --frame-size 1024 --no-legacy --precision fp16 --compile \
        --compile-mode reduce-overhead
}

stage_audit() {
    "${CLI[@]}" audit --runtime --device cuda --frames 20 --warmup 2 --precision fp16 --compile \
        --fail-on undeclared --output "$OUT/audit-fp16-compile.md"
    "${CLI[@]}" audit --runtime --device cuda --frames 20 --warmup 2 --compare \
        --output "$OUT/audit-compare.md"
}

run_stage() {
    case $1 in
        wheels) stage_wheels ;;
        check) install && stage_check ;;
        tests) install && stage_tests ;;
        bench-demo) install && stage_bench_demo ;;
        bench-real) install && stage_bench_real ;;
        audit) install && stage_audit ;;
        *) echo "gpu_run.sh: unknown stage $1 (all|wheels|check|tests|bench-demo|bench-real|audit)" >&2; return 2 ;;
    esac
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
[ "${stages[*]}" = all ] && stages=(check tests audit bench-demo bench-real)
failed=()
for stage in "${stages[@]}"; do
    echo "== gpu_run.sh: $stage" >&2
    run_stage "$stage" || failed+=("$stage")  # later stages still run: their numbers are wanted too
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_run.sh: failed stages: ${failed[*]} (logs in $OUT)" >&2
    exit 1
fi
