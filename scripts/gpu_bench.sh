#!/usr/bin/env bash
# Issue 7's GPU measurements in one go, with `python -m trainer.bench` (docs/performance.md):
#   1. clip-infonce-dot and baseline at 384 and 224 px, batch 256, DeepSpeed ZeRO-2 bf16
#      (deepspeed_configs/zero2_bf16.json), modes synthetic, shards (DALI GPU decoding) and plain, model.compile on;
#   2. the A/B of deepspeed_configs/README.md ("Speed on one GPU"): clip-infonce-dot at the first size, eager, in the
#      shipped ZeRO-2 bf16 engine, in plain PyTorch, and in an engine with the settings the configs had before.
# Without --data it first writes a shard folder of photo-like 640x480 JPEGs (quality 90, like COCO's) with the real
# converter, sized so that no timed window crosses an epoch, and keeps it for later runs.
# Everything lands in one results folder: a table (.txt) and a JSON file per run, the GPU's description, the log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VQA_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

OUT=""
DATA=""
SIZES="384 224"
VARIANTS="clip-infonce-dot,baseline"
MODES="synthetic,shards,plain"
BATCH=256
STEPS=10
WARMUP=5
REPEATS=3
COMPILE=true
WORKERS=""
SAMPLES=""
AB=1
COMMAND_LINE="scripts/gpu_bench.sh $*"

usage() {
    cat <<'USAGE'
Usage: scripts/gpu_bench.sh [OPTIONS]

Runs issue 7's throughput measurements on this machine's first GPU and writes them to one results folder.

Options:
  --out DIR         results folder (default: runs/gpu_bench/<UTC date and time>)
  --data DIR        an existing shard folder (default: generate photo-like 640x480 JPEG shards, kept in
                    data/bench_photo_<samples>/shards and reused)
  --samples N       samples in the generated shard folder (default: (warmup + steps x repeats) x batch)
  --sizes "A B"     image sizes, one trainer.bench run each (default: "384 224")
  --variants LIST   comma-separated variants (default: clip-infonce-dot,baseline)
  --modes LIST      comma-separated modes (default: synthetic,shards,plain)
  --batch N         samples per step (default: 256)
  --steps N         steps per timed window (default: 10)
  --warmup N        untimed steps first, the first one compiles (default: 5)
  --repeats N       timed windows per cell, the median is reported (default: 3)
  --workers N       DALI CPU threads / loader workers (default: the vqa2-base preset's)
  --no-compile      model.compile=false in the main runs
  --no-ab           skip the DeepSpeed-settings A/B
  -h, --help        this message

One command does all of it (about 25 minutes on an H100, most of it compiling); to fit shorter sessions, split it:
  scripts/gpu_bench.sh --sizes 384 --variants clip-infonce-dot --out runs/gpu_bench/a
  scripts/gpu_bench.sh --sizes 224 --variants clip-infonce-dot --no-ab --out runs/gpu_bench/b   (and so on)
USAGE
}

die() { echo "gpu_bench.sh: error: $*" >&2; exit 2; }
note() { echo "gpu_bench.sh: $*" >&2; }
is_uint() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
        --data) DATA="${2:?--data needs a folder}"; shift 2 ;;
        --samples) SAMPLES="${2:?--samples needs a number}"; shift 2 ;;
        --sizes) SIZES="${2:?--sizes needs a list}"; shift 2 ;;
        --variants) VARIANTS="${2:?--variants needs a list}"; shift 2 ;;
        --modes) MODES="${2:?--modes needs a list}"; shift 2 ;;
        --batch) BATCH="${2:?--batch needs a number}"; shift 2 ;;
        --steps) STEPS="${2:?--steps needs a number}"; shift 2 ;;
        --warmup) WARMUP="${2:?--warmup needs a number}"; shift 2 ;;
        --repeats) REPEATS="${2:?--repeats needs a number}"; shift 2 ;;
        --workers) WORKERS="${2:?--workers needs a number}"; shift 2 ;;
        --no-compile) COMPILE=false; shift ;;
        --no-ab) AB=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
done

for pair in "batch:$BATCH" "steps:$STEPS" "warmup:$WARMUP" "repeats:$REPEATS"; do
    is_uint "${pair#*:}" || die "--${pair%%:*} must be a positive integer, got '${pair#*:}'"
