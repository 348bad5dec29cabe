#!/usr/bin/env bash
# ORPO training under the `deepspeed` launcher: all GPUs of this node, or the nodes of a hostfile.
#
#   launch/deepspeed.sh                                        # this node, every GPU it has
#   GPUS_PER_NODE=2 DS_ACCELERATOR=cpu launch/deepspeed.sh     # 2 CPU ranks (gloo), no GPU needed
#
# One rank on one node (no HOSTFILE, GPUS_PER_NODE=1) runs `$PYTHON -m orpo_ds train ...` itself, without the
# launcher: the launcher would only start that one process, behind its own runner and launch processes
# (~480 MB of resident memory and ~10 s here, benchmarks/RESULTS.md). The trainer then makes its world of one
# (orpo_ds/distributed.py init_distributed); preemption, resume and exit codes are the same.
#   HOSTFILE=hosts.txt launch/deepspeed.sh                     # lines "host slots=8"; pdsh/ssh to each
#
# Environment (all optional):
#   CONFIG, OVERRIDES, OUTPUT_DIR, PYTHON, DRY_RUN=1   the training command, see launch/common.sh
#   GPUS_PER_NODE   ranks on this node (default: the GPUs nvidia-smi lists, else 1; on CPU, CPU ranks).
#                   Not used with HOSTFILE, whose slots= say how many ranks each host runs.
#   HOSTFILE        DeepSpeed hostfile: multi-node. The launcher reaches the hosts with pdsh (or
#                   DS_MULTINODE_LAUNCHER=openmpi|mvapich|...) and forwards only the variables listed in
#                   ./.deepspeed_env (NAME=value lines; put DS_ACCELERATOR etc. there) and a few prefixes.
#   NUM_NODES       use only the first N hosts of HOSTFILE
#   MASTER_ADDR     default: 127.0.0.1 on one node; the first host of HOSTFILE otherwise
#   MASTER_PORT     default 29500; one rank without a launcher: a free port unless set
#   DEEPSPEED       the launcher executable (default: deepspeed next to $PYTHON, else `deepspeed`)
# GPUS_PER_NODE, NUM_NODES and MASTER_PORT must be decimal numbers: anything else exits 2.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$HERE/common.sh"
orpo_require_numbers GPUS_PER_NODE NUM_NODES MASTER_PORT
# shellcheck disable=SC2119  # no leading overrides of its own
orpo_build_command

if [[ -z "${DEEPSPEED:-}" ]]; then
    if [[ -x "$(dirname "$PYTHON")/deepspeed" ]]; then
        DEEPSPEED="$(dirname "$PYTHON")/deepspeed"
    else
        DEEPSPEED=deepspeed
    fi
fi

LAUNCH=("$DEEPSPEED")
if [[ -n "${HOSTFILE:-}" ]]; then
    if [[ ! -f "$HOSTFILE" ]] && ! orpo_dry_run; then
        echo "deepspeed.sh: HOSTFILE=$HOSTFILE does not exist" >&2
        exit 2
    fi
    if [[ -z "${MASTER_ADDR:-}" && -f "$HOSTFILE" ]]; then
        MASTER_ADDR=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
    fi
    LAUNCH+=(--hostfile "$HOSTFILE" --launcher "${DS_MULTINODE_LAUNCHER:-pdsh}")
    [[ -n "${NUM_NODES:-}" ]] && LAUNCH+=(--num_nodes "$NUM_NODES")
    [[ -n "${MASTER_ADDR:-}" ]] && LAUNCH+=(--master_addr "$MASTER_ADDR")
else
    if [[ -z "${GPUS_PER_NODE:-}" ]]; then
        if [[ "${DS_ACCELERATOR:-}" != cpu ]] && command -v nvidia-smi >/dev/null \
            && GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') && ((GPUS_PER_NODE > 0)); then
            :
        else
            GPUS_PER_NODE=1
        fi
    fi
    if ((GPUS_PER_NODE == 1)); then
        orpo_run "${ORPO_CMD[@]}"
        exit
    fi
    LAUNCH+=(--num_gpus "$GPUS_PER_NODE" --master_addr "${MASTER_ADDR:-127.0.0.1}")
fi
LAUNCH+=(--master_port "${MASTER_PORT:-29500}" --module "${ORPO_ARGS[@]}")

# The launcher's own exit code is the first failing rank's; 75 means "preempted, checkpoint saved":
# run the same command again to resume (train.resume=auto).
orpo_run "${LAUNCH[@]}"
