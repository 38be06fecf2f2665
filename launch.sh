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
  compare      set up, then run the paper's comparison on any preset and data (ARGS go to trainer.compare)
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

# Writes LINES to FILE, one a line; a dry run prints the shell command that would do it instead.
write_lines() {
    local file="$1"; shift
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '%s' "printf '%s\n'"; printf ' %q' "$@"; printf ' > %q\n' "$file"
    else
        printf '%s\n' "$@" > "$file"
    fi
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

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

# ---------------------------------------------------------------------------------------------------------------
# train: DeepSpeed's launcher (deepspeed, from the venv) running trainer/main.py. docs/cluster.md has the recipes.

train_usage() {
    cat <<'USAGE'
Usage: ./launch.sh train [LAUNCH OPTIONS] [--] [TRAINER ARGS...]

Runs `deepspeed [LAUNCH OPTIONS] trainer/main.py [TRAINER ARGS]` from the repository root. Launch options come
first; the first other argument, or everything after `--`, goes to trainer/main.py unchanged
(./launch.sh train -- --help shows the trainer's options). Relative paths in TRAINER ARGS are taken from the
repository root, where trainer/main.py runs.

Checking first:
  --preflight         run `python -m trainer.preflight` on the same ranks instead of the trainer (deepspeed
                      --module trainer.preflight): every rank checks its GPU and memory, an all-reduce over the
                      world (latency, bus bandwidth), reading samples of --train-data/--val-data, and writing to
                      --run-dir; rank 0 prints one table, and the exit status is 1 when a check fails. TRAINER
                      ARGS stay as they are (the preflight ignores the ones it does not use), so adding
                      --preflight to a training command checks that command's nodes and paths in seconds.

One node (default):
  --num_gpus N        processes on this node. Default: one per local GPU (nvidia-smi --list-gpus; with
                      CUDA_VISIBLE_DEVICES set, DeepSpeed takes exactly the GPUs listed there); on a machine
                      without a GPU, one CPU process (--num_gpus 1: DeepSpeed's CPU accelerator, gloo)
  --master_port PORT  rendezvous port (default: the first free one from 29500 upward, so that several jobs can
                      share the host; launch.sh says which)

Several nodes over ssh, started from node 0 (DeepSpeed's pdsh launcher, passwordless ssh to every node, the
repository and .venv at the same path on every node):
  --hostfile FILE     one line per node: HOST slots=GPUS (e.g. "worker-0 slots=8"); # comments allowed
  --num_nodes K       use only the first K hosts of the hostfile
  --num_gpus N        use GPUs 0..N-1 of each node instead of the hostfile's slots
  --master_addr ADDR  address of node 0 that every node can reach (default: DeepSpeed asks node 0's
                      `hostname -I` over ssh)
  --master_port PORT  rendezvous port on node 0 (DeepSpeed's default: 29500; every node must use the same,
                      so launch.sh does not change it: with 29500 in use on node 0 it stops and says so)
  --ssh_port PORT     ssh port of the nodes, if not 22

One node of several without ssh (Kubernetes, Slurm, one container per node): run the same command on every
node, each with its own --node_rank; each node starts only its own processes.
  --no_ssh            this mode
  --node_rank R       this node's rank, 0 <= R < number of nodes (node 0 hosts the rendezvous)
  --master_addr ADDR  required: node 0's address
  --num_nodes K       K nodes with the same number of GPUs (--num_gpus, or this node's GPU count), or
  --hostfile FILE     the same hostfile on every node; its line order gives the node ranks
  --master_port PORT  as above

Environment:
  --env NAME=VALUE    one more variable for the processes of every node (repeatable)
  Every node's processes get: every NCCL_* variable set here, with NCCL_DEBUG=WARN unless set;
  TORCH_NCCL_ASYNC_ERROR_HANDLING (default 1: a failed or hung collective aborts the job instead of hanging it);
  VQA_TRAIN_DATA, VQA_VAL_DATA, VQA_RUN_DIR, HF_HOME, HF_HUB_OFFLINE, TORCH_HOME, OMP_NUM_THREADS,
  VQA_LOG_LEVEL when set. VQA_LOG_LEVEL (debug, info, warning, error; default warning) is the threshold for other
  libraries' lines in the trainer and for DeepSpeed's launcher (its --log_level).
  Over ssh DeepSpeed exports them on the other nodes from a file named by DS_ENV_FILE (launch.sh writes it,
  after the lines of your own ~/.deepspeed_env and ./.deepspeed_env); without ssh each node exports its own.
  VQA_TRAIN_DATA, VQA_VAL_DATA, VQA_RUN_DIR also become --train-data, --val-data, --run-dir for
  trainer/main.py unless TRAINER ARGS give them.

SIGTERM (docker stop, Kubernetes, Slurm, cloud preemption) and Ctrl-C (SIGINT) go to every rank of this node at
once, and launch.sh waits for them to exit (the trainer checkpoints on either); over ssh, to DeepSpeed's runner,
which stops every node. A run stopped so ends with one line naming the saved checkpoint and the command that
continues it (exit status 130 for SIGINT, 143 for SIGTERM).

Examples:
  ./launch.sh train --preset tiny --train-data data/easy-vqa/train --val-data data/easy-vqa/test --run-dir runs/tiny
  ./launch.sh train --hostfile hostfile --master_addr 10.0.0.1 -- --preset vqa2-base --resume latest ...
  ./launch.sh train --no_ssh --num_nodes 2 --node_rank 1 --master_addr 10.0.0.1 -- --preset vqa2-base ...
  ./launch.sh train --preflight --hostfile hostfile -- --train-data /mnt/shards/train --run-dir /mnt/runs/r
USAGE
}

# Variables that every node's processes get besides DeepSpeed's own (RANK, MASTER_ADDR, ...), when set here;
# every NCCL_* variable too. train_usage and docs/cluster.md say what each one is for.
NODE_ENV_NAMES=(TORCH_NCCL_ASYNC_ERROR_HANDLING VQA_TRAIN_DATA VQA_VAL_DATA VQA_RUN_DIR HF_HOME HF_HUB_OFFLINE
    TORCH_HOME OMP_NUM_THREADS VQA_LOG_LEVEL)

in_list() { local x="$1" y; shift; for y in "$@"; do [[ "$x" == "$y" ]] && return 0; done; return 1; }

# NAME=VALUE for every variable that goes to every node: NCCL_*, NODE_ENV_NAMES, and the names given as arguments.
node_env_lines() {
    local name
    for name in $(compgen -e | LC_ALL=C sort); do
        if [[ "$name" == NCCL_* ]] || in_list "$name" "${NODE_ENV_NAMES[@]}" "$@"; then
            printf '%s=%s\n' "$name" "${!name}"
        fi
    done
}

# The NAME=VALUE lines of the user's own DeepSpeed environment files, which DeepSpeed would read if launch.sh did
# not point DS_ENV_FILE at its own file: $HOME/NAME, then ./NAME, NAME being $DS_ENV_FILE or .deepspeed_env.
user_deepspeed_env_lines() {
    local name="${DS_ENV_FILE:-.deepspeed_env}" file line
    local -a files=("$HOME/$name" "$ROOT/$name")
    [[ "$name" == /* ]] && files=("$name")
    for file in "${files[@]}"; do
        [[ -f "$file" ]] || continue
        while IFS= read -r line || [[ -n "$line" ]]; do
            [[ "$line" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] && printf '%s\n' "$line"
        done < "$file"
    done
    return 0
}

# GPUs of the local machine: nvidia-smi's list, else the /dev/nvidiaN device files (a container given GPUs but not
# the driver's utilities sees only its own); 0 where neither shows one.
local_gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU ' || true
        return 0
    fi
    local -a devices=()
    shopt -s nullglob
    devices=(/dev/nvidia[0-9]*)
    shopt -u nullglob
    echo "${#devices[@]}"
}

# Reads a DeepSpeed hostfile into HOSTFILE_HOSTS and HOSTFILE_SLOTS, refusing what DeepSpeed would refuse or
# misread: a missing file, a line that is not "HOST slots=N", a host listed twice, no host at all.
read_hostfile() {
    local file="$1" line n=0
    HOSTFILE_HOSTS=(); HOSTFILE_SLOTS=()
    [[ -e "$file" ]] || die "train: hostfile '$file' does not exist"
    [[ -f "$file" && -r "$file" ]] || die "train: hostfile '$file' is not a readable file"
    while IFS= read -r line || [[ -n "$line" ]]; do
        n=$((n + 1))
        line="${line#"${line%%[![:space:]]*}"}"
        [[ -z "$line" || "$line" == \#* ]] && continue
        if [[ ! "$line" =~ ^([^[:space:]]+)[[:space:]]+slots=([0-9]+)([[:space:]]|$) ]]; then
            die "train: hostfile '$file' line $n: expected 'HOST slots=N' (e.g. 'worker-0 slots=8'), got '$line'"
        fi
        in_list "${BASH_REMATCH[1]}" "${HOSTFILE_HOSTS[@]}" && die "train: hostfile '$file' lists ${BASH_REMATCH[1]} twice"
        (( 10#${BASH_REMATCH[2]} >= 1 )) || die "train: hostfile '$file' line $n: slots must be at least 1"
        HOSTFILE_HOSTS+=("${BASH_REMATCH[1]}"); HOSTFILE_SLOTS+=("$((10#${BASH_REMATCH[2]}))")
    done < "$file"
    (( ${#HOSTFILE_HOSTS[@]} > 0 )) || die "train: hostfile '$file' lists no node: it needs one 'HOST slots=N' line per node (e.g. 'worker-0 slots=8')"
}

# Does the argument list hold OPTION, as `OPTION VALUE` or `OPTION=VALUE`?
has_option() {
    local option="$1" arg; shift
    for arg in "$@"; do [[ "$arg" == "$option" || "$arg" == "$option="* ]] && return 0; done
    return 1
}

DEFAULT_MASTER_PORT=29500

# True when something on this host accepts connections on PORT: another job's rendezvous (torch's TCPStore
# listens on every address, loopback included). Pure bash, so that it needs nothing installed.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The first port from START upward that nothing on this host listens on.
first_free_port() {
    local port="$1"
    while port_in_use "$port"; do
        (( port < 65535 )) || die "train: no free port from $1 to 65535 on this host; give --master_port PORT"
        port=$((port + 1))
    done
    echo "$port"
}

# True when HOST names the host launch.sh runs on: a name or address of its own.
is_this_host() {
    local host="$1"
    [[ "$host" == localhost || "$host" == 127.0.0.1 || "$host" == "$(hostname 2>/dev/null)" ||
        "$host" == "$(hostname -s 2>/dev/null)" ]] && return 0
    local -a addresses=()
    read -r -a addresses <<< "$(hostname -I 2>/dev/null || true)"
    in_list "$host" "${addresses[@]}"
}

# A temporary folder for the files handed to DeepSpeed (env file, generated hostfile), removed when launch.sh
# exits. A dry run prints the mktemp command and uses its template as the path.
make_launch_dir() {
    local template="${TMPDIR:-/tmp}/vqa-align.XXXXXX"
    if [[ "$DRY_RUN" == 1 ]]; then
        run mktemp -d "$template"
        LAUNCH_DIR="$template"
    else
        LAUNCH_DIR="$(mktemp -d "$template")"
        trap 'rm -rf "$LAUNCH_DIR"' EXIT
    fi
}

# Runs the launcher and waits for it, passing SIGTERM and SIGINT on. DeepSpeed's runner has no SIGTERM handler when
# it starts this node's processes itself (one node, or --no_ssh): it would die and leave the ranks running, untold.
# And its per-node launcher (deepspeed.launcher.launch) passes a SIGTERM on to the ranks one at a time, waiting for
# each to exit (30 s, then SIGKILL) before telling the next, which deadlocks a checkpoint that needs every rank. So
# launch.sh sends the signal to every rank of this node at once and waits for them; the launcher sees them exit with
# their own status. Over ssh (TARGET=runner) the runner's own handler stops pdsh and the remote launchers.
# The launcher runs in a session of its own (setsid), so that Ctrl-C at a terminal reaches launch.sh alone, which
# passes it on as it does SIGTERM: DeepSpeed's runner would otherwise print a KeyboardInterrupt traceback and its
# launcher start killing the ranks' process trees while they save. The launcher starts in the background so that
# the traps can run while it works; the subshell undoes what bash does to background jobs (SIGINT ignored, stdin
# from /dev/null).
run_passing_sigterm() {
    local target="$1"; shift
    if [[ "$DRY_RUN" == 1 ]]; then run "$@"; return 0; fi
    TRAIN_PID="" TRAIN_SIGNAL_TARGET="$target" TRAIN_STOP_SIGNAL=""
    trap 'pass_signal TERM' TERM
    trap 'pass_signal INT' INT
    ( trap - INT QUIT TERM; exec setsid "$@" ) <&0 &
    TRAIN_PID=$!
    local rc again
    while true; do
        rc=0; wait "$TRAIN_PID" || rc=$?
        kill -0 "$TRAIN_PID" 2>/dev/null || break  # still running: a trap interrupted `wait`
    done
    # If a trap interrupted the last `wait` just as the launcher ended, its status is still to be collected.
    if (( rc > 128 )); then
        again=0; wait "$TRAIN_PID" 2>/dev/null || again=$?
        (( again == 127 )) || rc=$again
    fi
    trap - TERM INT
    return "$rc"
}

# The trap for SIGTERM and SIGINT (SIG): every rank (the per-node launcher's children) at once; before the ranks
# exist, the launcher; before that, the runner. A second Ctrl-C is passed on too: the ranks then stop at once.
pass_signal() {
    local sig="$1"
    local -a launchers=() ranks=()
    if [[ -z "$TRAIN_PID" ]]; then
        note "SIG$sig before the launch: not launching"
        if [[ "$sig" == INT ]]; then exit 130; else exit 143; fi
    fi
    TRAIN_STOP_SIGNAL="SIG$sig"
    if [[ "$TRAIN_SIGNAL_TARGET" == runner ]]; then
        note "SIG$sig: passing it to DeepSpeed's runner, which stops the processes of every node"
        kill "-$sig" "$TRAIN_PID" 2>/dev/null || true
        return 0
    fi
    mapfile -t launchers < <(pgrep -P "$TRAIN_PID" || true)
    if (( ${#launchers[@]} > 0 )); then
        mapfile -t ranks < <(pgrep -P "$(IFS=,; echo "${launchers[*]}")" || true)
    fi
    if (( ${#ranks[@]} > 0 )); then
        note "SIG$sig: passing it to every rank on this node (pids ${ranks[*]}) and waiting for them to save a checkpoint"
        kill "-$sig" "${ranks[@]}" 2>/dev/null || true
    elif (( ${#launchers[@]} > 0 )); then
        note "SIG$sig before the ranks started: stopping DeepSpeed's launcher"
        kill -TERM "${launchers[@]}" 2>/dev/null || true
    else
        kill -TERM "$TRAIN_PID" 2>/dev/null || true
    fi
}

# The last line of a training run that a signal stopped: the checkpoint the ranks saved (the run folder's `latest`
# pointer, rewritten once a checkpoint is complete) and the command that continues the run.
# Args: the signal's name, the run folder, then launch.sh's train arguments as given.
stopped_note() {
    local sig="$1" run_dir="$2"; shift 2
    local -a again=()
    local skip=0 arg tag=""
    for arg in "$@"; do  # the same command, its --resume (if any) replaced by --resume auto
        if (( skip )); then skip=0; [[ "$arg" != -* ]] && continue; fi
        case "$arg" in
            --resume) skip=1; continue ;;
            --resume=*) continue ;;
        esac
        again+=("$arg")
    done
    again+=(--resume auto)
    [[ "$run_dir" == /* ]] || run_dir="$ROOT/$run_dir"
    [[ ! -f "$run_dir/checkpoints/latest" ]] || tag="$(cat "$run_dir/checkpoints/latest")"
    if [[ -n "$tag" ]]; then
        note "stopped by $sig: checkpoint $tag saved in $run_dir/checkpoints; continue with: ./launch.sh train$(printf ' %q' "${again[@]}")"
    else
        note "stopped by $sig with no complete checkpoint in $run_dir/checkpoints; start again with: ./launch.sh train$(printf ' %q' "${again[@]}")"
    fi
}

# The trainer's run folder for TRAINER ARGS: --run-dir, else $VQA_RUN_DIR, else the trainer's default.
trainer_run_dir() {
    local prev="" arg
    for arg in "$@"; do
        if [[ "$prev" == --run-dir ]]; then echo "$arg"; return 0; fi
        [[ "$arg" != --run-dir=* ]] || { echo "${arg#--run-dir=}"; return 0; }
        prev="$arg"
    done
    echo "${VQA_RUN_DIR:-runs/latest}"
}

# DeepSpeed's runner and per-node launcher log at INFO by default (the command lines, the world info as base64, the
# environment): WARNING unless VQA_LOG_LEVEL asks for more.
ds_log_level() {
    local level="${VQA_LOG_LEVEL:-warning}"
    level="${level,,}"
    case "$level" in
        debug|info|warning|error|critical) echo "$level" ;;
        *) die "VQA_LOG_LEVEL must be one of debug, info, warning, error, critical; got '${VQA_LOG_LEVEL}'" ;;
    esac
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
loss_curves.png and one TensorBoard run per variant. Extra arguments go to `python -m trainer.compare` and win over
the demo's (e.g. --seeds 0,1,2 or --variants clip-infonce-dot,clip-infonce-dot+dup-mask).
HELP
        return 0
    fi
    cmd_setup
    cd "$ROOT"
    ensure_easyvqa
    run "$PY" -m trainer.compare --preset demo --train-data "$DEMO_DATA/train" --val-data "$DEMO_DATA/test" \
        --run-dir "$DEMO_RUN_DIR" --val-subset 500 --val-every 100 "$@"
    note "report: $DEMO_RUN_DIR/report.md"
    note "watch:  ./launch.sh tensorboard --logdir $DEMO_RUN_DIR   (or: tensorboard --logdir $DEMO_RUN_DIR)"
}

cmd_compare() {
    if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
        cat <<'HELP'
Usage: ./launch.sh compare [--preset P] [--data D] [--variants V1,V2,...] [--steps N] [--seeds S1,S2,...]
                           [--run-dir R] [other trainer.compare options]

Run the paper's comparison with any preset: every variant with the same seeds, data order and hyperparameters.
--data D is a folder holding train/ and test/ (or val/) shard folders as `python -m data_pipeline.convert`
writes them (default: the demo's easy-VQA shards, converted on first use); --train-data/--val-data name them
separately instead. Output (default runs/compare-PRESET): report.md, results.json, loss_curves.png.
Runs go side by side (--jobs, default auto: one per --gpus-per-run GPUs, else one per --threads-per-run cores);
--only V --seeds S runs one cell of a study (one node of a cluster), --report-only gathers the report afterwards.
HELP
        "$PY" -m trainer.compare --help 2>/dev/null | sed -n '/^options:/,$p' || true
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
    run "$PY" -m trainer.compare --preset "$preset" --run-dir "${run_dir:-$ROOT/runs/compare-$preset}" \
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
        "$PY" -m trainer.weights --help 2>/dev/null | sed -n '/^options:/,$p' || true
        return 0
    fi
    cmd_setup
    run "$PY" -m trainer.weights "$@"
}

cmd_train() {
    local -a given_args=("$@")  # for the command that continues a run stopped by a signal
    local num_gpus="" hostfile="" num_nodes="" master_addr="" master_port="" node_rank="" ssh_port="" no_ssh=0
    local preflight=0
    local -a env_names=()
    while [[ $# -gt 0 ]]; do
        case "$1" in  # --option=value as --option value
            --num_gpus=*|--hostfile=*|--num_nodes=*|--master_addr=*|--master_port=*|--node_rank=*|--ssh_port=*|--env=*)
                set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
        esac
        case "$1" in
            --help|-h) train_usage; return 0 ;;
            --no_ssh) no_ssh=1; shift; continue ;;
            --preflight) preflight=1; shift; continue ;;
            --) shift; break ;;
            --num_gpus|--hostfile|--num_nodes|--master_addr|--master_port|--node_rank|--ssh_port|--env)
                [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "train: $1 needs a value (see ./launch.sh train --help)" ;;
            *) break ;;
        esac
        case "$1" in
            --num_gpus) num_gpus="$2" ;;
            --hostfile) hostfile="$2" ;;
            --num_nodes) num_nodes="$2" ;;
            --master_addr) master_addr="$2" ;;
            --master_port) master_port="$2" ;;
            --node_rank) node_rank="$2" ;;
            --ssh_port) ssh_port="$2" ;;
            --env)
                [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "train: --env takes NAME=VALUE, got '$2'"
                env_names+=("${2%%=*}")
                export "${2?}" ;;
        esac
        shift 2
    done
    local -a trainer_args=("$@")

    # Numbers first, so that every later message can rely on them.
    if [[ -n "$num_gpus" ]] && ! { is_uint "$num_gpus" && (( 10#$num_gpus >= 1 )); }; then
        die "train: --num_gpus must be a whole number of at least 1, got '$num_gpus'"
    fi
    if [[ -n "$num_nodes" ]] && ! { is_uint "$num_nodes" && (( 10#$num_nodes >= 1 )); }; then
        die "train: --num_nodes must be a whole number of at least 1, got '$num_nodes'"
    fi
    if [[ -n "$node_rank" ]] && ! is_uint "$node_rank"; then
        die "train: --node_rank must be a whole number (0 for the first node), got '$node_rank'"
    fi
    local port
    for port in "$master_port" "$ssh_port"; do
        if [[ -n "$port" ]] && ! { is_uint "$port" && (( 10#$port >= 1 && 10#$port <= 65535 )); }; then
            die "train: a port must be a number from 1 to 65535, got '$port'"
        fi
    done

    # How many nodes, and is this an ssh launch from node 0?
    local nodes=1 over_ssh=0
    if [[ -n "$hostfile" ]]; then
        read_hostfile "$hostfile"
        # Absolute, since DeepSpeed runs from the repository root (and takes a hostfile it cannot find for "no
        # hostfile": one node, silently).
        hostfile="$(cd "$(dirname "$hostfile")" && pwd)/$(basename "$hostfile")"
        nodes=${#HOSTFILE_HOSTS[@]}
        if [[ -n "$num_nodes" ]]; then
            (( 10#$num_nodes <= nodes )) || die "train: --num_nodes $num_nodes, but hostfile '$hostfile' lists only $nodes node(s)"
            nodes=$((10#$num_nodes))
        fi
    elif [[ -n "$num_nodes" ]]; then
        (( no_ssh )) || die "train: --num_nodes needs --hostfile (several nodes over ssh) or --no_ssh (one node of several)"
        nodes=$((10#$num_nodes))
    fi
    if (( no_ssh )); then
        [[ -n "$hostfile" || -n "$num_nodes" ]] || die "train: --no_ssh needs the nodes: --num_nodes K (K alike nodes) or --hostfile FILE (the same file on every node)"
        [[ -n "$master_addr" ]] || die "train: --no_ssh needs --master_addr, the address of node 0 that every node can reach"
        [[ -n "$node_rank" ]] || die "train: --no_ssh needs --node_rank, this node's rank from 0 to $((nodes - 1))"
        (( 10#$node_rank < nodes )) || die "train: --node_rank $node_rank is out of range: $nodes node(s), so 0 to $((nodes - 1))"
        [[ -z "$ssh_port" ]] || die "train: --ssh_port means nothing with --no_ssh"
    else
        [[ -z "$node_rank" ]] || die "train: --node_rank goes with --no_ssh (over ssh DeepSpeed numbers the nodes itself)"
        [[ -n "$hostfile" || -z "$ssh_port" ]] || die "train: --ssh_port goes with --hostfile (several nodes over ssh)"
        if [[ -n "$hostfile" ]] && (( nodes > 1 )); then over_ssh=1; fi
    fi
    if (( over_ssh )) && [[ "$DRY_RUN" != 1 ]] && ! command -v pdsh >/dev/null 2>&1; then
        die "train: several nodes over ssh need pdsh, DeepSpeed's launcher (apt-get install pdsh), or run --no_ssh on every node"
    fi

    # The rendezvous port. On one node, the first free one from DeepSpeed's default upward: a second job on the host
    # would otherwise die on the first one's port (EADDRINUSE), and its other ranks could join the first job's
    # rendezvous. Several nodes must agree on the port, so it is never changed there; a default in use on the node
    # that hosts the rendezvous (node 0) is refused before anything starts, naming the way out.
    if [[ -z "$master_port" ]]; then
        local rendezvous_here=0
        if (( no_ssh )); then
            (( 10#$node_rank != 0 )) || rendezvous_here=1
        elif (( over_ssh )) && is_this_host "${master_addr:-${HOSTFILE_HOSTS[0]}}"; then
            rendezvous_here=1  # DeepSpeed's runner puts it on --master_addr, else on the hostfile's first host
        fi
        if (( no_ssh || over_ssh )); then
            if (( rendezvous_here )) && port_in_use "$DEFAULT_MASTER_PORT"; then
                die "train: port $DEFAULT_MASTER_PORT (DeepSpeed's default rendezvous port) is in use on this node, by another job; give every node the same free --master_port PORT"
            fi
        else
            master_port="$(first_free_port "$DEFAULT_MASTER_PORT")"
            note "rendezvous port $master_port (the first free one from $DEFAULT_MASTER_PORT; --master_port PORT to choose)"
        fi
    fi

    # The processes of every node get the same environment (see train_usage).
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    local -a env_lines=()
    mapfile -t env_lines < <(node_env_lines "${env_names[@]}")
    local line
    if (( over_ssh )); then
        # DeepSpeed's runner exports these on the other nodes in its pdsh command line, wrapping values in double
        # quotes: these characters would break it.
        for line in "${env_lines[@]}"; do
            [[ "$line" != *[\"\$\`\\]* ]] || die "train: cannot pass ${line%%=*} to the other nodes over ssh: its value holds a quote, \$, \` or backslash"
        done
    fi

    cmd_setup
    run cd "$ROOT"
    for line in "${env_lines[@]}"; do run export "$line"; done

    local ds_level
    ds_level="$(ds_log_level)"
    local -a launch=("$VENV/bin/deepspeed" --log_level "$ds_level")
    if [[ -n "$hostfile" ]]; then
        launch+=(--hostfile "$hostfile")
        [[ -z "$num_nodes" ]] || launch+=(--num_nodes "$num_nodes")
        [[ -z "$num_gpus" ]] || launch+=(--num_gpus "$num_gpus")
    else
        local gpus slots
        gpus="$(local_gpu_count)"
        if [[ -n "$num_gpus" ]]; then
            slots="$num_gpus"
        elif (( gpus > 0 )); then
            slots="$gpus"
        else
            slots=1
            note "no GPU found (nvidia-smi): launching one CPU process (--num_gpus 1)"
            # Told, DeepSpeed does not warn in every process that it could not detect an accelerator.
            export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
        fi
        if (( no_ssh )); then
            # DeepSpeed needs the list of nodes even when it launches only this one: K alike nodes.
            make_launch_dir
            local -a host_lines=()
            local i
            for ((i = 0; i < nodes; i++)); do host_lines+=("node-$i slots=$slots"); done
            write_lines "$LAUNCH_DIR/hostfile" "${host_lines[@]}"
            launch+=(--hostfile "$LAUNCH_DIR/hostfile")
        elif [[ -z "$num_gpus" && "$gpus" -gt 0 && -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
            note "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES: DeepSpeed launches one process per GPU listed there"
        else
            launch+=(--num_gpus "$slots")
        fi
    fi
    if (( no_ssh )); then
        launch+=(--no_ssh --node_rank "$node_rank")
    fi
    [[ -z "$master_addr" ]] || launch+=(--master_addr "$master_addr")
    [[ -z "$master_port" ]] || launch+=(--master_port "$master_port")
    [[ -z "$ssh_port" ]] || launch+=(--ssh_port "$ssh_port")

    if (( over_ssh )); then
        make_launch_dir
        local -a file_lines=()
        mapfile -t file_lines < <(user_deepspeed_env_lines)
        write_lines "$LAUNCH_DIR/deepspeed_env" "${file_lines[@]}" "${env_lines[@]}"
        run export "DS_ENV_FILE=$LAUNCH_DIR/deepspeed_env"
    fi

    local -a defaults=()
    if [[ -n "${VQA_TRAIN_DATA:-}" ]] && ! has_option --train-data "${trainer_args[@]}"; then
        defaults+=(--train-data "$VQA_TRAIN_DATA")
    fi
    if [[ -n "${VQA_VAL_DATA:-}" ]] && ! has_option --val-data "${trainer_args[@]}"; then
        defaults+=(--val-data "$VQA_VAL_DATA")
    fi
    if [[ -n "${VQA_RUN_DIR:-}" ]] && ! has_option --run-dir "${trainer_args[@]}"; then
        defaults+=(--run-dir "$VQA_RUN_DIR")
    fi

    local target=launcher
    if (( over_ssh )); then target=runner; fi
    # The preflight runs as a module (as `python -m`), from the repository root like the trainer.
    local -a program=(trainer/main.py)
    if (( preflight )); then program=(--module trainer.preflight); fi
    local rc=0
    run_passing_sigterm "$target" "${launch[@]}" "${program[@]}" "${defaults[@]}" "${trainer_args[@]}" || rc=$?
    if [[ -n "${TRAIN_STOP_SIGNAL:-}" ]] && (( ! preflight )); then
        stopped_note "$TRAIN_STOP_SIGNAL" "$(trainer_run_dir "${defaults[@]}" "${trainer_args[@]}")" "${given_args[@]}"
    fi
    return "$rc"
}

# ---------------------------------------------------------------------------------------------------------------

cmd_tensorboard() {
    local logdir="${VQA_RUNS_DIR:-$ROOT/runs}" host="127.0.0.1" port="6006"
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --logdir=*|--host=*|--port=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
        esac
        case "$1" in
            --help|-h)
                cat <<'USAGE'
Usage: ./launch.sh tensorboard [--logdir DIR] [--host HOST] [--port PORT] [--] [TENSORBOARD ARGS...]

Serve TensorBoard for every run under DIR (default: $VQA_RUNS_DIR, else runs/ in the repository), which the
trainer fills from rank 0 (train/..., val/... tags).
  --logdir DIR   the folder of run folders
  --host HOST    address to listen on (default 127.0.0.1: this machine only; from elsewhere, tunnel with
                 ssh -L 6006:127.0.0.1:6006 NODE). Inside a container use 0.0.0.0 and let the published
                 port decide who can reach it (docker/compose.yaml publishes it on 127.0.0.1).
  --port PORT    default 6006
Other arguments go to tensorboard unchanged.
USAGE
                return 0 ;;
            --logdir|--host|--port)
                [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "tensorboard: $1 needs a value (see ./launch.sh tensorboard --help)"
                case "$1" in
                    --logdir) logdir="$2" ;;
                    --host) host="$2" ;;
                    --port) port="$2" ;;
                esac
                shift 2 ;;
            --) shift; break ;;
            *) break ;;
        esac
    done
    { is_uint "$port" && (( 10#$port >= 1 && 10#$port <= 65535 )); } || die "tensorboard: --port must be a number from 1 to 65535, got '$port'"
    [[ -d "$logdir" ]] || die "tensorboard: log folder '$logdir' does not exist (train first, or give --logdir)"
    cmd_setup
    run "$VENV/bin/tensorboard" --logdir "$logdir" --host "$host" --port "$port" "$@"
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
