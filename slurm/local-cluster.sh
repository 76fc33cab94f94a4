#!/usr/bin/env bash
# An N-node SLURM cluster on this one machine, for trying the SLURM backend and for CI.
#
# Usage: sudo slurm/local-cluster.sh install|start|stop|status|restart [--nodes N] [--help]
#
#   install  apt-get install Debian's slurmctld, slurmd, slurm-client and munge (apt-get update once)
#   start    install if needed, create the munge key, start munged, build the cluster network, write
#            /etc/slurm/slurm.conf, start slurmctld and one slurmd per node, and wait until `sinfo`
#            shows every node idle. --nodes N (default 1, at most 32) sets the number of nodes; a
#            running cluster with another N is reconfigured (its jobs are lost)
#   stop     stop the daemons and the jobs still running on the nodes, remove the cluster network and
#            the nodes' /etc/hosts lines, stop the munged this script started
#   status   print the daemons' state, `sinfo` and `squeue`; exit 1 when the cluster is not up
#   restart  stop then start
#
# The nodes node1..nodeN are real SLURM nodes that share this machine's CPUs, memory and file
# systems. Each lives in its own network namespace (galaxygen-nodeK) and UTS namespace (hostname
# nodeK), with one interface eth0 at 10.77.0.(K+1)/24 on a bridge (galaxygen-br) whose address
# 10.77.0.1 is this machine's; /etc/hosts names every node, so `nodeK` resolves to its address on
# every node and jobs talk to each other (e.g. DDP over gloo) over that network. slurmd -N nodeK
# runs in node K's namespaces, slurmctld in a network namespace of its own (galaxygen-ctld, eth0 at
# 10.77.0.254 on the same bridge); this machine's sbatch, squeue, ... reach it over the bridge.
#
# Where the daemons listen: SLURM has no bind-address setting, so slurmctld (port 6817) and slurmd
# (6818) listen on 0.0.0.0 - but each inside a namespace whose only interfaces are lo and its eth0
# on the bridge, so nothing of the cluster listens in this machine's own namespace, and the
# machine's other interfaces reach none of them. The namespaces have no route beyond 10.77.0.0/24,
# so even a packet forwarded in from elsewhere gets no answer. Namespaces rather than firewall
# rules: they need only the `ip` and `nsenter` the nodes already need (a fresh Debian has no
# firewall tool for certain), leave no rule behind when the script is killed, and `stop` removes
# them with the rest of the network. munged listens on a Unix socket only; there is no slurmdbd.
# (Debian's build has MULTIPLE_SLURMD, so per-node ports on one address would also work; separate
# addresses and host names are what a real cluster has, and they show a rank bound to loopback at once.)
# Every node advertises all of this machine's CPUs (topology from `slurmd -C`) and RealMemory a bit
# below MemTotal, so one job's shape does not depend on N.
#
# Needs root, `ip` (iproute2), `nsenter` and `unshare` (util-linux) and Debian 12 (SLURM 22.05). Idempotent: `start` on a
# running cluster with the same configuration returns at once. The cluster has no accounting (sacct
# fails; galaxygen does not need it), one partition "debug" with every node (default, no time
# limit), DefMemPerCPU so several small jobs share a node, JobRequeue=1 and a short requeue delay
# (AuthInfo=cred_expire) so submitit's checkpoint-and-requeue restarts a job within seconds, and
# KillWait=5 so cancelled jobs leave quickly.
#
# Environment: GALAXYGEN_SLURM_PARTITION (default debug),
# GALAXYGEN_SLURM_TIMEOUT (seconds to wait for the nodes, default 90). Logs: /var/log/slurm/.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
PARTITION=${GALAXYGEN_SLURM_PARTITION:-debug}
WAIT_S=${GALAXYGEN_SLURM_TIMEOUT:-90}
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_ROOT=/var/lib/slurm
LOG_DIR=/var/log/slurm
RUN_DIR=/run/galaxygen-local-cluster
CTLD_PID=/run/slurmctld.pid
MUNGE_PID=/run/munge/munged.pid
PACKAGES=(slurmctld slurmd slurm-client munge)
MAX_NODES=32
NET=10.77.0            # the cluster's /24: this machine .1, node K .(K+1), the controller .254
BRIDGE=galaxygen-br
NS_PREFIX=galaxygen-   # network namespace of node K: galaxygen-nodeK; of slurmctld: galaxygen-ctld
VETH_PREFIX=gg-        # its peer in this namespace: gg-nodeK, gg-ctld
CTLD=ctld              # the controller's name in the two prefixes above
CTLD_ADDR=$NET.254
HOSTS_BEGIN="# galaxygen local-cluster nodes (slurm/local-cluster.sh) begin"
HOSTS_END="# galaxygen local-cluster nodes end"
NODES=1

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# //' -e 's/^#$//'; }
log() { echo "local-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }
bad_input() { log "error: $*"; exit 2; }

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

# -- the node network --------------------------------------------------------------------------------

node_names() { local k; for k in $(seq 1 "$NODES"); do echo "node$k"; done; }
node_addr() { echo "$NET.$(( ${1#node} + 1 ))"; }
slurmd_pid() { echo "/run/slurmd-$1.pid"; }

# Namespaces of this script's nodes and controller that exist now (any N).
existing_namespaces() { ip netns list 2>/dev/null | awk -v p="$NS_PREFIX" 'index($1, p) == 1 {print $1}'; }

start_network() {
    local node
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
    fi
    ip addr replace "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    add_to_bridge "$CTLD" "$CTLD_ADDR"
    for node in $(node_names); do
        add_to_bridge "$node" "$(node_addr "$node")"
    done
    write_hosts
}

# Network namespace $NS_PREFIX$1 whose only interfaces are lo and eth0 at $2 on the bridge.
add_to_bridge() {
    local ns=$NS_PREFIX$1 veth=$VETH_PREFIX$1
    existing_namespaces | grep -qx "$ns" || ip netns add "$ns"
    if ! ip link show "$veth" >/dev/null 2>&1; then
        ip link add "$veth" type veth peer name eth0 netns "$ns"
    fi
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" addr replace "$2/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
}

write_hosts() {
    local node block
    block=$(for node in $(node_names); do printf '%s\t%s\n' "$(node_addr "$node")" "$node"; done)
    block=$(printf '%s\n%s\n%s' "$HOSTS_BEGIN" "$block" "$HOSTS_END")
    [[ $(hosts_block) == "$block" ]] && return 0
    remove_hosts
    printf '%s\n' "$block" >>/etc/hosts
}

hosts_block() { awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b {on = 1} on {print} $0 == e {on = 0}' /etc/hosts; }

remove_hosts() {
    # /etc/hosts may be a bind mount (containers): rewrite it in place, never replace the file
    local kept
    grep -qxF "$HOSTS_BEGIN" /etc/hosts || return 0
    kept=$(awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
}

stop_network() {
    local ns pid
    for ns in $(existing_namespaces); do
        # jobs still running on the node (slurmstepd and its tasks outlive slurmd)
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill -9 "$pid" 2>/dev/null || true
        done
        ip netns del "$ns"
        ip link del "$VETH_PREFIX${ns#"$NS_PREFIX"}" 2>/dev/null || true
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE"
    fi
    remove_hosts
}

# -- slurm.conf and the daemons --------------------------------------------------------------------------

node_shape() {
    # `slurmd -C` prints the real topology: NodeName=h CPUs=.. Boards=.. ... RealMemory=..
    local line mem_kb real_mb
    line=$(slurmd -C | head -n1)
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    real_mb=$(( mem_kb * 95 / 100 / 1024 ))
    line=$(sed -E "s/ ?RealMemory=[0-9]+//; s/^NodeName=[^ ]+ //" <<<"$line")
    echo "$line RealMemory=$real_mb"
}

write_conf() {
    local shape cpus real_mb def_mem node nodes_lines
    shape=$(node_shape)
    cpus=$(sed -E 's/.*CPUs=([0-9]+).*/\1/' <<<"$shape")
    real_mb=$(sed -E 's/.*RealMemory=([0-9]+).*/\1/' <<<"$shape")
    # Half a node's memory shared out over its CPUs: several 1-CPU jobs fit side by side, and a
    # job asking --mem explicitly still finds room.
    def_mem=$(( real_mb / cpus / 2 ))
    nodes_lines=$(for node in $(node_names); do
        echo "NodeName=$node NodeAddr=$(node_addr "$node") NodeHostname=$node $shape State=UNKNOWN"
    done)
    mkdir -p "$CONF_DIR"
    cat >"$CONF.new" <<EOF
# Written by galaxygen slurm/local-cluster.sh: $NODES node(s) on $HOST, each in its own network namespace,
# as is slurmctld (at $CTLD_ADDR).
ClusterName=galaxygen-local
SlurmctldHost=$HOST($CTLD_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again after cred_expire seconds (default 120).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_ROOT/slurmd-%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
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
$nodes_lines
PartitionName=$PARTITION Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $CONF ]] && cmp -s "$CONF" "$CONF.new"; then
        rm -f "$CONF.new"
        return 1 # unchanged
    fi
    mv "$CONF.new" "$CONF"
    log "wrote $CONF ($NODES node(s): $shape, DefMemPerCPU=$def_mem)"
    return 0
}

all_alive() {
    local node
    alive "$CTLD_PID" || return 1
    for node in $(node_names); do
        alive "$(slurmd_pid "$node")" || return 1
    done
}

start_slurmd() {
    local node=$1
    install -d -m 0755 "$SPOOL_ROOT/slurmd-$node"
    log "starting slurmd -N $node ($(node_addr "$node"))"
    # Its own network and UTS namespaces: the node's address, and `hostname` prints the node's name.
    # nsenter, not `ip netns exec`, which remounts /sys and so hides /sys/fs/cgroup from slurmd.
    nsenter --net="/run/netns/$NS_PREFIX$node" unshare --uts \
        sh -c 'hostname "$1" && exec slurmd -N "$1"' sh "$node"
}

wait_idle() {
    local states="" ready node
    for _ in $(seq 1 $(( WAIT_S * 2 ))); do
        states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)
        ready=$(awk '$2 ~ /^(idle|mixed|allocated|completing)/' <<<"$states" | wc -l)
        if [[ $ready -eq $NODES ]]; then
            log "$NODES node(s) up: $(tr '\n' ' ' <<<"$states")"
            return 0
        fi
        for node in $(awk '$2 ~ /^(drain|down)/ {print $1}' <<<"$states"); do
            scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
        done
        sleep 0.5
    done
    log "node states: ${states:-unknown}; last log lines:"
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR"/slurmd-node*.log >&2 || true
    die "not all $NODES node(s) became idle within ${WAIT_S}s"
}

cmd_start() {
    need_root start
    installed || cmd_install
    command -v ip >/dev/null || die "ip (iproute2) not found: apt-get install iproute2"
    command -v nsenter >/dev/null && command -v unshare >/dev/null || die "nsenter/unshare (util-linux) not found"
    HOST=$(hostname -s)
    install -d -m 0755 "$STATE_DIR" "$LOG_DIR"
    start_munge
    if write_conf; then
        stop_slurm
        stop_network
    elif all_alive; then
        wait_idle
        return 0
    fi
    start_network
    if ! alive "$CTLD_PID"; then
        log "starting slurmctld ($CTLD_ADDR)"
        # -i: ignore state files from an older configuration of the cluster
        nsenter --net="/run/netns/$NS_PREFIX$CTLD" slurmctld -i
    fi
    local node
    for node in $(node_names); do
        alive "$(slurmd_pid "$node")" || start_slurmd "$node"
    done
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
    local pidfile
    # every node's slurmd, whatever N was (and /run/slurmd.pid of the former single-node layout)
    for pidfile in /run/slurmd-node*.pid /run/slurmd.pid; do
        [[ -f $pidfile ]] || continue
        stop_pidfile "$pidfile" "$(basename "$pidfile" .pid)"
    done
    stop_pidfile "$CTLD_PID" slurmctld
}

cmd_stop() {
    need_root stop
    stop_slurm
    stop_network
    if [[ -f $RUN_DIR/munged.started ]]; then
        stop_pidfile "$MUNGE_PID" munged
        rm -f "$RUN_DIR/munged.started"
    fi
    log "stopped"
}

cmd_status() {
    local ok=0 pidfile name
    if alive "$CTLD_PID"; then
        echo "slurmctld: running (pid $(cat "$CTLD_PID"))"
    else
        echo "slurmctld: stopped"
        ok=1
    fi
    for pidfile in /run/slurmd-node*.pid; do
        [[ -f $pidfile ]] || continue
        name=$(basename "$pidfile" .pid)
        if alive "$pidfile"; then
            echo "${name/-/ -N }: running (pid $(cat "$pidfile"))"
        else
            echo "${name/-/ -N }: stopped"
            ok=1
        fi
    done
    if [[ $ok -eq 0 ]]; then
        sinfo -N -l || ok=1
        squeue || ok=1
    fi
    return $ok
}

parse_nodes() {
    while [[ $# -gt 0 ]]; do
        case $1 in
            --nodes) [[ $# -ge 2 ]] || bad_input "--nodes needs a value: an integer from 1 to $MAX_NODES"
                     NODES=$2; shift 2 ;;
            --nodes=*) NODES=${1#--nodes=}; shift ;;
            *) bad_input "unknown option '$1': allowed --nodes N" ;;
        esac
    done
    if ! [[ $NODES =~ ^[0-9]+$ ]] || (( NODES < 1 || NODES > MAX_NODES )); then
        bad_input "invalid --nodes '$NODES': allowed an integer from 1 to $MAX_NODES"
    fi
}

command=${1:-}
[[ $# -gt 0 ]] && shift
case $command in
    install|stop|status) [[ $# -eq 0 ]] || bad_input "'$command' takes no options (got: $*)" ;;
    start|restart) parse_nodes "$@" ;;
esac
case $command in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status) cmd_status ;;
    -h|--help|help) usage ;;
    "") usage >&2; exit 2 ;;
    *) log "unknown command '$command': allowed install, start, stop, status, restart"; exit 2 ;;
esac
