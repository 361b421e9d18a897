#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the `slurm`-marked tests (tests/slurm/) and for trying the
# README's cluster commands: munge + slurmctld + slurmd (this host, its CPUs, partition `debug`) and
# accounting (slurmdbd on MariaDB) so that `sacct` answers as on a real cluster. All from Debian's packages.
#
#   sudo tests/slurm/up.sh          # idempotent: does nothing when the cluster already answers
#   sinfo; squeue; sacct            # then, as any user
#
# Partitions: `debug` (default, preemptable: PreemptMode=REQUEUE, a 20 s GraceTime between SIGTERM and
# SIGKILL) and `urgent` (higher PriorityTier: a job there preempts `debug` jobs, as a higher-priority job
# does on a shared cluster). Exit 0 when the cluster is up; exit 0 with "SKIP: ..." when it cannot be
# brought up here (not root, no apt-get, daemons not installable); exit 1 when a step that should work fails.
set -euo pipefail

skip() { echo "SKIP: one-node SLURM cluster not brought up: $*" >&2; exit 0; }
fail() { echo "tests/slurm/up.sh: $*" >&2; exit 1; }

up() { timeout 10 sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)' \
       && timeout 10 sacct -n -X -S now-1minutes >/dev/null 2>&1; }

if command -v sinfo >/dev/null && up; then
    echo "one-node SLURM cluster already up: $(sinfo -h -o '%P %D nodes, %c CPUs, %t' | tr '\n' ';')"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || skip "needs root (to install packages and start the daemons); run it with sudo"

if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null \
   || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || skip "no apt-get here (this script installs Debian's munge, slurm-wlm, slurmdbd, mariadb-server)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || skip "apt-get update failed (no package mirror reachable?)"
    apt-get install -y -q --no-install-recommends munge slurm-wlm slurmdbd mariadb-server >/dev/null \
        || skip "apt-get install munge slurm-wlm slurmdbd mariadb-server failed"
fi

host=$(hostname -s)
# The CPUs slurmd finds on the node (`slurmd -C`), not `nproc`: run from a process pinned to fewer cores (taskset,
# as the accounting-off test's restart is when pytest is pinned), nproc counts only those, and the node's config
# would then claim fewer CPUs than the machine has.
cpus=$(slurmd -C 2>/dev/null | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')
cpus=${cpus:-$(nproc --all)}
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))   # leave 1 GiB to the OS
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /run/mysqld /run/slurm
chown munge:munge /run/munge 2>/dev/null || true
chown mysql:mysql /run/mysqld 2>/dev/null || true

# ---- munge (authentication between the daemons and the commands) ----
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged || /usr/sbin/munged --force \
    || fail "munged did not start"

# ---- MariaDB + slurmdbd (accounting: what sacct reads) ----
if ! pgrep -x mariadbd >/dev/null && ! pgrep -x mysqld >/dev/null; then
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    (setsid mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
        --skip-networking=0 --bind-address=127.0.0.1 >/var/log/slurm/mariadb.log 2>&1 &)
fi
for _ in $(seq 60); do mariadb -u root -e 'select 1' >/dev/null 2>&1 && break; sleep 0.5; done
mariadb -u root -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
                    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" \
    || fail "MariaDB did not start (log: /var/log/slurm/mariadb.log)"

cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
chmod 600 /etc/slurm/slurmdbd.conf

cat > /etc/slurm/slurm.conf <<EOF
# Written by tests/slurm/up.sh: one node ($host, $cpus CPUs), partitions debug (preemptable) and urgent.
ClusterName=harness
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5   # quick to start and preempt: tests wait less
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
# accounting: sacct answers from slurmdbd, as on real clusters
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
# preemption: a job in a higher-tier partition requeues debug's jobs (SIGTERM, GraceTime, then SIGKILL)
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
KillWait=30
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=20
PartitionName=urgent Nodes=$host MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
rm -f /etc/slurm/cgroup.conf   # proctrack/linuxproc + task/none: no cgroups needed

pgrep -x slurmdbd >/dev/null || /usr/sbin/slurmdbd || fail "slurmdbd did not start (log: /var/log/slurm/slurmdbd.log)"
for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
sacctmgr -n list cluster format=cluster | grep -qw harness || sacctmgr -i add cluster harness >/dev/null \
    || fail "sacctmgr could not register the cluster (log: /var/log/slurm/slurmdbd.log)"

if pgrep -x slurmctld >/dev/null; then scontrol reconfigure; else /usr/sbin/slurmctld \
    || fail "slurmctld did not start (log: /var/log/slurm/slurmctld.log)"; fi
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd || fail "slurmd did not start (log: /var/log/slurm/slurmd.log)"

for _ in $(seq 60); do up && break; sleep 1; done
if ! up; then
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 2
fi
up || fail "the cluster does not answer: sinfo: $(sinfo 2>&1 | tail -2); logs in /var/log/slurm/"
echo "one-node SLURM cluster up: $(sinfo -h -o '%P %D nodes, %c CPUs, %t' | tr '\n' ';')"
