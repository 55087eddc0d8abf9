// Command bench-peer is the comparison point of `make bench`: a listener
// holder built on client-go's leader election, with the same timings as the
// operator's agents (lease 15 s, renew deadline 10 s, retry 2 s). It drives
// the same hook calls as the agent, so one recorder measures both:
//
//	POST {hook}/listener/enable?listener=<l>&epoch=<leaseTransitions>&until=<unix ms>
//	POST {hook}/listener/disable?listener=<l>&epoch=<leaseTransitions>
//
// client-go does not report individual renewals, so while it leads the peer
// re-sends enable every retry period with until = now + renew deadline.
// SIGTERM or SIGINT releases the Lease (ReleaseOnCancel) and exits.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

const (
	leaseDuration = 15 * time.Second
	renewDeadline = 10 * time.Second
	retryPeriod   = 2 * time.Second
)

// hooks posts to the recorder. The mutex orders the calls: no enable is
// sent after the disable that ends a term.
type hooks struct {
	base     string
	listener string
	http     *http.Client

	mu      sync.Mutex
	leading bool
	epoch   int32
}

func (h *hooks) post(path string, query url.Values) {
	query.Set("listener", h.listener)
	u := h.base + path + "?" + query.Encode()
	resp, err := h.http.Post(u, "text/plain", nil)
	if err != nil {
		log.Printf("POST %s: %v", u, err)
		return
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		log.Printf("POST %s: %s", u, resp.Status)
	}
}

func (h *hooks) enable() {
	until := time.Now().Add(renewDeadline).UnixMilli()
	h.post("/listener/enable", url.Values{
		"epoch": {strconv.Itoa(int(h.epoch))},
		"until": {strconv.FormatInt(until, 10)},
	})
}

func main() {
	kubeconfig := flag.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig file")
	namespace := flag.String("namespace", "", "namespace of the Lease")
	leaseName := flag.String("lease", "", "Lease name")
	identity := flag.String("identity", "", "holder identity")
	hook := flag.String("hook", "", "base URL of the listener hooks, e.g. http://127.0.0.1:8080")
	listener := flag.String("listener", "bench", "listener name sent to the hooks")
	flag.Parse()
	if *namespace == "" || *leaseName == "" || *identity == "" || *hook == "" {
		fmt.Fprintln(os.Stderr, "bench-peer: --namespace, --lease, --identity and --hook are required")
		flag.Usage()
		os.Exit(2)
	}
	log.SetPrefix(*identity + " ")
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		log.Fatalf("kubeconfig: %v", err)
	}
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		log.Fatalf("client: %v", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	h := &hooks{base: *hook, listener: *listener, http: &http.Client{Timeout: retryPeriod}}
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Name: *leaseName, Namespace: *namespace},
		Client:     client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: *identity},
	}
	var le *leaderelection.LeaderElector
	le, err = leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		LeaseDuration:   leaseDuration,
		RenewDeadline:   renewDeadline,
		RetryPeriod:     retryPeriod,
		ReleaseOnCancel: true,
		Name:            *leaseName,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(ctx context.Context) {
				// The epoch of this term: the Lease's transitions count,
				// which client-go raised when it took the Lease over.
				lease, err := client.CoordinationV1().Leases(*namespace).Get(ctx, *leaseName, metav1.GetOptions{})
				if err != nil {
					log.Printf("read Lease for the epoch: %v", err)
					return
				}
				var epoch int32
				if lease.Spec.LeaseTransitions != nil {
					epoch = *lease.Spec.LeaseTransitions
				}
				log.Printf("started leading, epoch %d", epoch)
				ticker := time.NewTicker(retryPeriod)
				defer ticker.Stop()
				for first := true; ; first = false {
					h.mu.Lock()
					if ctx.Err() != nil || !le.IsLeader() || (!first && !h.leading) {
						h.mu.Unlock()
						return
					}
					h.leading, h.epoch = true, epoch
					h.enable()
					h.mu.Unlock()
					select {
					case <-ctx.Done():
						return
					case <-ticker.C:
					}
				}
			},
			OnStoppedLeading: func() {
				// Called once Run ends, after the release (if any); also
				// when this candidate never led, which needs no disable.
				h.mu.Lock()
				defer h.mu.Unlock()
				if !h.leading {
					return
				}
				h.leading = false
				log.Printf("stopped leading, epoch %d", h.epoch)
				h.post("/listener/disable", url.Values{"epoch": {strconv.Itoa(int(h.epoch))}})
			},
		},
	})
	if err != nil {
		log.Fatalf("leader election: %v", err)
	}
	// What leaderelection.RunOrDie does, keeping the elector for IsLeader.
	le.Run(ctx)
}
