# The tests' own control plane: state and ports apart from the plane
# `make demo` leaves running, so testing never stops the demo. Sourced by
# hack/test and hack/e2e, before hack/env.sh.
# shellcheck shell=bash
export CONTROL_PLANE_DIR="${TEST_CONTROL_PLANE_DIR:-${TMPDIR:-/tmp}/integration-operator-test-$(id -u)}"
export API_PORT=16443 ETCD_PORT=12379 ETCD_PEER_PORT=12380 KCM_PORT=11257 SCHED_PORT=11259 \
  KWOK_PORT=11247 PG_PORT=15433
