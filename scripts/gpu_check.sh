#!/usr/bin/env bash
# The GPU check: the project's GPU path run for real on one GPU, each stage bounded in time so that the whole check
# ends within --budget seconds (default 480). The stages run in the order of the questions they answer, so that a
# budget that runs out cuts the least important ones:
#   1. shards: photo-like 640x480 JPEG shards written by the project's converter, more samples than a timed cell
#      reads (a loader epoch that ends inside a timed window would put a pipeline rebuild into the figures);
#   2. compile, where the GPU has >= 120 GiB: every graph the timed stages need compiled into inductor's on-disk
#      cache, in parallel processes (elsewhere each stage's first step compiles its own, one at a time);
#   3. bench: `python -m trainer.tools.bench`, clip-infonce-dot compiled, at the first size: the one-rank engine
#      (synthetic), the end-to-end shards cell and the plain cell, with a torch.profiler table each; the shards cell
#      again with data.host_workers=2 (the loader's host work out of the trainer's interpreter lock); transformers'
#      ViltForQuestionAnswering (the stock reference); then the other sizes;
#   4. loaders: images/s of DALI's GPU decoding and of the PyTorch loader alone (python -m data_pipeline.tools.bench),
#      then a small sweep of DALI's settings at the first size (hw_decoder_load, CPU threads, prefetch depth);
#   5. smoke: trainer/main.py with the vqa2-base model shapes and random weights, DALI's GPU decoder, bf16 autocast,
#      model.compile, --steps steps with a checkpoint half-way, the process killed (kill -9) a few steps after that
#      checkpoint, then `--resume latest` to the end; smoke/smoke.json says whether the loss fell, whether the
#      resumed losses continue the first run's curve and whether DALI's own position was restored;
#   6. tests: the `gpu`-marked tests (pytest -m gpu);
#   7. zero: ZeRO-2 and ZeRO-1 with bf16 weights on one GPU, as several GPUs run them;
#   8. ranks: with 2 or more GPUs, `python -m trainer.tools.bench --ranks N` over all of them (the engine's
#      data-parallel modes against torch DDP); on one GPU it says it skipped.
# summary.txt holds the figures and each goal's verdict; everything goes into one archive (--archive) of at most
# --archive-mib MiB, the largest files left out (and listed) where they would not fit. --plan prints the stages in
# order with their time limits, and runs nothing.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$SECONDS
BUDGET=480
OUT=""
PRESET=vqa2-base
SIZES="384 224"
BATCH=256
SAMPLES=""  # default: see SAMPLES below
# Every timed bench cell runs this many steps: 1 + (WARMUP - 1) warm-up, REPEATS windows of STEPS, PROFILE_STEPS.
WARMUP=3
STEPS=5
REPEATS=3
PROFILE_STEPS=3
SMOKE_STEPS=60
WORKERS=8
STAGES="bench,loaders,smoke,tests,zero,ranks"
ALLOW_CPU=0
COMPILE=true
PLAN=0
ARCHIVE=""
ARCHIVE_MIB=60
COMMAND_LINE="scripts/gpu_check.sh $*"

