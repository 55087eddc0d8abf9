# Shared settings for the control-plane scripts. Sourced, not run.
# shellcheck shell=bash

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION="v1.36.3"
ETCD_VERSION="v3.6.16"
KWOK_VERSION="v0.8.0"

CACHE_DIR="${INTEGRATION_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/integration-operator}"
BIN_DIR="$CACHE_DIR/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION/bin"

# Runtime state of a running plane: certificates, kubeconfig, data, logs, pids.
STATE_DIR="${CONTROL_PLANE_DIR:-${TMPDIR:-/tmp}/integration-operator-$(id -u)}"
LOG_DIR="$STATE_DIR/logs"
PID_DIR="$STATE_DIR/pids"
KUBECONFIG_PATH="$STATE_DIR/kubeconfig"

API_PORT="${API_PORT:-6443}"
ETCD_PORT="${ETCD_PORT:-2379}"
ETCD_PEER_PORT="${ETCD_PEER_PORT:-2380}"
KCM_PORT="${KCM_PORT:-10257}"
SCHED_PORT="${SCHED_PORT:-10259}"
KWOK_PORT="${KWOK_PORT:-10247}"
# Below the ephemeral port range (32768+), where the plane's own client
# connections would sometimes hold the port.
PG_PORT="${PG_PORT:-15432}"

# The host's address: the API server advertises it (pods reach it there)
# and the real node's kubelet and cluster DNS use it.
host_ip() { ip -4 route get 1.1.1.1 | sed -n 's/.* src \([0-9.]*\).*/\1/p'; }

log() { printf '[control-plane] %s\n' "$*" >&2; }
die() { printf '[control-plane] error: %s\n' "$*" >&2; exit 1; }
PG_DIR="$STATE_DIR/postgres"

# Prints the pid in $PID_DIR/$1.pid if that process still runs.
running_pid() {
  local f="$PID_DIR/$1.pid" pid
  [[ -f "$f" ]] || return 1
  pid=$(cat "$f")
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# Fails with the log file named, so a broken component is one `less` away.
fail_with_log() { # component, message
  local logf="$LOG_DIR/$1.log"
  log "$2"
  if [[ -f "$logf" ]]; then
    log "last lines of $logf:"
    tail -n 20 "$logf" >&2
  fi
  die "$1 failed; logs of every component are in $LOG_DIR"
}
