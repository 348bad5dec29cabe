#!/usr/bin/env bash
# A short ORPO run on one GPU (or, without one, one CPU process with DS_ACCELERATOR=cpu) that checks the
# stack end to end: the loss falls (mean of the first 3 logged steps vs the last 3), throughput
# (tokens_per_s) and peak memory are printed, and <out>/final reloads with
# AutoModelForCausalLM.from_pretrained. Ends with `PASS` (exit 0) or `FAIL: reason` (exit 1, or the
# trainer's exit code when training itself failed).
#
#   launch/smoke_1gpu.sh                                  # tiny random model + synthetic pairs, made here
#   MODEL=assets/smollm2-135m-instruct STEPS=30 launch/smoke_1gpu.sh
#
# Environment (all optional):
#   MODEL       model folder (default: a tiny random Llama written by launch/make_tiny_model.py)
#   DATA        preference pairs (default: synthetic jsonl written by launch/make_tiny_model.py)
#   STEPS       optimizer steps (default 40)
#   LR          learning rate (default 1e-3 for the tiny model, 2e-5 for MODEL)
#   MAX_LENGTH  data.max_length (default 64 for the tiny model, 256 for MODEL); micro_batch_tokens = 8x
#   SMOKE_DIR   work folder (default: a new folder under ${TMPDIR:-/tmp}); the run goes to $SMOKE_DIR/run
#   DS_CONFIG   DeepSpeed JSON (default ds_configs/zero3.json)
#   CONFIG      YAML config (default: none; everything the smoke run needs comes as overrides)
#   OVERRIDES, OUTPUT_DIR, PYTHON, DRY_RUN=1   as in launch/common.sh (OVERRIDES win over the above)
# MAX_LENGTH must be a decimal number: anything else exits 2.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG="${CONFIG-}"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"
orpo_require_numbers MAX_LENGTH

if [[ -z "${DS_ACCELERATOR:-}" ]] && ! { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }; then
    export DS_ACCELERATOR=cpu   # no GPU: DeepSpeed's CPU accelerator and gloo, still one process
fi

if orpo_dry_run; then
    SMOKE_DIR="${SMOKE_DIR:-${TMPDIR:-/tmp}/orpo-smoke-XXXXXX}"
else
    SMOKE_DIR="${SMOKE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/orpo-smoke-XXXXXX")}"
    mkdir -p "$SMOKE_DIR"
fi
RUN_DIR="${OUTPUT_DIR:-$SMOKE_DIR/run}"
STEPS="${STEPS:-40}"
MAKE=("$PYTHON" "$HERE/make_tiny_model.py")
if [[ -z "${MODEL:-}" ]]; then
    MODEL="$SMOKE_DIR/tiny-model"
    MAKE+=(--model "$MODEL")
    LR="${LR:-1e-3}"
    MAX_LENGTH="${MAX_LENGTH:-64}"
else
    LR="${LR:-2e-5}"
    MAX_LENGTH="${MAX_LENGTH:-256}"
fi
if [[ -z "${DATA:-}" ]]; then
    DATA="$SMOKE_DIR/pairs.jsonl"
    MAKE+=(--pairs "$DATA" --num-pairs 128)
fi

orpo_build_command "model.name_or_path=$MODEL" "data.train=$DATA" "data.max_length=$MAX_LENGTH" \
    "data.cache_dir=$SMOKE_DIR/tok-cache" "train.micro_batch_tokens=$((8 * MAX_LENGTH))" \
    "train.max_steps=$STEPS" "train.epochs=1000" "train.lr=$LR" "train.lr_schedule=constant" \
    "train.warmup_steps=0" "train.save_steps=0" "train.keep_checkpoints=1" "train.eval_before=false" \
    "train.output_dir=$RUN_DIR" "deepspeed.config=${DS_CONFIG:-$ORPO_REPO/ds_configs/zero3.json}"
# The shared command, run in-process by smoke_check.py so it can read torch.cuda.max_memory_allocated()
# (and the peak RSS) of the training process afterwards.
REPORT="$SMOKE_DIR/memory.json"
TRAIN=("$PYTHON" "$HERE/smoke_check.py" run --report "$REPORT" -- "${ORPO_ARGS[@]}")
VERIFY=("$PYTHON" "$HERE/smoke_check.py" verify --run "$RUN_DIR" --report "$REPORT")

if orpo_dry_run; then
    ((${#MAKE[@]} > 2)) && orpo_print_cmd "${MAKE[@]}"
    orpo_print_cmd "${TRAIN[@]}"
    orpo_print_cmd "${VERIFY[@]}"
    exit 0
fi

echo "[smoke] work folder $SMOKE_DIR; accelerator ${DS_ACCELERATOR:-auto}"
if ((${#MAKE[@]} > 2)); then
    "${MAKE[@]}" || { echo "FAIL: could not make the tiny model / pairs"; exit 1; }
fi
# A leftover run in RUN_DIR would be resumed (train.resume=auto) and skew the loss check.
if [[ -e "$RUN_DIR" ]] && [[ -n "$(ls -A "$RUN_DIR" 2>/dev/null)" ]]; then
    echo "FAIL: $RUN_DIR is not empty; remove it or set OUTPUT_DIR / SMOKE_DIR to a new folder"
    exit 1
fi
echo "[smoke] $(orpo_print_cmd "${TRAIN[@]}")"
"${TRAIN[@]}"
rc=$?
if ((rc != 0)); then
    echo "FAIL: training exited with code $rc"
    exit "$rc"
fi
"${VERIFY[@]}"
