# Environment for commands that use the test bed: the cached Kubernetes
# binaries on PATH, the admin kubeconfig, and a cargo target directory
# outside the clone so fresh clones on one machine share compiled crates.
# Sourced, not run.
# shellcheck shell=bash
source "$(dirname "${BASH_SOURCE[0]}")/control-plane/lib.sh"
export PATH="$BIN_DIR:$PATH"
export KUBECONFIG="$KUBECONFIG_PATH"
export KUBECTL="$BIN_DIR/kubectl"
export KUBECACHEDIR="$STATE_DIR/kubectl-cache"
export CONTROL_PLANE_DIR="$STATE_DIR"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE_DIR/target}"
