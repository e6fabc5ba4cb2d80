#!/usr/bin/env bash
# A single-node SLURM on localhost (munge + slurmctld + slurmd), for trying sweeps and for
# tests/test_slurm.py. Needs root and Debian's packages: apt-get install -y slurm-wlm munge
#
#   slurm/local_cluster.sh start    # idempotent; prints the exports every SLURM client needs
#   slurm/local_cluster.sh stop     # stops the daemons it started (by their pid files)
#   slurm/local_cluster.sh status
#
# State, logs and slurm.conf live in $DWBENCH_SLURM_DIR (default /tmp/dwbench-slurm). There is no
# slurmdbd, so `sacct` cannot work: the script puts a stand-in built on `squeue --states=all`
# into $DWBENCH_SLURM_DIR/bin, which is what submitit (the Hydra launcher) reads job states from.
# Finished jobs stay visible to squeue/scontrol for a day (MinJobAge).
set -euo pipefail

DIR="${DWBENCH_SLURM_DIR:-/tmp/dwbench-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"

exports() {
  echo "export SLURM_CONF=$CONF"
  echo "export PATH=$DIR/bin:\$PATH"
}

alive() {  # alive PIDFILE: the daemon whose pid is in the file runs (a pid file left by an
  # earlier boot may name a pid that another program has since been given: its name must match)
  local pid
  [[ -s "$1" ]] || return 1
  pid="$(cat "$1")"
  kill -0 "$pid" 2>/dev/null && [[ "$(ps -o comm= -p "$pid")" == "$(basename "$1" .pid)"* ]]
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return
  fi
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- munged
  mkdir -p "$DIR"
  touch "$DIR/munged.ours"  # stop ends only a munged that this script started
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "munged did not start (see /var/log/munge/munged.log)" >&2
  exit 1
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/bin"
  cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: one node, this host, everything under $DIR.
ClusterName=dwbench
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=86400
KillWait=5
EnforcePartLimits=ALL
MailProg=/bin/true
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$DIR/bin/sacct" <<'EOF'
#!/usr/bin/env bash
# sacct stand-in (no slurmdbd here): answers submitit's `sacct -o JobID,State,NodeList
# --parsable2 -j IDS` from squeue, which knows finished jobs for MinJobAge.
ids=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -j) ids="$2"; shift 2 ;;
    *) shift ;;
  esac
done
echo "JobID|State|NodeList"
squeue --states=all --array --noheader --format="%i|%T|%N" ${ids:+--jobs="$ids"}
EOF
  chmod +x "$DIR/bin/sacct"
}

start() {
  start_munge
  if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
    echo "local SLURM already running ($CONF)" >&2
    exports
    return
  fi
  write_conf
  export SLURM_CONF="$CONF"
  alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
  alive "$DIR/slurmd.pid" || slurmd -f "$CONF"
  # The controller schedules a few seconds after it starts: wait until a probe job has run.
  # Jobs recovered from $DIR/state (a queue left by an earlier run) may hold the node, so the
  # probe never waits for resources: a running job shows the scheduler works just as well.
  for _ in $(seq 60); do
    if sinfo --noheader --format=%t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      if [[ -n "$(squeue --noheader --states=RUNNING --format=%i 2>/dev/null)" ]] ||
        timeout 20 srun --immediate=10 --quiet --time=1 true 2>/dev/null; then
        echo "local SLURM is up ($CONF)" >&2
        queued="$(squeue --noheader --array --format=%i 2>/dev/null | wc -l)"
        if ((queued > 0)); then
          echo "it recovered $queued queued or running job(s) from $DIR/state;" \
            "scancel them, or use a fresh DWBENCH_SLURM_DIR, to start empty" >&2
        fi
        exports
        return
      fi
    fi
    sleep 1
  done
  echo "SLURM did not come up; see $DIR/log/ (tail follows)" >&2
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  exit 1
}

stop() {
  local name
  for name in slurmd slurmctld; do
    if alive "$DIR/$name.pid"; then
      kill "$(cat "$DIR/$name.pid")"
      for _ in $(seq 50); do
        alive "$DIR/$name.pid" || break
        sleep 0.1
      done
    fi
    rm -f "$DIR/$name.pid"
  done
  if [[ -e "$DIR/munged.ours" ]] && alive /run/munge/munged.pid; then
    kill "$(cat /run/munge/munged.pid)"
  fi
  rm -f "$DIR/munged.ours"
  echo "local SLURM stopped (state kept in $DIR)" >&2
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status)
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
      echo "running ($CONF)"
      exports
    else
      echo "stopped"
      exit 1
    fi
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
