#!/usr/bin/env bash
# One entry point for users, CI and the Docker image: set-up, tests, the demo, training and tools.
# Every subcommand sets up what it needs (the virtual environment in .venv) before it runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VQA_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
DRY_RUN=0
# A new subcommand: a cmd_NAME function (answering --help), a line in usage, a line in main's case, a name here.
COMMANDS="setup, test, demo, compare, fetch-weights, train, tensorboard, help"

usage() {
    cat <<'USAGE'
Usage: ./launch.sh [--dry-run] COMMAND [ARGS...]

Commands:
  setup        create or update the virtual environment .venv from pyproject.toml (idempotent)
  test         set up, then run the whole test suite (ruff + pytest); extra ARGS go to pytest
  demo         set up, convert the embedded easy-VQA data (once), run the paper's comparison on it
  compare      set up, then run the paper's comparison on any preset and data (ARGS go to trainer.tools.compare)
  fetch-weights  set up, then download a preset's pretrained checkpoints into a folder the nodes share and
               print the --set options that point training at them (training itself never downloads)
  train        set up, then train with DeepSpeed: this node's GPUs, several nodes over ssh, or one node of
               several without ssh (Kubernetes, Slurm); ARGS go to trainer/main.py
               (--preflight: check every rank's GPU, network, data and run folder instead)
  tensorboard  set up, then serve TensorBoard for the runs (on 127.0.0.1 unless told otherwise)
  help         this message

Options:
  --dry-run    print the commands that would run instead of running them

Run './launch.sh COMMAND --help' for the options of one command.
USAGE
}

die() { echo "launch.sh: error: $*" >&2; exit 2; }
note() { echo "launch.sh: $*" >&2; }

run() {
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '%q ' "$@"; echo
    else
        "$@"
    fi
}

# Every package of the dependency tree, pinned with its hashes: generated from pyproject.toml by pip-compile (the
# command is in its header). pyproject.toml holds the direct pins, written once; this file follows from them.
LOCK_FILE="$ROOT/requirements.lock"

# Cheap fingerprint of everything that decides what is installed: re-install only when it changes.
# Bump SETUP_VERSION when cmd_setup's install steps change.
SETUP_VERSION=2
setup_stamp() {
    { cat "$ROOT/pyproject.toml"; [[ ! -f "$LOCK_FILE" ]] || cat "$LOCK_FILE"; echo "setup-version $SETUP_VERSION"; } |
        sha256sum | cut -d' ' -f1
}

# pip install, without the one warning line per package that local extra indexes without that package cause.
pip_install() {
    run "$PY" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# A first install writes about 7 GiB (torch's CUDA build): refuse with the numbers, not halfway through pip.
need_free_space() {  # DIR GIB: DIR, or the nearest folder above it that exists, has GIB GiB free
    local dir="$1" need="$2" free_kib
    while [[ ! -d "$dir" ]]; do dir="$(dirname "$dir")"; done
    free_kib="$(df -Pk "$dir" | awk 'NR == 2 {print $4}')"
    ((free_kib >= need * 1048576)) || die "setup: $VENV needs about $need GiB free; $dir has" \
        "$((free_kib / 1048576)) GiB (free some space, or set VQA_VENV to a folder on a larger disk)"
}

cmd_setup() {
    if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
        echo "Usage: ./launch.sh setup"
        echo "Create .venv (Python 3.11; \$VQA_VENV to put it elsewhere) and install every dependency from"
        echo "requirements.lock (the whole tree, pinned, each file's hash checked), then the project from pyproject.toml."
        echo "Quick when nothing changed: a stamp file records what was installed."
        return 0
    fi
    local stamp
    stamp="$(setup_stamp)"
    if [[ -x "$PY" && -f "$VENV/.setup-stamp" && "$(cat "$VENV/.setup-stamp")" == "$stamp" ]]; then
        return 0
    fi
    local python="${PYTHON:-python3.11}"
    command -v "$python" >/dev/null || die "Python 3.11 is required ('$python' not found; set PYTHON=/path/to/python3.11)"
    if [[ ! -x "$PY" ]]; then
        need_free_space "$VENV" 7
        echo "launch.sh: creating virtual environment $VENV" >&2
        run "$python" -m venv "$VENV"
    fi
    [[ -f "$LOCK_FILE" ]] || die "setup: $LOCK_FILE is missing (it pins every dependency; restore it from git)"
    echo "launch.sh: installing the locked dependencies into $VENV (first time: several minutes)" >&2
    pip_install --upgrade "pip>=24"
    # Every package at its locked version, each file checked against its hashes; --no-deps: nothing outside the lock.
    # DS_BUILD_OPS=0: no DeepSpeed op is compiled at install time (the trainer steps torch's fused AdamW; an op that
    # is needed, such as cpu_adam for optimizer offload, is compiled on first use).
    DS_BUILD_OPS=0 pip_install --require-hashes --no-deps -r "$LOCK_FILE"
    # The project itself, editable; its dependencies are all in place already.
    pip_install --no-deps -e "${ROOT}[dev]"
    [[ "$DRY_RUN" == 1 ]] || echo "$stamp" > "$VENV/.setup-stamp"
}

cmd_test() {
    if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
        echo "Usage: ./launch.sh test [--fast] [PYTEST_ARGS...]"
        echo "Set up .venv, check formatting and lint with ruff, then run the whole test suite with pytest."
        echo "--fast runs the fast tier only (pytest -m 'not slow': no multi-process training runs), for the"
        echo "inner loop of development; CI runs the whole suite."
        return 0
    fi
    local fast=()
    if [[ "${1:-}" == "--fast" ]]; then
        shift
        fast=(-m "not slow")
    fi
    cmd_setup
    cd "$ROOT"
    run "$VENV/bin/ruff" format --check .
    run "$VENV/bin/ruff" check .
    run "$PY" -m pytest "${fast[@]}" "$@"
}

DEMO_DATA="${VQA_DEMO_DATA:-$ROOT/data/easy-vqa}"
DEMO_RUN_DIR="${VQA_DEMO_RUN_DIR:-$ROOT/runs/demo}"

# Converts easy-VQA into shards once; a finished conversion (both manifests present) is reused.
ensure_easyvqa() {
    if [[ -f "$DEMO_DATA/train/manifest.json" && -f "$DEMO_DATA/test/manifest.json" ]]; then
        note "reusing easy-VQA shards in $DEMO_DATA"
        return 0
    fi
    note "converting the easy-VQA data set shipped by the easy-vqa package into $DEMO_DATA"
    run "$PY" -m data_pipeline.convert easyvqa --out "$DEMO_DATA"
}

cmd_demo() {
    if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
        cat <<'HELP'
Usage: ./launch.sh demo [COMPARE_ARGS...]

The project's main job on a fresh machine: set up .venv, convert the easy-VQA data set that the easy-vqa package
ships into WebDataset shards (once, in data/easy-vqa; VQA_DEMO_DATA overrides), then run the paper's comparison
(baseline, clip-no-infonce, clip-infonce-cos, clip-infonce-dot) with the `demo` preset through the real stack, on
the GPUs when there are any, on the CPU otherwise. The runs go side by side (--jobs auto): one per CPU core, each
with one thread, or one per GPU; a run's numbers are the same whatever --jobs. Every run validates every 100 steps
on a fixed subset of 500 test questions (a shard folder written once in the output folder) and its last checkpoint
is scored on the whole test split. Output in runs/demo (VQA_DEMO_RUN_DIR overrides): report.md, results.json,
loss_curves.png and one TensorBoard run per variant. Extra arguments go to `python -m trainer.tools.compare` and win over
the demo's (e.g. --seeds 0,1,2 or --variants clip-infonce-dot,clip-infonce-dot+dup-mask).
HELP
        return 0
    fi
    cmd_setup
    cd "$ROOT"
    ensure_easyvqa
    run "$PY" -m trainer.tools.compare --preset demo --train-data "$DEMO_DATA/train" --val-data "$DEMO_DATA/test" \
        --run-dir "$DEMO_RUN_DIR" --val-subset 500 --val-every 100 "$@"
    note "report: $DEMO_RUN_DIR/report.md"
    note "watch:  ./launch.sh tensorboard --logdir $DEMO_RUN_DIR   (or: tensorboard --logdir $DEMO_RUN_DIR)"
}

cmd_compare() {
    if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
        cat <<'HELP'
Usage: ./launch.sh compare [--preset P] [--data D] [--variants V1,V2,...] [--steps N] [--seeds S1,S2,...]
                           [--run-dir R] [other trainer.tools.compare options]

Run the paper's comparison with any preset: every variant with the same seeds, data order and hyperparameters.
--data D is a folder holding train/ and test/ (or val/) shard folders as `python -m data_pipeline.convert`
writes them (default: the demo's easy-VQA shards, converted on first use); --train-data/--val-data name them
separately instead. Output (default runs/compare-PRESET): report.md, results.json, loss_curves.png.
Runs go side by side (--jobs, default auto: one per --gpus-per-run GPUs, else one per --threads-per-run cores);
--only V --seeds S runs one cell of a study (one node of a cluster), --report-only gathers the report afterwards.
HELP
        "$PY" -m trainer.tools.compare --help 2>/dev/null | sed -n '/^options:/,$p' || true
        return 0
    fi
    cmd_setup
    cd "$ROOT"
    local data="" preset="demo" run_dir="" explicit_data=0
    local -a rest=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --data) [[ $# -ge 2 ]] || die "compare: --data needs a folder"; data="$2"; shift 2 ;;
            --data=*) data="${1#--data=}"; shift ;;
            --preset) [[ $# -ge 2 ]] || die "compare: --preset needs a name"; preset="$2"; shift 2 ;;
            --run-dir) [[ $# -ge 2 ]] || die "compare: --run-dir needs a folder"; run_dir="$2"; shift 2 ;;
            --train-data|--val-data) explicit_data=1; rest+=("$1" "${2:-}"); shift 2 || shift ;;
            *) rest+=("$1"); shift ;;
        esac
    done
    local -a data_args=()
    if [[ "$explicit_data" == 0 ]]; then
        if [[ -z "$data" ]]; then
            ensure_easyvqa
            data="$DEMO_DATA"
        fi
        [[ -d "$data" ]] || die "compare: --data $data: no such folder"
        local val="$data/test"
        [[ -d "$data/val" ]] && val="$data/val"
        [[ -f "$data/train/manifest.json" ]] || die "compare: --data $data: no train/manifest.json (convert it first)"
        [[ -f "$val/manifest.json" ]] || die "compare: --data $data: no test/ or val/ shard folder with a manifest.json"
        data_args=(--train-data "$data/train" --val-data "$val")
    fi
    run "$PY" -m trainer.tools.compare --preset "$preset" --run-dir "${run_dir:-$ROOT/runs/compare-$preset}" \
        "${data_args[@]}" "${rest[@]}"
}

cmd_fetch_weights() {
    if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
        cat <<'HELP'
Usage: ./launch.sh fetch-weights [--preset P] [--cache DIR] [--vilt NAME] [--clip TAG] [--clip-arch ARCH]
                                 [--timeout SECONDS]

Set up .venv, then download the pretrained checkpoints that preset P names (default vqa2-base: ViLT
dandelin/vilt-b32-mlm and open_clip's ViT-B-32 `openai` weights) into DIR, a folder every node reads at the same
path (default: $VQA_WEIGHTS, else weights/ in the repository). huggingface_hub shows the progress and resumes an
interrupted download; files already complete are kept. The last lines, on stdout, are the options that point
training at the local copies, e.g.
  --set model.vilt_pretrained=DIR/vilt/dandelin--vilt-b32-mlm
  --set model.clip_pretrained=DIR/open_clip/models--timm--vit_base_patch32_clip_224.openai/snapshots/.../open_clip_model.safetensors
Training never downloads (HF_HUB_OFFLINE=1): a checkpoint missing from local disk stops it at start with one line.
Every network call gives up after --timeout SECONDS (default 60) without an answer; an endpoint (HF_ENDPOINT, else
huggingface.co) that times out twice in a row is given up on, with one line naming it.
Exit status: 0 done, 1 a download failed (or timed out), 2 bad input.
HELP
        "$PY" -m trainer.modeling.weights --help 2>/dev/null | sed -n '/^options:/,$p' || true
        return 0
    fi
    cmd_setup
    run "$PY" -m trainer.modeling.weights "$@"
}

# ---------------------------------------------------------------------------------------------------------------
# train and tensorboard: their options, checks and the commands they run live in trainer/launch/ (python -m
# trainer.launch), where tests call them. It runs from the repository root, so that this checkout's package is the
# one imported, and it needs only the standard library: before the set-up (--check, --help, --dry-run on a fresh
# clone) any Python 3.11 runs it. exec: the signals (docker stop, Ctrl-C) reach it, which passes them on to the ranks.
# --check first: a mistyped option is refused before the set-up, not after an install.
launcher() {
    local py="$PY"
    [[ -x "$py" ]] || py="${PYTHON:-python3.11}"
    local -a options=(--root "$ROOT" --venv "$VENV" --caller-dir "$PWD")
    [[ "$DRY_RUN" != 1 ]] || options+=(--dry-run)
    if [[ "$1" == --check ]]; then
        command -v "$py" >/dev/null || return 0  # no Python 3.11 at all: the set-up says so
        (cd "$ROOT" && "$py" -m trainer.launch "${options[@]}" "$@")
        return
    fi
    cd "$ROOT"
    exec "$py" -m trainer.launch "${options[@]}" "$@"
}

# docs/cluster.md has the recipes; ./launch.sh train --help says every option.
cmd_train() {
    if [[ "${1:-}" != "--help" && "${1:-}" != "-h" ]]; then
        launcher --check train "$@" || exit
        cmd_setup
    fi
    launcher train "$@"
}

cmd_tensorboard() {
    if [[ "${1:-}" != "--help" && "${1:-}" != "-h" ]]; then
        launcher --check tensorboard "$@" || exit
        cmd_setup
    fi
    launcher tensorboard "$@"
}

main() {
    while [[ $# -gt 0 && "$1" == --* ]]; do
        case "$1" in
            --dry-run) DRY_RUN=1; shift ;;
            --help|-h) usage; return 0 ;;
            *) die "unknown option '$1' (see ./launch.sh --help)" ;;
        esac
    done
    [[ $# -gt 0 ]] || { usage; return 2; }
    local cmd="$1"; shift
    case "$cmd" in
        setup) cmd_setup "$@" ;;
        test) cmd_test "$@" ;;
        demo) cmd_demo "$@" ;;
        compare) cmd_compare "$@" ;;
        fetch-weights) cmd_fetch_weights "$@" ;;
        train) cmd_train "$@" ;;
        tensorboard) cmd_tensorboard "$@" ;;
        help) usage ;;
        *) die "unknown command '$cmd' (one of: $COMMANDS; see ./launch.sh --help)" ;;
    esac
}

# Run unless sourced (the tests source this file to call its functions).
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
