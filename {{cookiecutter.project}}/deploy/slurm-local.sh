#!/usr/bin/env bash
# A one-node SLURM cluster on this machine: for trying the cluster path (launcher=slurm,
# deploy/slurm.sbatch) on a laptop or a workstation, and for the tests marked `slurm`.
#
#   sudo deploy/slurm-local.sh up       # install if missing, configure, start munged, slurmctld, slurmd
#   sudo deploy/slurm-local.sh down     # cancel its jobs, stop the three daemons (packages and config stay)
#   deploy/slurm-local.sh status        # exit 0 when the node accepts jobs
#
# `make slurm-up` / `make slurm-down` run the same. Both are idempotent: `up` on a running cluster
# checks it and returns, `down` on a stopped one does nothing. Debian/Ubuntu (apt-get) and root only:
# slurmd must start job processes as the submitting user. The daemons are started directly (no
# systemd), so it also works in containers. A slurm.conf that this script did not write is never
# replaced: a machine that is already part of a real cluster is left alone.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# Written by deploy/slurm-local.sh: a one-node cluster for local tests. Remove this line to keep your edits."
MUNGE_KEY=/etc/munge/munge.key
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
LOG_DIR=/var/log/slurm
NODE=$(hostname -s)

die() { echo "slurm-local: $*" >&2; exit 1; }
say() { echo "slurm-local: $*"; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "'$1' needs root: run 'sudo $0 $1' (or 'sudo make slurm-$1')"
}

running() {  # running PIDFILE: is the process named in PIDFILE alive?
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurmctld, slurmd or munged is missing and there is no apt-get: install SLURM and MUNGE with your package manager"
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists of a fresh machine may be stale or empty: update once if the install fails.
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; }
}

munge_key() {
    if [ ! -s "$MUNGE_KEY" ]; then
        say "creating the MUNGE key $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_KEY" "$(dirname "$MUNGE_KEY")"
    chmod 0400 "$MUNGE_KEY"
    chmod 0700 "$(dirname "$MUNGE_KEY")"
}

render_conf() {
    # `slurmd -C` prints this machine's NodeName, CPUs, sockets, cores, threads and RealMemory as
    # slurm.conf wants them; a node whose configuration claims more than it has is drained.
    local node_line
    node_line=$(slurmd -C | head -n 1)
    cat <<EOF
$MARK
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire + 1 s before it may start again (default 120 s); 10 s keeps a
# local requeue quick. Job step credentials also live this long, plenty on one node.
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroups: processes are tracked through /proc and tasks are not pinned, which works in
# containers and on any kernel. A real cluster uses proctrack/cgroup and task/affinity,cgroup.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
# Jobs may be requeued (Lightning's auto-requeue runs 'scontrol requeue'): the default, made explicit.
JobRequeue=1
# A node that was down (a restart) takes jobs again as soon as its slurmd registers.
ReturnToService=2
# Finished jobs stay visible to 'scontrol show job' (state, Restarts=) for 10 minutes.
MinJobAge=600
# Look for startable jobs every 5 s instead of every 30-60 s: a requeued job (or one whose
# dependencies ended) starts soon after it becomes eligible. Cheap on one node.
SchedulerParameters=sched_interval=5,bf_interval=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

write_conf() {  # prints "changed" when the file on disk was (re)written
    local new
    new=$(render_conf)
    if [ -e "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to replace it (move it away to use the local cluster)"
    fi
    if [ -e "$CONF" ] && [ "$(cat "$CONF")" = "$new" ]; then
        return
    fi
    mkdir -p "$(dirname "$CONF")"
    printf '%s\n' "$new" > "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    echo changed
}

start_munged() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE: SIGTERM, then wait up to 20 s
    running "$2" || return 0
    say "stopping $1"
    kill "$(cat "$2")" 2>/dev/null || true
    for _ in $(seq 100); do
        running "$2" || { rm -f "$2"; return 0; }
        sleep 0.2
    done
    die "$1 (pid $(cat "$2")) did not stop within 20 s"
}

node_state() {  # idle, mixed, allocated, down*, drained, ... or nothing when slurmctld does not answer
    sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1
}

node_ready() {
    case "$(node_state)" in
        idle|mixed|allocated|completing) return 0 ;;
        *) return 1 ;;
    esac
}

up() {
    need_root up
    install_packages
    munge_key
    local changed
    changed=$(write_conf)
    mkdir -p /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"
    start_munged
    if [ -n "$changed" ]; then  # new settings: restart whatever runs with the old ones
        stop_pidfile slurmd "$SLURMD_PID"
        stop_pidfile slurmctld "$CTLD_PID"
    fi
    if ! running "$CTLD_PID"; then
        say "starting slurmctld"
        /usr/sbin/slurmctld
    fi
    if ! running "$SLURMD_PID"; then
        say "starting slurmd"
        /usr/sbin/slurmd
    fi
    local state
    for _ in $(seq 60); do
        node_ready && break
        state=$(node_state)
        case "$state" in  # left down by an earlier stop, or drained: put it back in service
            down*|drain*|fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    if ! node_ready; then
        tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
        die "node $NODE is not taking jobs after 60 s (state: '$(node_state)'); logs above"
    fi
    say "up: partition 'local', node $NODE ($(sinfo -h -N -n "$NODE" -o '%c CPUs, %m MB')), config $CONF"
}

down() {
    need_root down
    if running "$CTLD_PID"; then
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
        if [ -n "${jobs// /}" ]; then
            say "cancelling jobs $jobs"
            scancel --full $jobs 2>/dev/null || true
            sleep 1
        fi
    fi
    stop_pidfile slurmd "$SLURMD_PID"
    stop_pidfile slurmctld "$CTLD_PID"
    stop_pidfile munged "$MUNGE_PID"
    say "down"
}

status() {
    if node_ready; then
        sinfo
        return 0
    fi
    echo "slurm-local: not running (node state: '$(node_state)'); start it with 'sudo $0 up'" >&2
    return 1
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) die "usage: $0 up|down|status" ;;
esac
