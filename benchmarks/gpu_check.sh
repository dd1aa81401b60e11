#!/usr/bin/env bash
# The GPU checks of issue 17 in one script, for a machine with one CUDA GPU: about 5 minutes expected on an
# H100, and every step has a time limit, so the whole ends within 9 minutes and 30 seconds even if steps hang.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; writes into $OUT (default build/gpu_check)
#
# It needs a Python whose torch sees the GPU and lora_lab's dependencies (PEFT is optional: only the PEFT
# rows need it); nothing is downloaded. Steps:
#   1. the machine: nvidia-smi, torch, CUDA, bf16 support;
#   2. the CUDA unit test (tests/test_distributed.py: fused AdamW, pinned batches, bf16 autocast on the GPU);
#   3. the NCCL path: torchrun with one process on the GPU, smoke profile (DDP over NCCL, rank 0 writes);
#   4. the course profile end to end (`lora-lab run --profile course`, the GPU's default path: bf16 autocast,
#      fused AdamW, pinned batches), timed: "the course profile's whole run in minutes, not hours";
#   5. benchmarks/gpu.py: LoRA / full / PEFT step ratios (bf16 and fp32), bf16 / fp32, peak GPU memory, on the
#      course's 8.2M model and a ~100M GPT; KV-cache generation; torch.compile'd / eager steps (last).
# Output (five files, so that a remote runner returning few files gets them all): gpu_check.log (every
# step's full output), gpu.json (the benchmark rows), course_results.json and course_report.md (step 4),
# nccl_results.json (step 3). A failed step is reported and the next still runs; the exit status counts them.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-build/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
WORK=$(mktemp -d)  # run folders and the artifact cache (checkpoints stay here, not in $OUT)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LORA_LAB_CACHE="$WORK/cache"
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, append its output to the log, show its tail
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS status=0
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1 || status=$?
    cat "$WORK/$name.log" >>"$LOG"
    tail -n 30 "$WORK/$name.log"
    if [ "$status" -eq 0 ]; then
        echo "--- $name: ok in $((SECONDS - start)) s" | tee -a "$LOG"
    else
        echo "--- $name: FAILED (exit $status$([ "$status" -eq 124 ] && echo ', time limit')) after" \
             "$((SECONDS - start)) s" | tee -a "$LOG"
        failed=$((failed + 1))
    fi
}

step 1_machine 30 bash -c "nvidia-smi; $PYTHON -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", \
torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0), \"bf16:\", \
torch.cuda.is_available() and torch.cuda.is_bf16_supported())'"
step 2_cuda_test 60 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_distributed.py -k cuda -rs
step 3_nccl 60 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 -m lora_lab run --profile smoke \
    --device cuda --out "$WORK/smoke-nccl" --no-progress
cp "$WORK/smoke-nccl/results.json" "$OUT/nccl_results.json" 2>/dev/null
step 4_course 150 bash -c "time $PYTHON -m lora_lab run --profile course --device cuda --out $WORK/course --no-progress"
cp "$WORK/course/results.json" "$OUT/course_results.json" 2>/dev/null
cp "$WORK/course/report.md" "$OUT/course_report.md" 2>/dev/null
step 5_bench 270 "$PYTHON" benchmarks/gpu.py --json "$OUT/gpu.json"
echo "=== $failed step(s) failed; the full log, results and gpu.json are in $OUT" | tee -a "$LOG"
rm -rf "$WORK"
exit "$failed"
