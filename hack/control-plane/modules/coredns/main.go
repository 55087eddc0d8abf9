// Command coredns is a minimal CoreDNS build for the test bed's real kubelet
// node: pods there need cluster DNS (<svc>.<ns>.svc.cluster.local). It is the
// documented "build with external golang source code" way
// (https://coredns.io/2017/07/25/compile-time-enabling-or-disabling-plugins/):
// coremain plus only the plugins below, instead of core/plugin, which pulls
// in every plugin (cloud SDKs, etcd, grpc, dnstap...).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"       // listen on a chosen address, not every interface
	_ "github.com/coredns/coredns/plugin/cache"      // cache answers, as every cluster DNS does
	_ "github.com/coredns/coredns/plugin/errors"     // log errors (e.g. an unreachable API server)
	_ "github.com/coredns/coredns/plugin/forward"    // non-cluster names go to the host's resolvers
	_ "github.com/coredns/coredns/plugin/health"     // /health liveness endpoint, for a wait loop
	_ "github.com/coredns/coredns/plugin/kubernetes" // the cluster zone: services, endpoints, pods
	_ "github.com/coredns/coredns/plugin/loop"       // stop on a forwarding loop instead of spinning
	_ "github.com/coredns/coredns/plugin/ready"      // /ready: the kubernetes plugin has synced
)

// The order in which the plugins handle a query; it is upstream's order
// (plugin.cfg) restricted to the plugins imported above. Keep the two lists
// in step: an imported plugin missing here cannot be used in a Corefile.
var directives = []string{
	"bind",
	"ready",
	"health",
	"errors",
	"cache",
	"kubernetes",
	"loop",
	"forward",
}

func init() {
	if err := dnsserver.SetDirectives(directives); err != nil {
		panic(err)
	}
}

func main() {
	coremain.Run()
}