usage() {
    cat <<'USAGE'
Usage: scripts/gpu_check.sh [OPTIONS]

Runs the project's GPU path on the first GPU of the machine it runs on, in this order, each stage within what is
left of a time budget: the throughput benchmark with profiles and transformers' ViLT, the loaders with a sweep of
DALI's settings, a resumed bf16 DALI training smoke, the gpu-marked tests, the ZeRO stages on one GPU, several GPUs
against torch DDP. One results folder, one archive of it, summary.txt with each goal's verdict.

Options:
  --out DIR          results folder (default: runs/gpu_check/<UTC date and time>)
  --archive FILE     the archive of the results folder (default: <out>.tar.gz)
  --archive-mib N    the archive's size limit; the largest files are left out (and listed) past it (default: 60)
  --budget S         seconds for the whole check; stages that no longer fit are skipped (default: 480)
  --stages LIST      comma-separated, of bench, loaders, smoke, tests, zero, ranks (default: all; they always run
                     in that order)
  --preset NAME      model shapes (default: vqa2-base, random weights)
  --sizes "A B"      image sizes for the benchmark; the first is also the smoke's and the sweep's (default: "384 224")
  --batch N          samples per step in the smoke and the benchmark (default: 256)
  --samples N        samples in the generated shard folder (default: 2.5 batches more than a timed cell reads,
                     6,016 at batch 256, so that no loader epoch ends inside a cell)
  --steps N          smoke steps; checkpoint at N/2, killed at N/2 + N/12 (default: 60)
  --workers N        DALI CPU threads / loader workers (default: 8)
  --no-compile       model.compile=false everywhere (eager; no compile stage)
  --allow-cpu        run without a GPU (a check of the script itself at tiny sizes; its figures mean nothing)
  --plan             print the stages in order (name, least and most seconds, command) and run nothing
  -h, --help         this message

Python: $VQA_PYTHON if set, else .venv/bin/python, else python3 (a GPU image's own Python with the project's
dependencies on PYTHONPATH; torch releases older than the pinned one are used as they are).
USAGE
}

die() { echo "gpu_check.sh: error: $*" >&2; exit 2; }
is_uint() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
        --archive) ARCHIVE="${2:?--archive needs a file}"; shift 2 ;;
        --archive-mib) ARCHIVE_MIB="${2:?--archive-mib needs a number}"; shift 2 ;;
        --budget) BUDGET="${2:?--budget needs seconds}"; shift 2 ;;
        --stages) STAGES="${2:?--stages needs a list}"; shift 2 ;;
        --preset) PRESET="${2:?--preset needs a name}"; shift 2 ;;
        --sizes) SIZES="${2:?--sizes needs a list}"; shift 2 ;;
        --batch) BATCH="${2:?--batch needs a number}"; shift 2 ;;
        --samples) SAMPLES="${2:?--samples needs a number}"; shift 2 ;;
        --steps) SMOKE_STEPS="${2:?--steps needs a number}"; shift 2 ;;
        --workers) WORKERS="${2:?--workers needs a number}"; shift 2 ;;
        --no-compile) COMPILE=false; shift ;;
        --allow-cpu) ALLOW_CPU=1; shift ;;
        --plan) PLAN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
done
# A timed cell reads CELL_STEPS batches from one loader; the default folder holds 2.5 batches more, and an epoch
# that is not a whole number of batches, so that no epoch ends inside a cell's windows or its profile.
CELL_STEPS=$(( WARMUP + STEPS * REPEATS + PROFILE_STEPS ))
CELL=(--warmup "$WARMUP" --steps "$STEPS" --repeats "$REPEATS")  # every timed cell's options
[[ -n "$SAMPLES" ]] || SAMPLES=$(( (CELL_STEPS + 2) * BATCH + BATCH / 2 ))
for pair in "budget:$BUDGET" "batch:$BATCH" "samples:$SAMPLES" "steps:$SMOKE_STEPS" "workers:$WORKERS" \
    "archive-mib:$ARCHIVE_MIB"; do
    is_uint "${pair#*:}" || die "--${pair%%:*} must be a positive integer, got '${pair#*:}'"
