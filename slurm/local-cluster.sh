#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying the SLURM backend and for CI.
#
# Usage: sudo slurm/local-cluster.sh install|start|stop|status|restart [--help]
#
#   install  apt-get install Debian's slurmctld, slurmd, slurm-client and munge (apt-get update once)
#   start    install if needed, create the munge key, start munged, write /etc/slurm/slurm.conf for
#            this machine (real hostname, CPU topology from `slurmd -C`, RealMemory a bit below
#            MemTotal), start slurmctld and slurmd, and wait until `sinfo` shows the node idle
#   stop     stop slurmd, slurmctld and the munged this script started
#   status   print the daemons' state, `sinfo` and `squeue`; exit 1 when the cluster is not up
#   restart  stop then start
#
# Needs root and Debian 12 (SLURM 22.05). Idempotent: `start` on a running cluster with the same
# configuration returns at once. The cluster has no accounting (sacct fails; galaxygen does not need
# it), one partition "debug" (default, no time limit), DefMemPerCPU so several small jobs share the
# node, JobRequeue=1 and a short requeue delay (AuthInfo=cred_expire) so submitit's
# checkpoint-and-requeue restarts a job within seconds, and KillWait=5 so cancelled jobs leave quickly.
#
# Environment: GALAXYGEN_SLURM_PARTITION (default debug),
# GALAXYGEN_SLURM_TIMEOUT (seconds to wait for the node, default 90). Logs: /var/log/slurm/.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
PARTITION=${GALAXYGEN_SLURM_PARTITION:-debug}
WAIT_S=${GALAXYGEN_SLURM_TIMEOUT:-90}
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/galaxygen-local-cluster
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
PACKAGES=(slurmctld slurmd slurm-client munge)

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# //' -e 's/^#$//'; }
log() { echo "local-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (try: sudo $0 $1)"; }

installed() {
    local p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || return 1
    done
}

cmd_install() {
    need_root install
    if installed; then
        log "packages already installed: ${PACKAGES[*]}"
        return 0
    fi
    command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian/Ubuntu only"
    log "installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Package scripts may try to start services with a missing slurm.conf; that failure is harmless.
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    mkdir -p "$RUN_DIR"
    touch "$RUN_DIR/munged.started"
    for _ in $(seq 1 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

node_line() {
    # `slurmd -C` prints the real topology: NodeName=h CPUs=.. Boards=.. ... RealMemory=..
    local line mem_kb real_mb
    line=$(slurmd -C | head -n1)
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    real_mb=$(( mem_kb * 95 / 100 / 1024 ))
    line=$(sed -E "s/ ?RealMemory=[0-9]+//; s/^NodeName=[^ ]+ //" <<<"$line")
    echo "NodeName=$HOST NodeAddr=127.0.0.1 $line RealMemory=$real_mb State=UNKNOWN"
}

write_conf() {
    local node cpus real_mb def_mem
    node=$(node_line)
    cpus=$(sed -E 's/.*CPUs=([0-9]+).*/\1/' <<<"$node")
    real_mb=$(sed -E 's/.*RealMemory=([0-9]+).*/\1/' <<<"$node")
    # Half the node's memory shared out over its CPUs: several 1-CPU jobs fit side by side, and a
    # job asking --mem explicitly still finds room.
    def_mem=$(( real_mb / cpus / 2 ))
    mkdir -p "$CONF_DIR"
    cat >"$CONF.new" <<EOF
# Written by galaxygen slurm/local-cluster.sh: a single-node cluster on $HOST.
ClusterName=galaxygen-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again after cred_expire seconds (default 120).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
DefMemPerCPU=$def_mem
$node
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $CONF ]] && cmp -s "$CONF" "$CONF.new"; then
        rm -f "$CONF.new"
        return 1 # unchanged
    fi
    mv "$CONF.new" "$CONF"
    log "wrote $CONF ($node, DefMemPerCPU=$def_mem)"
    return 0
}

node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1; }

wait_idle() {
    local state=""
    for _ in $(seq 1 $(( WAIT_S * 2 ))); do
        state=$(node_state || true)
        case $state in
            idle|mixed|allocated|completing) log "node $HOST is $state"; return 0 ;;
            drain*|down*)
                scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    log "node state: ${state:-unknown}; last log lines:"
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    die "the node did not become idle within ${WAIT_S}s"
}

cmd_start() {
    need_root start
    installed || cmd_install
    HOST=$(hostname -s)
    install -d -m 0755 "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
    start_munge
    local changed=0
    write_conf && changed=1
    if [[ $changed -eq 0 ]] && alive "$CTLD_PID" && alive "$SLURMD_PID"; then
        wait_idle
        return 0
    fi
    if [[ $changed -eq 1 ]]; then
        stop_slurm
    fi
    if ! alive "$CTLD_PID"; then
        log "starting slurmctld"
        # -i: ignore state files from an older configuration of this node
        slurmctld -i
    fi
    if ! alive "$SLURMD_PID"; then
        log "starting slurmd"
        slurmd
    fi
    wait_idle
}

stop_pidfile() {
    local pidfile=$1 name=$2 pid
    alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    log "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
}

stop_slurm() {
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
}

cmd_stop() {
    need_root stop
    stop_slurm
    if [[ -f $RUN_DIR/munged.started ]]; then
        stop_pidfile "$MUNGE_PID" munged
        rm -f "$RUN_DIR/munged.started"
    fi
    log "stopped"
}

cmd_status() {
    local ok=0
    local name pidfile
    for name in slurmctld slurmd; do
        pidfile=/run/$name.pid
        if alive "$pidfile"; then
            echo "$name: running (pid $(cat "$pidfile"))"
        else
            echo "$name: stopped"
            ok=1
        fi
    done
    if [[ $ok -eq 0 ]]; then
        sinfo -N -l || ok=1
        squeue || ok=1
    fi
    return $ok
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status) cmd_status ;;
    -h|--help|help) usage ;;
    "") usage >&2; exit 2 ;;
    *) log "unknown command '$1': allowed install, start, stop, status, restart"; exit 2 ;;
esac
