# The two commands a newcomer needs are `make demo` and `make test`.
.PHONY: demo test e2e down crds build bench help

help:
	@echo "make demo   local control plane + PostgreSQL, the operator, sample clusters"
	@echo "make test   fmt, clippy, CRD check, unit and integration tests on a real control plane, e2e on a real node"
	@echo "make e2e    end to end on a real kubelet node: operator in-cluster, agents, real servers"
	@echo "make bench  listener failover against client-go, the operator against bare StatefulSets (bench/RESULTS.md)"
	@echo "make down   stop the local control plane (and the demo operator)"
	@echo "make crds   regenerate crds/ (and the chart's copy) from the Rust types"

demo:
	hack/demo

test:
	hack/test

e2e:
	hack/e2e

bench:
	hack/bench

down:
	hack/control-plane/down

crds:
	cargo run --locked --quiet -- crd > crds/integrationcluster.yaml
	cp crds/integrationcluster.yaml charts/integration-operator/crds/integrationcluster.yaml

build:
	cargo build --locked --release
