#!/usr/bin/env bash
# A real 2-node SLURM cluster on this one host, for tests: Debian's slurmctld + two slurmd (-N n1, -N n2)
# + munge, no systemd, no accounting.
#
#   tests/slurm/cluster.sh up       install (if missing), configure, start, wait until both nodes are idle
#   tests/slurm/cluster.sh status   print sinfo and the SLURM_CONF to export
#   tests/slurm/cluster.sh down     stop what `up` started (by pid file) and remove the state dir
#   tests/slurm/cluster.sh env      print `export SLURM_CONF=...` (eval it in a shell to use sbatch/squeue)
#
# Environment: ORPO_SLURM_DIR (state dir, default /tmp/orpo-ds-slurm), ORPO_SLURM_PORT (base port,
# default 16817: slurmctld on it, slurmd n1/n2 on +1/+2), ORPO_SLURM_CPUS (CPUs per node, default: nproc).
# Clients find the cluster through SLURM_CONF=$ORPO_SLURM_DIR/slurm.conf; /etc/slurm is not touched.
# munged is a private instance too (its own key, socket and pid file under $ORPO_SLURM_DIR/munge, run as
# the munge user), so clusters of two test sessions never share or stop each other's munged.
# Exit codes: 0 ok, 1 failure, 3 SLURM cannot be installed on this machine (callers skip).
set -uo pipefail

DIR=${ORPO_SLURM_DIR:-/tmp/orpo-ds-slurm}
PORT=${ORPO_SLURM_PORT:-16817}
CPUS=${ORPO_SLURM_CPUS:-$(nproc)}
CONF="$DIR/slurm.conf"
HOST=$(hostname -s)
export SLURM_CONF="$CONF"
export PATH="/usr/sbin:/sbin:$PATH"
NODES=(n1 n2)

log() { printf 'cluster.sh: %s\n' "$*" >&2; }

alive() {  # alive PIDFILE: the process named by the pid file exists
    local pid
    [[ -s "$1" ]] || return 1
    pid=$(<"$1")
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

install_slurm() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    ((${#missing[@]} == 0)) && return 0
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
        log "SLURM is not installed (${missing[*]}) and apt-get cannot run here (needs root + Debian)"
        exit 3
    fi
    log "installing ${missing[*]} with apt-get"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >"/tmp/orpo-ds-slurm-apt.log" 2>&1; then
        # The package lists may be missing or stale: refresh them once.
        apt-get update -q >>"/tmp/orpo-ds-slurm-apt.log" 2>&1
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >>"/tmp/orpo-ds-slurm-apt.log" 2>&1; then
            log "apt-get could not install ${missing[*]} (see /tmp/orpo-ds-slurm-apt.log)"
            exit 3
        fi
    fi
}

write_conf() {
    mkdir -p "$DIR"/{state,spool,run,log}
    chmod 755 "$DIR"
    cat >"$CONF.tmp" <<CONF
# Written by tests/slurm/cluster.sh: two slurmd (n1, n2) on this host, state under $DIR.
ClusterName=orpods
SlurmctldHost=$HOST
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120): keep tests quick.
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Look at pending (e.g. just requeued) jobs every 2 s rather than every 30-60 s.
SchedulerParameters=bf_interval=2,sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# Keep finished jobs visible to scontrol a while (no accounting database here).
MinJobAge=600
KillWait=30
SlurmdTimeout=120
InactiveLimit=0
NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=$CPUS State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
    mv "$CONF.tmp" "$CONF"
}

start_munge() {
    # A private munged (own key, socket, pid file under $DIR/munge, running as the munge user), so this
    # cluster neither depends on nor disturbs a munged the machine or another test session runs.
    local m="$DIR/munge"
    if alive "$m/munged.pid"; then
        return 0
    fi
    install -d -o munge -g munge -m 0755 "$m"
    if [[ ! -s "$m/munge.key" ]]; then
        if command -v mungekey >/dev/null; then
            runuser -u munge -- mungekey --create --keyfile="$m/munge.key" || return 1
        else
            dd if=/dev/urandom of="$m/munge.key" bs=1 count=1024 status=none
            chown munge:munge "$m/munge.key"
        fi
        chmod 0400 "$m/munge.key"
    fi
    runuser -u munge -- munged --force --socket="$m/munge.socket" --key-file="$m/munge.key" \
        --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed" \
        || { log "munged failed to start"; cat "$m/munged.log" >&2 2>/dev/null; return 1; }
    for _ in $(seq 50); do alive "$m/munged.pid" && break; sleep 0.1; done
    alive "$m/munged.pid" || { log "munged did not write its pid file"; return 1; }
}

wait_idle() {
    local out
    for _ in $(seq 120); do
        out=$(sinfo -h -N -o '%N %t' 2>/dev/null)
        if [[ $(grep -cE '^n[12] idle$' <<<"$out") == 2 ]]; then
            return 0
        fi
        sleep 0.5
    done
    log "nodes not idle after 60 s:"
    sinfo -N -l >&2
    tail -n 20 "$DIR"/log/*.log >&2
    return 1
}

up() {
    install_slurm
    write_conf
    start_munge || exit 1
    if ! alive "$DIR/run/slurmctld.pid"; then
        slurmctld -f "$CONF" || { log "slurmctld failed"; tail -n 30 "$DIR/log/slurmctld.log" >&2; exit 1; }
    fi
    for n in "${NODES[@]}"; do
        mkdir -p "$DIR/spool/$n"
        if ! alive "$DIR/run/slurmd-$n.pid"; then
            slurmd -f "$CONF" -N "$n" || { log "slurmd -N $n failed"; tail -n 30 "$DIR/log/slurmd-$n.log" >&2; exit 1; }
        fi
    done
    # Pid files appear once the daemons have forked.
    for f in slurmctld slurmd-n1 slurmd-n2; do
        for _ in $(seq 100); do alive "$DIR/run/$f.pid" && break; sleep 0.1; done
        alive "$DIR/run/$f.pid" || { log "$f is not running"; tail -n 30 "$DIR"/log/*.log >&2; exit 1; }
    done
    # A node left DOWN/DRAIN by an earlier run comes back.
    scontrol update NodeName=n1,n2 State=RESUME >/dev/null 2>&1 || true
    wait_idle || exit 1
    log "up: 2 nodes idle; export SLURM_CONF=$CONF"
}

stop_pidfile() {  # stop_pidfile FILE NAME: TERM, wait up to 10 s, then KILL
    local pid
    alive "$1" || return 0
    pid=$(<"$1")
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    log "$2 ($pid) ignored TERM: killing"
    kill -KILL "$pid" 2>/dev/null
}

down() {
    if [[ -d "$DIR" ]]; then
        if alive "$DIR/run/slurmctld.pid"; then
            # Jobs still running end first, so no slurmstepd outlives its slurmd.
            scancel --quiet --partition=debug 2>/dev/null || true
            for _ in $(seq 60); do [[ -z "$(squeue -h -t R,CG,CF 2>/dev/null)" ]] && break; sleep 0.5; done
        fi
        for n in "${NODES[@]}"; do stop_pidfile "$DIR/run/slurmd-$n.pid" "slurmd $n"; done
        stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
        stop_pidfile "$DIR/munge/munged.pid" munged
        rm -rf "$DIR"
    fi
    log "down"
}

status() {
    if alive "$DIR/run/slurmctld.pid"; then
        sinfo -N -o '%N %t %c' 2>&1
        echo "export SLURM_CONF=$CONF"
    else
        echo "cluster.sh: not running (no slurmctld under $DIR)"
        return 1
    fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 64 ;;
esac