done
[[ -z "$WORKERS" ]] || is_uint "$WORKERS" || die "--workers must be a positive integer, got '$WORKERS'"
[[ -z "$SAMPLES" ]] || is_uint "$SAMPLES" || die "--samples must be a positive integer, got '$SAMPLES'"
read -r -a SIZE_LIST <<< "$SIZES"
[[ ${#SIZE_LIST[@]} -gt 0 ]] || die "--sizes is empty"
for size in "${SIZE_LIST[@]}"; do
    is_uint "$size" || die "--sizes: '$size' is not a positive integer"
done
if [[ ",$MODES," == *,shards,* && -z "$SAMPLES" ]]; then
    SAMPLES=$(( (WARMUP + STEPS * REPEATS) * BATCH ))
fi

[[ -x "$PY" ]] || die "no Python at $PY: run ./launch.sh setup first (or set VQA_VENV)"
cd "$ROOT"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "torch sees no CUDA GPU here; this script measures on a GPU (the CPU figures: docs/performance.md)"
"$PY" -c 'import deepspeed, open_clip' 2>/dev/null \
    || die "deepspeed or open_clip is not importable from $PY: run ./launch.sh setup"
if ! "$PY" -c 'import nvidia.dali' 2>/dev/null; then
    note "warning: DALI is not installed: the shards mode falls back to the PyTorch loader (CPU JPEG decoding)"
fi

OUT="${OUT:-$ROOT/runs/gpu_bench/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
LOG="$OUT/gpu_bench.log"
note "results in $OUT"
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "command: $COMMAND_LINE"
    echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (uncommitted changes)')"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
    fi
    "$PY" -c 'import torch, deepspeed; print("torch", torch.__version__, "cuda", torch.version.cuda, "deepspeed", deepspeed.__version__)' 2>/dev/null
} > "$OUT/machine.txt"

if [[ ",$MODES," == *,shards,* && -z "$DATA" ]]; then
    DATA_ROOT="$ROOT/data/bench_photo_$SAMPLES"
    DATA="$DATA_ROOT/shards"
    if [[ ! -f "$DATA/manifest.json" ]]; then
        note "writing $SAMPLES photo-like 640x480 JPEG samples to $DATA (once; reused by later runs)"
        rm -rf "$DATA_ROOT"
        # VQA v2-format files (3 questions per image) written by data_pipeline/synthetic.py, then the real converter.
        "$PY" -c 'import sys; from data_pipeline.synthetic import write_vqa2
write_vqa2(sys.argv[1], n_images=max(1, -(-int(sys.argv[2]) // 3)), bad=False, sizes=(640, 640, 480, 480), photo_like=True)' \
            "$DATA_ROOT/raw" "$SAMPLES" 2>&1 | tee -a "$LOG"
        "$PY" -m data_pipeline.convert vqa2 --questions "$DATA_ROOT/raw/questions.json" \
            --annotations "$DATA_ROOT/raw/annotations.json" --images "$DATA_ROOT/raw/images" --out "$DATA" \
            --min-answer-count 1 --shard-size 256 --no-progress 2>&1 | tee -a "$LOG"
        rm -rf "$DATA_ROOT/raw"  # the converter's input; the shards hold their own copy of every JPEG
    fi
fi

COMMON=(--batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --repeats "$REPEATS" --preset vqa2-base)
if [[ -n "$WORKERS" ]]; then
    COMMON+=(--set "data.num_workers=$WORKERS")
fi
DATA_ARGS=()
if [[ -n "$DATA" ]]; then
    DATA_ARGS=(--train-data "$DATA")
fi

FAILED=()
bench() {  # NAME ARGS...: one trainer.bench run, its table in NAME.txt and its numbers in NAME.json
    local name="$1"; shift
    note "trainer.bench $name"
    if ! "$PY" -m trainer.bench "${COMMON[@]}" "$@" --out "$OUT/$name.json" 2>>"$LOG" | tee "$OUT/$name.txt"; then
        note "trainer.bench $name failed (see $LOG); going on with the next run"
        FAILED+=("$name")
    fi
}

for size in "${SIZE_LIST[@]}"; do
    bench "bench_${size}px" --variants "$VARIANTS" --image-sizes "$size" --modes "$MODES" "${DATA_ARGS[@]}" \
        --deepspeed-config deepspeed_configs/zero2_bf16.json --set "model.compile=$COMPILE"
done

if [[ "$AB" == 1 ]]; then
    # The ZeRO-2 bf16 settings before deepspeed_configs/README.md's "Speed on one GPU" (DeepSpeed's own defaults for
    # the throughput timer and the bf16 overflow check, overlap_comm on). Eager: the host-side costs show most there.
    cat > "$OUT/zero2_bf16_before.json" <<'JSON'
{
  "zero_optimization": {
    "stage": 2,
    "overlap_comm": true,
    "contiguous_gradients": true,
    "reduce_scatter": true,
    "reduce_bucket_size": 50000000,
    "allgather_bucket_size": 50000000
  },
  "gradient_clipping": 0.0,
  "bf16": {
    "enabled": true
  }
}
JSON
    size="${SIZE_LIST[0]}"
    bench "ab_shipped_eager_${size}px" --variants clip-infonce-dot --image-sizes "$size" --modes synthetic,plain \
        --deepspeed-config deepspeed_configs/zero2_bf16.json --set model.compile=false
    bench "ab_before_eager_${size}px" --variants clip-infonce-dot --image-sizes "$size" --modes synthetic \
        --deepspeed-config "$OUT/zero2_bf16_before.json" --set model.compile=false
fi

if [[ ${#FAILED[@]} -gt 0 ]]; then
    note "failed: ${FAILED[*]}; the others are in $OUT"
    exit 1
fi
note "done: the tables are the .txt files in $OUT, the same numbers in the .json files"
