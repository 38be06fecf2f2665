#!/usr/bin/env bash
# One entry point for users, CI and the Docker image: set-up, tests, the demo, training and tools.
# Every subcommand sets up what it needs (the virtual environment in .venv) before it runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VQA_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
DRY_RUN=0

usage() {
    cat <<'USAGE'
Usage: ./launch.sh [--dry-run] COMMAND [ARGS...]

Commands:
  setup        create or update the virtual environment .venv from pyproject.toml (idempotent)
  test         set up, then run the whole test suite (ruff + pytest); extra ARGS go to pytest
  help         this message

Options:
  --dry-run    print the commands that would run instead of running them

Run './launch.sh COMMAND --help' for the options of one command.
USAGE
}

die() { echo "launch.sh: error: $*" >&2; exit 2; }

run() {
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '%q ' "$@"; echo
    else
        "$@"
    fi
}

# Cheap fingerprint of everything that decides what is installed: re-install only when it changes.
setup_stamp() { cat "$ROOT/pyproject.toml" "$ROOT/launch.sh" | sha256sum | cut -d' ' -f1; }

cmd_setup() {
    if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
        echo "Usage: ./launch.sh setup"
        echo "Create .venv (Python 3.11) and install the project with its pinned dependencies from pyproject.toml."
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
    echo "launch.sh: installing pinned dependencies into $VENV (first time: several minutes)" >&2
    # torch first: DeepSpeed's setup.py looks for it, and pip must take the pinned build, not a newer CUDA one.
    run "$PY" -m pip install --quiet --upgrade "pip>=24" setuptools wheel
    run "$PY" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
    # DS_BUILD_OPS=0: no CUDA ops at install time here (the Docker image pre-builds fused Adam itself).
    DS_BUILD_OPS=0 run "$PY" -m pip install --quiet -e "$ROOT[dev]"
    [[ "$DRY_RUN" == 1 ]] || echo "$stamp" > "$VENV/.setup-stamp"
}

cmd_test() {
    if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
        echo "Usage: ./launch.sh test [PYTEST_ARGS...]"
        echo "Set up .venv, check formatting and lint with ruff, then run the whole test suite with pytest."
        return 0
    fi
    cmd_setup
    cd "$ROOT"
    run "$VENV/bin/ruff" format --check .
    run "$VENV/bin/ruff" check .
    run "$PY" -m pytest "$@"
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
        help) usage ;;
        *) die "unknown command '$cmd' (one of: setup, test, help; see ./launch.sh --help)" ;;
    esac
}

main "$@"