done
(( SMOKE_STEPS >= 12 )) || die "--steps must be at least 12 (checkpoint, kill and resume need room), got $SMOKE_STEPS"
read -r -a SIZE_LIST <<< "$SIZES"
[[ ${#SIZE_LIST[@]} -gt 0 ]] || die "--sizes is empty"
for size in "${SIZE_LIST[@]}"; do is_uint "$size" || die "--sizes: '$size' is not a positive integer"; done
IFS=',' read -r -a STAGE_LIST <<< "$STAGES"
for s in "${STAGE_LIST[@]}"; do
    [[ "$s" =~ ^(tests|smoke|bench|zero|ranks|loaders)$ ]] || die "--stages: unknown stage '$s'"
done
wants() { [[ ",$STAGES," == *",$1,"* ]]; }
FIRST="${SIZE_LIST[0]}"

if [[ -n "${VQA_PYTHON:-}" ]]; then PY="$VQA_PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3)" || die "no Python found (set VQA_PYTHON)"
fi
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if (( PLAN )); then
    GPU_GIB=80  # the plan is the one a GPU of 80 GiB runs (graphs compiled one at a time)
    OUT="${OUT:-runs/gpu_check/<utc-time>}"
    echo "# budget ${BUDGET} s; shard folder: $SAMPLES samples, $(( SAMPLES / BATCH )) batches of $BATCH, a timed cell reads $CELL_STEPS"
    echo "# stage, least seconds (skipped with less left), most seconds, command; as on an 80 GiB GPU"
else
    GPU_GIB=$("$PY" -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**30 if torch.cuda.is_available() else 0)')
    if [[ "$GPU_GIB" == 0 && "$ALLOW_CPU" == 0 ]]; then
        die "torch sees no CUDA GPU here (--allow-cpu checks the script itself on a CPU)"
    fi
    "$PY" -c 'import deepspeed, open_clip, transformers' 2>/dev/null \
        || die "deepspeed, open_clip or transformers is not importable from $PY (./launch.sh setup, or set VQA_PYTHON)"
    OUT="${OUT:-$ROOT/runs/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)}"
    mkdir -p "$OUT"
    OUT="$(cd "$OUT" && pwd)"
fi
ARCHIVE="${ARCHIVE:-$OUT.tar.gz}"
LOG="$OUT/gpu_check.log"
STATUS="$OUT/stages.tsv"
(( PLAN )) || printf 'stage\tstatus\tseconds\tnote\n' > "$STATUS"
note() { (( PLAN )) || echo "[$(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG" >&2; }
left() { echo $((BUDGET - (SECONDS - START))); }
record() { (( PLAN )) || printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$STATUS"; }

# run_stage NAME MIN_S MAX_S CMD...: CMD under a time limit of min(MAX_S, budget left); skipped under MIN_S left.
run_stage() {
    local name="$1" min="$2" max="$3"; shift 3
    local budget_left limit t0 rc
    if (( PLAN )); then
        printf '%s\t%s\t%s\t%s\n' "$name" "$min" "$max" "$*"
        return 0
    fi
    budget_left=$(left)
    if (( budget_left < min )); then
        note "$name: skipped, ${budget_left}s of the budget left (it needs at least ${min}s)"
        record "$name" skipped 0 "budget: ${budget_left}s left, needs ${min}s"
        return 0
    fi
    limit=$(( budget_left < max ? budget_left : max ))
    note "$name: start (limit ${limit}s)"
    t0=$SECONDS
    # timeout signals its whole process group, so the Python processes a stage starts end with it.
    timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >> "$OUT/$name.log" 2>&1
    rc=$?
    if (( rc == 124 || rc == 137 )); then
        note "$name: stopped at its limit of ${limit}s (log: $name.log)"
        record "$name" timeout $((SECONDS - t0)) "limit ${limit}s"
    elif (( rc != 0 )); then
        note "$name: failed, exit $rc (log: $name.log)"
        record "$name" "failed($rc)" $((SECONDS - t0)) "$(tail -n 1 "$OUT/$name.log" | tr "\t" " " | cut -c1-200)"
    else
        note "$name: done in $((SECONDS - t0))s"
        record "$name" ok $((SECONDS - t0)) "$(tail -n 1 "$OUT/$name.log" | tr "\t" " " | cut -c1-200)"
    fi
    return 0
}

if (( ! PLAN )); then
    {
        echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "command: $COMMAND_LINE"
        echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (uncommitted changes)')"
        command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
        "$PY" - <<'PY'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("deepspeed", "transformers", "open_clip", "nvidia.dali", "webdataset", "triton"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:  # a missing package is a finding of the check, not a reason to stop it
        print(name, "not importable:", type(exc).__name__, exc)
PY
        echo "cpu: $(nproc) cores; GPU memory: ${GPU_GIB} GiB"
        echo "shard folder: $SAMPLES samples, $(( SAMPLES / BATCH )) batches of $BATCH; a timed cell reads $CELL_STEPS"
    } > "$OUT/machine.txt" 2>&1
    tee -a "$LOG" < "$OUT/machine.txt" >&2
    (( SAMPLES / BATCH > CELL_STEPS )) || note "--samples $SAMPLES: ${CELL_STEPS} steps a cell cross a loader epoch" \
        "(the bench reports it as epoch_restarts; the default, $(( (CELL_STEPS + 2) * BATCH + BATCH / 2 )), does not)"
fi

# run_stage runs each stage in `bash -c` under timeout: the functions below and these settings go with it.
export PY OUT LOG STATUS START BUDGET PRESET SIZES BATCH SAMPLES WORKERS STAGES GPU_GIB COMPILE PLAN FIRST ROOT
# Several processes share the GPU while the graphs compile: growable segments keep each one's reservation tight.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

# -- 1. the shard folder -----------------------------------------------------------------------------------------------
DATA_ROOT="$OUT/data"
DATA="$DATA_ROOT/shards"
make_shards() {
    # VQA v2-format files with 6 questions per image (VQA v2 has ~5.4) by data_pipeline/convert/synthetic.py, then the
    # real converter; photo-like images so that JPEGs weigh and decode like COCO's.
    "$PY" -c 'import sys; from data_pipeline.convert.synthetic import write_vqa2
write_vqa2(sys.argv[1], n_images=max(1, -(-int(sys.argv[2]) // 6)), questions_per_image=6, bad=False,
           sizes=(640, 640, 480, 480), photo_like=True)' "$DATA_ROOT/raw" "$SAMPLES" \
    && "$PY" -m data_pipeline.convert vqa2 --questions "$DATA_ROOT/raw/questions.json" \
        --annotations "$DATA_ROOT/raw/annotations.json" --images "$DATA_ROOT/raw/images" --out "$DATA" \
        --min-answer-count 1 --shard-size 256 --workers "$WORKERS" --no-progress \
    && rm -rf "$DATA_ROOT/raw"
}
export DATA DATA_ROOT
export -f note left record wants make_shards
if wants smoke || wants bench || wants zero || wants loaders; then
    run_stage shards 30 120 make_shards
    if (( ! PLAN )) && [[ ! -f "$DATA/manifest.json" ]]; then
        note "no shard folder: the later stages need it"; STAGES=tests
    fi
fi

bench() {  # bench ARGS...: trainer.tools.bench on the shard folder, compiled; DALI required where there is a GPU
    local dali=(); [[ "$GPU_GIB" != 0 ]] && dali=(--set data.loader=dali)
    "$PY" -m trainer.tools.bench --preset "$PRESET" --batch-size "$BATCH" --variants clip-infonce-dot --train-data "$DATA" \
        --set "model.compile=$COMPILE" --set "data.num_workers=$WORKERS" "${dali[@]}" "$@"
}

# -- 2. the graphs, compiled into inductor's cache ahead of the timed stages ----------------------------------------
warm_cell() {  # warm_cell SIZE MODE [DEEPSPEED_JSON]: one untimed step, so that the timed run finds its graph compiled
    local name="$1px_$2${3:+_$(basename "$3" .json)}"
    bench --image-sizes "$1" --modes "$2" --warmup 1 --steps 1 --repeats 1 ${3:+--deepspeed-config "$3"} \
        --out "$OUT/warm/$name.json" > "$OUT/warm/$name.log" 2>&1
}
zero_configs() {  # ZeRO-2 and ZeRO-1 with bf16 weights (fp32 on a CPU), kept as written on one rank by their own torch_autocast section
    local base="$ROOT/deepspeed_configs/zero2_bf16.json" stage
    [[ "$GPU_GIB" == 0 ]] && base="$ROOT/deepspeed_configs/zero2_fp32.json"
    mkdir -p "$OUT/zero"
    for stage in 2 1; do
        "$PY" -c 'import json, sys; c = json.load(open(sys.argv[1])); c["zero_optimization"]["stage"] = int(sys.argv[2])
c["torch_autocast"] = {"enabled": False}
json.dump(c, open(sys.argv[3], "w"), indent=2)' "$base" "$stage" "$OUT/zero/stage$stage.json"
    done
}
warm_all() {
    mkdir -p "$OUT/warm"
    local cells=("$FIRST:synthetic") pids=() c size size_mode cfg rc=0 sizes
    read -r -a sizes <<< "$SIZES"
    # One rank runs the plain cell's arithmetic in every mode (fp32 weights, autocast bf16), so the smoke, synthetic,
    # shards and plain cells of a size share one graph; ZeRO with bf16 weights has its own.
    for size in "${sizes[@]:1}"; do wants bench && cells+=("$size:synthetic"); done
    wants zero && cells+=("$FIRST:synthetic:$OUT/zero/stage2.json")
    # One process per graph, the cores shared out (each would otherwise start one compile worker per core).
    export TORCHINDUCTOR_COMPILE_THREADS=$(( $(nproc) / ${#cells[@]} > 1 ? $(nproc) / ${#cells[@]} : 1 ))
    for c in "${cells[@]}"; do
        IFS=: read -r size_mode cfg <<< "${c#*:}"
        size="${c%%:*}"
        warm_cell "$size" "$size_mode" "$cfg" & pids+=($!)
    done
    for c in "${pids[@]}"; do wait "$c" || rc=1; done
    return $rc
}
export -f bench warm_cell zero_configs warm_all
(( PLAN )) || { wants zero && zero_configs; }
# Where the GPU has room for every graph at once (>= 120 GiB), they compile in parallel before the timed stages.
# Otherwise each stage compiles its own graph in its first step (the bench reports that step apart from the timed
# windows): a separate compile process would only add its start-up to the budget.
if [[ "$COMPILE" == true ]] && (( GPU_GIB >= 120 )) && { wants smoke || wants bench || wants zero; }; then
    run_stage compile 60 300 warm_all
fi

# -- 3. the benchmark: the first size's cells, the host-worker loader, transformers' ViLT, then the other sizes -----
if wants bench; then
    profile=(--profile "$OUT/profiles" --profile-steps "$PROFILE_STEPS")
    run_stage "bench_${FIRST}px" 45 240 bench --image-sizes "$FIRST" --modes synthetic,shards,plain "${CELL[@]}" \
        "${profile[@]}" --out "$OUT/bench_${FIRST}px.json"
    # The DALI loader's host work (JSON, tokens) in 2 processes instead of a thread of the trainer: shards mode only.
    run_stage "bench_${FIRST}px_host_workers" 30 90 bench --image-sizes "$FIRST" --modes shards \
        --set data.host_workers=2 "${CELL[@]}" "${profile[@]}" --out "$OUT/bench_${FIRST}px_host_workers.json"
    # The stock reference: transformers' ViltForQuestionAnswering, eager, as its own code runs it.
    run_stage "hf_vilt_${FIRST}px" 30 90 bench --image-sizes "$FIRST" --modes none --hf-vilt "${CELL[@]}" \
        --out "$OUT/hf_vilt_${FIRST}px.json"
    for size in "${SIZE_LIST[@]:1}"; do
        run_stage "bench_${size}px" 45 240 bench --image-sizes "$size" --modes synthetic,shards,plain "${CELL[@]}" \
            "${profile[@]}" --out "$OUT/bench_${size}px.json"
    done
fi

# -- 4. the loaders alone, then DALI's settings one at a time at the first size ------------------------------------
if wants loaders; then
    loaders=("$PY" -m data_pipeline.tools.bench --data "$DATA" --batch-size "$BATCH" --runs 3 --max-batches 10)
    run_stage loaders 30 90 "${loaders[@]}" --sizes "${SIZE_LIST[@]}" --workers "$WORKERS"
    # Each cell changes one setting from the defaults (hw_decoder_load 0.65, WORKERS threads, prefetch depth 2).
    run_stage loaders_dali_hw_load 20 45 "${loaders[@]}" --kinds dali --sizes "$FIRST" --workers "$WORKERS" \
        --hw-decoder-load 0.9 0.99
    run_stage loaders_dali_threads 20 45 "${loaders[@]}" --kinds dali --sizes "$FIRST" \
        --workers $(( WORKERS / 2 > 1 ? WORKERS / 2 : 1 )) $(( WORKERS * 2 ))
    run_stage loaders_dali_prefetch 20 45 "${loaders[@]}" --kinds dali --sizes "$FIRST" --workers "$WORKERS" \
        --prefetch 1 4
fi

# -- 5. the training smoke: killed after its half-way checkpoint, resumed, judged -----------------------------------
SMOKE="$OUT/smoke"
HALF=$(( SMOKE_STEPS / 2 ))
KILL_AT=$(( HALF + SMOKE_STEPS / 12 ))
LOG_EVERY=$(( SMOKE_STEPS / 12 ))
smoke_cmd() {  # sets SMOKE_CMD: trainer/main.py with the smoke's settings
    SMOKE_CMD=("$PY" trainer/main.py --preset "$PRESET" --train-data "$DATA" --run-dir "$SMOKE/run"
        --max-steps "$SMOKE_STEPS" --set model.vilt_pretrained=none --set model.clip_pretrained=none
        --set "model.compile=$COMPILE" --set "model.image_size=$FIRST" --set "train.micro_batch_size=$BATCH"
        --set "train.global_batch_size=$BATCH" --set "train.ckpt_every=$HALF" --set "train.log_every=$LOG_EVERY"
        --set train.progress_bar=false --set "data.num_workers=$WORKERS")
    [[ "$GPU_GIB" != 0 ]] && SMOKE_CMD+=(--set data.loader=dali)
    return 0
}
smoke_first() {
    # Runs until the half-way checkpoint is COMPLETE and step KILL_AT is logged, then kill -9 (a preemption
    # without warning). Exit 0 when it was killed that way, 1 when the run ended or failed first.
    mkdir -p "$SMOKE"
    smoke_cmd
    "${SMOKE_CMD[@]}" > "$SMOKE/first.log" 2>&1 &  # a simple command: $! is the Python process itself
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [[ -f "$SMOKE/run/checkpoints/global_step$HALF/COMPLETE" ]] \
            && grep -q "step $KILL_AT/$SMOKE_STEPS " "$SMOKE/first.log"; then
            kill -9 "$pid"; wait "$pid" 2>/dev/null
            echo "killed (kill -9) after step $KILL_AT was logged" >> "$SMOKE/first.log"
            return 0
        fi
        sleep 0.1  # a tiny model on a CPU steps in tens of milliseconds
    done
    wait "$pid"; echo "the first run ended by itself (exit $?) before it could be killed" >> "$SMOKE/first.log"
    return 1
}
smoke_resume() {
    [[ -f "$SMOKE/run/checkpoints/global_step$HALF/COMPLETE" ]] \
        || { echo "no complete checkpoint at step $HALF (see smoke/first.log)"; return 1; }
    smoke_cmd
    "${SMOKE_CMD[@]}" --resume latest > "$SMOKE/resumed.log" 2>&1 || return 1
    "$PY" - "$SMOKE" "$HALF" "$KILL_AT" "$SMOKE_STEPS" <<'PY'
import json, re, sys
from pathlib import Path

smoke, half, kill_at, steps = Path(sys.argv[1]), *map(int, sys.argv[2:])
line = re.compile(r"step (\d+)/\d+ loss ([0-9.naninf]+)")
def losses(name):
    return {int(s): float(v) for s, v in line.findall((smoke / name).read_text())}
first, resumed = losses("first.log"), losses("resumed.log")
both = sorted(set(first) & set(resumed))
falls = bool(first) and bool(resumed) and resumed[max(resumed)] < first[min(first)]
gaps = {s: abs(resumed[s] - first[s]) / max(abs(first[s]), 1e-8) for s in both}
verdict = {
    "first_run_losses": first, "resumed_run_losses": resumed, "steps_logged_by_both": both,
    "relative_difference_at_common_steps": gaps,
    "resumed_from_step": half, "first_run_killed_after_step": kill_at,
    "loss_falls": falls, "resumed_continues_curve": bool(both) and max(gaps.values()) < 0.05,
    "resumed_starts_after_checkpoint": bool(resumed) and min(resumed) > half,
    "dali_gpu": "dali-gpu" in (smoke / "first.log").read_text() + (smoke / "resumed.log").read_text(),
    # the resumed epoch restored DALI's own checkpoint (no decoding of the consumed batches), not the exact path
    "dali_state_restored": "resuming from the saved loader state" in (smoke / "resumed.log").read_text(),
}
(smoke / "smoke.json").write_text(json.dumps(verdict, indent=2) + "\n")
print(json.dumps({k: v for k, v in verdict.items() if not isinstance(v, dict)}))
sys.exit(0 if falls and verdict["resumed_continues_curve"] and verdict["resumed_starts_after_checkpoint"] else 1)
PY
}
export SMOKE HALF KILL_AT LOG_EVERY SMOKE_STEPS
export -f smoke_cmd smoke_first smoke_resume
if wants smoke; then
    run_stage smoke_first 45 200 smoke_first
    run_stage smoke 30 150 smoke_resume
fi

# -- 6. the gpu-marked tests -------------------------------------------------------------------------------------------
if wants tests; then
    run_stage tests 30 180 "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
        --junitxml="$OUT/tests.xml" tests
fi

# -- 7. the ZeRO stages on one GPU -------------------------------------------------------------------------------------
if wants zero; then
    # The bench's own cells run the one-rank default (stage 0, fp32 weights, autocast bf16); these run ZeRO with bf16
    # weights as several GPUs do (zero_configs above). Their graph compiles in the first step unless warmed above.
    for stage in 2 1; do
        run_stage "zero$stage" 40 150 bench --image-sizes "$FIRST" --modes synthetic \
            "${CELL[@]}" --deepspeed-config "$OUT/zero/stage$stage.json" \
            --out "$OUT/zero/bench_stage$stage.json"
    done
fi

# -- 8. several GPUs: the data-parallel modes against torch DDP -------------------------------------------------------
if wants ranks; then
    if (( PLAN )); then GPU_COUNT=2; else GPU_COUNT=$("$PY" -c 'import torch; print(torch.cuda.device_count())'); fi
    if (( GPU_COUNT >= 2 )); then
        # --batch-size per rank as the bench's: the graphs compiled for it serve every rank's cells.
        run_stage ranks 60 300 "$PY" -m trainer.tools.bench --ranks "$GPU_COUNT" --preset "$PRESET" --batch-size "$BATCH" \
            --image-size "$FIRST" --set "model.compile=$COMPILE" "${CELL[@]}" --profile-steps 2 --out "$OUT/ranks/bench_ranks.json"
    else
        note "ranks: skipped, ${GPU_COUNT} GPU(s) here (it needs 2 or more)"
        record ranks skipped 0 "${GPU_COUNT} GPU(s): needs 2 or more"
    fi
fi
(( PLAN )) && exit 0

rm -rf "$DATA_ROOT" "$SMOKE/run/checkpoints"  # gigabytes of JPEGs and optimizer states; the logs stay

# -- the summary, with each goal's verdict, and the archive -------------------------------------------------------------
"$PY" "$ROOT/scripts/gpu_check_summary.py" "$OUT" --first-size "$FIRST" > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt" >&2
"$PY" "$ROOT/scripts/gpu_check_summary.py" "$OUT" --archive "$ARCHIVE" --archive-mib "$ARCHIVE_MIB" >&2
note "done: results in $OUT, archived in $ARCHIVE"
