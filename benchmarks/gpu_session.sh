#!/usr/bin/env bash
# The GPU checks of the open work, in stages that each fit one 10-minute call of a GPU machine
# with no network. Each stage writes its outputs under $OUT (./out without it) as it goes, and
# bounds every step with a timeout, so a stage that runs long still returns what it measured.
#
#   bash benchmarks/gpu_session.sh tests     # the GPU tests
#   bash benchmarks/gpu_session.sh static    # why static-cache generate is slower patched, with Inductor's code
#   bash benchmarks/gpu_session.sh tps       # tokens/s: eager, hf-static, fast-loop, Liger, sampling
#   bash benchmarks/gpu_session.sh ops       # the op benchmarks with their peers, decode attention too
#   bash benchmarks/gpu_session.sh final     # with the decode attention: the tests that failed, tok/s of 8B (compiled) and SmolLM2
#   bash benchmarks/gpu_session.sh tune      # the QKV kernel's config sweep at M = 16
#   bash benchmarks/gpu_session.sh ncu       # Nsight Compute on the 8B one-token QKV kernel
#   bash benchmarks/gpu_session.sh attention # the decode attention: host time, GPU tests, benchmark, the 8B step's profile and tok/s with it
#
# Liger-Kernel comes from a wheel in .whl/ (pip download --no-deps liger-kernel==0.8.5 -d .whl),
# carried with the call. Keep sweeps small: a Triton config with a large fp32 tile can keep
# ptxas busy for minutes (benchmarks/tune_rmsnorm_qkv.py caps them).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out}"
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
step() {  # step SECONDS LOGNAME COMMAND...: run it bounded, log it, and say how long it took
    local limit=$1 log=$2
    shift 2
    timeout "$limit" "$@" 2>&1 | tee "$out/$log"
    echo "[$(($(date +%s) - start)) s] $log: exit ${PIPESTATUS[0]}" | tee -a "$out/steps.txt"
}

case "${1:-}" in
tests)
    step 500 tests.txt python3 -m pytest -q -p no:cacheprovider -x tests/test_eager_launch.py tests/test_ops.py \
        tests/test_ops_gate_up.py tests/test_ops_streaming_linear.py tests/test_patch_gpu.py tests/test_models.py \
        tests/test_generation.py tests/test_decode_attention.py
    ;;
static)
    # SmolLM2's shape compiles in seconds and shows the same patched slowdown as the 8B shape.
    # Inductor's generated code (the wrapper that launches each kernel or CUDA graph) comes back
    # as inductor_code.tgz.
    export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
    step 240 static.txt python3 benchmarks/profile_hf_static.py --perf-hints --shape smollm2-135m --new-tokens 32 \
        --repeats 2 --out "$out"
    find "$TORCHINDUCTOR_CACHE_DIR" -name '*.py' -size +40k | tar czf "$out/inductor_code.tgz" -T -
    ;;
attention)
    step 60 host_overhead.txt python3 benchmarks/host_overhead.py
    step 200 tests_attention.txt python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py \
        tests/test_patch_gpu.py::test_compiled_decode_with_decode_attention_matches_stock tests/test_generation.py
    step 100 bench_decode_attention.txt python3 benchmarks/bench_decode_attention.py --out "$out"
    step 100 profile_8b_attention.txt python3 benchmarks/profile_decode.py --shape llama3-8b \
        --fuse qkv,mlp,gemv,attention --out "$out"
    step 200 tps_8b_attention.txt python3 examples/compare_tps.py --shape llama3-8b --modes eager,hf-static,fast-loop \
        --batch-sizes 1 --new-tokens 64 --repeats 2 --peers none --fuse qkv,mlp,gemv,attention --out "$out"
    ;;
final)
    step 110 tests_failing.txt python3 -m pytest -q -p no:cacheprovider --tb=short \
        "tests/test_decode_attention.py::test_static_generate_matches_stock" \
        "tests/test_patch_gpu.py::test_compiled_decode_with_decode_attention_matches_stock[qwen3-torch.bfloat16]"
    step 220 tps_8b.txt python3 examples/compare_tps.py --shape llama3-8b --modes hf-static,fast-loop \
        --batch-sizes 1 --new-tokens 64 --repeats 2 --peers none --fuse qkv,mlp,gemv,attention --out "$out"
    step 200 tps_smollm2.txt python3 examples/compare_tps.py --shape smollm2-135m --modes eager,hf-static,fast-loop \
        --batch-sizes 1 --new-tokens 64 --repeats 2 --peers none --fuse qkv,mlp,gemv,attention --out "$out"
    ;;
tune)
    step 240 tune_qkv_m16.txt python3 benchmarks/tune_rmsnorm_qkv.py --ms 16 --shapes llama3-8b,llama3-70b \
        --out "$out/tune_qkv_m16.json"
    ;;
ncu)
    step 120 ncu_qkv_8b.txt ncu --clock-control none -k regex:rmsnorm_qkv --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
        --section WarpStateStats --section SchedulerStats python3 benchmarks/ncu_target.py --op rmsnorm_qkv --m 1
    ;;
tps)
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
            export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    step 280 tps_8b.txt python3 examples/compare_tps.py --shape llama3-8b --modes eager,hf-static,fast-loop \
        --batch-sizes 1 --new-tokens 64 --repeats 2 --out "$out"
    step 150 tps_8b_sampled.txt python3 examples/compare_tps.py --shape llama3-8b --modes fast-loop --batch-sizes 1 \
        --new-tokens 64 --repeats 2 --peers none --do-sample --temperature 0.7 --top-p 0.9 --out "$out"
    step 150 tps_smollm2.txt python3 examples/compare_tps.py --shape smollm2-135m --modes eager,hf-static,fast-loop \
        --batch-sizes 1,4 --new-tokens 64 --repeats 2 --out "$out"
    ;;
ops)
    for op in rmsnorm_qkv rmsnorm_gate_up streaming_linear decode_attention; do
        step 180 "bench_$op.txt" python3 "benchmarks/bench_$op.py" --out "$out"
    done
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh tests|static|tps|ops|tune|ncu|attention|final" >&2
    exit 2
    ;;
esac
