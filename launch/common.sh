# shellcheck shell=bash
# The ONE definition of the training command, sourced by launch/orpo.sbatch, launch/deepspeed.sh and
# launch/smoke_1gpu.sh. Each launcher only decides what goes in front of it (srun, torchrun, deepspeed).
#
# Environment (all optional):
#   CONFIG       YAML run config passed as --config (default: configs/demo.yaml; CONFIG= passes none)
#   OVERRIDES    dotted key=value overrides, e.g. OVERRIDES="train.lr=1e-5 loss.beta=0.2". The string is
#                split on whitespace (spaces, tabs, newlines) into separate arguments, and nothing else:
#                no globbing, no quotes, no $-expansion, no eval. A value cannot contain whitespace.
#   OUTPUT_DIR   when set, adds train.output_dir=$OUTPUT_DIR before OVERRIDES (so OVERRIDES still win)
#   PYTHON       interpreter (default: $VIRTUAL_ENV/bin/python, else <repo>/.venv/bin/python, else python3)
#   DRY_RUN=1    print the commands (one per line, shell-quoted with printf %q) instead of running them
#
# After sourcing: ORPO_REPO (repo root) and PYTHON are set; `orpo_build_command` then fills the arrays
# ORPO_ARGS (the `orpo_ds train ...` part, for launchers that take a module: deepspeed --module,
# torchrun -m) and ORPO_CMD ($PYTHON -m + ORPO_ARGS).
# `orpo_require_numbers NAME...` exits 2 when a numeric variable holds anything but a plain number.

ORPO_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
        PYTHON="$VIRTUAL_ENV/bin/python"
    elif [[ -x "$ORPO_REPO/.venv/bin/python" ]]; then
        PYTHON="$ORPO_REPO/.venv/bin/python"
    else
        PYTHON=python3
    fi
fi

# The package is importable from the repo without an install (python -m orpo_ds resolves it there too).
export PYTHONPATH="$ORPO_REPO${PYTHONPATH:+:$PYTHONPATH}"
# DeepSpeed JIT-builds its ops (the CPU shm op) once into this folder and reuses the build afterwards.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ORPO_REPO/.cache/torch_extensions}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

# orpo_require_numbers NAME...: exit 2, naming the variable, unless each named variable is unset, empty
# (the script's default) or a decimal number: digits only, no leading zero (bash would read 08 as octal).
# Each launcher calls it first, on every variable it uses in bash arithmetic or hands on as a count or a
# port: $(( )), (( )) and [[ -gt ]] evaluate a value such as 'a[$(cmd)]' as an expression and run cmd.
orpo_require_numbers() {
    local name
    for name in "$@"; do
        if [[ -n "${!name:-}" && ! "${!name}" =~ ^(0|[1-9][0-9]*)$ ]]; then
            printf '%s: %s=%q is not a decimal number\n' "${0##*/}" "$name" "${!name}" >&2
            exit 2
        fi
    done
}

# orpo_split_words STRING: print nothing, fill the global array ORPO_WORDS with STRING's
# whitespace-separated words. `read -a` does no globbing and no expansion of any kind.
orpo_split_words() {
    ORPO_WORDS=()
    IFS=$' \t\n' read -r -d '' -a ORPO_WORDS <<<"${1:-}" || true
}

# orpo_build_command [KEY=VALUE...]: fill ORPO_ARGS and ORPO_CMD. The arguments (a launcher's own
# overrides, e.g. the smoke run's model path) go before OUTPUT_DIR and OVERRIDES, so the user's win.
orpo_build_command() {
    local config="${CONFIG-configs/demo.yaml}"
    ORPO_ARGS=(orpo_ds train)
    [[ -n "$config" ]] && ORPO_ARGS+=(--config "$config")
    ORPO_ARGS+=("$@")
    [[ -n "${OUTPUT_DIR:-}" ]] && ORPO_ARGS+=("train.output_dir=$OUTPUT_DIR")
    orpo_split_words "${OVERRIDES:-}"
    ORPO_ARGS+=("${ORPO_WORDS[@]}")
    # shellcheck disable=SC2034  # used by the scripts that source this file
    ORPO_CMD=("$PYTHON" -m "${ORPO_ARGS[@]}")
}

# orpo_print_cmd ARGV...: one shell-quoted line that, pasted into bash, runs exactly ARGV.
orpo_print_cmd() {
    local first=1 word
    for word in "$@"; do
        ((first)) || printf ' '
        printf '%q' "$word"
        first=0
    done
    printf '\n'
}

orpo_dry_run() { [[ "${DRY_RUN:-0}" != 0 && -n "${DRY_RUN:-}" ]]; }

# orpo_run ARGV...: run ARGV, or print it under DRY_RUN=1. Returns ARGV's exit code.
orpo_run() {
    if orpo_dry_run; then
        orpo_print_cmd "$@"
        return 0
    fi
    "$@"
}
