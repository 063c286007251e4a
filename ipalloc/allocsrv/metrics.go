package allocsrv

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/overlayd/overlayd/internal/ipv4"
)

// The allocator's metrics (Weave's weave_ips, weave_max_ips, weave_ipam_*
// and more). Descs are immutable: one set serves every Server.
var (
	activeDesc = prometheus.NewDesc("overlayd_ipam_active_ips",
		"Addresses of the range allocated on this peer.", nil, nil)
	maxDesc = prometheus.NewDesc("overlayd_ipam_max_ips",
		"Addresses in the allocation range.", nil, nil)
	ownedDesc = prometheus.NewDesc("overlayd_ipam_owned_ips",
		"Addresses of the range this peer owns (allocated or free).", nil, nil)
	unreachableDesc = prometheus.NewDesc("overlayd_ipam_unreachable_ips",
		"Addresses of the range owned by peers the router does not reach (rmpeer them if they are dead).", nil, nil)
	pendingDesc = prometheus.NewDesc("overlayd_ipam_pending",
		"Requests waiting for the ring or for space, by operation.", []string{"op"}, nil)
	conflictsDesc = prometheus.NewDesc("overlayd_ipam_conflicts_total",
		"Addresses allocated here in space a merge gave to another peer (each is asked back).", nil, nil)
	duplicatesDesc = prometheus.NewDesc("overlayd_ipam_duplicates_total",
		"Of the conflicts, addresses the other peer had allocated too (in use twice).", nil, nil)
	refusedDesc = prometheus.NewDesc("overlayd_ipam_refused_entries_total",
		"Received ring entries not merged, by reason: version_limit (a version no honest peer reaches), not_owner (space moved by a peer that may not move it).",
		[]string{"reason"}, nil)
	donationsDesc = prometheus.NewDesc("overlayd_ipam_donations_total",
		"Space given to peers that asked for it.", nil, nil)
	messagesDesc = prometheus.NewDesc("overlayd_ipam_messages_total",
		"IPAM messages from peers that were dropped (the allocator lagged) or rejected.", []string{"result"}, nil)
)

// Collector exposes the allocator's state to Prometheus.
type Collector struct{ s *Server }

var _ prometheus.Collector = Collector{}

// Collector returns a Prometheus collector for s.
func (s *Server) Collector() Collector { return Collector{s} }

// Describe implements prometheus.Collector.
func (c Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{activeDesc, maxDesc, ownedDesc, unreachableDesc, pendingDesc, conflictsDesc,
		duplicatesDesc, donationsDesc, messagesDesc, refusedDesc} {
		ch <- d
	}
}

// Collect implements prometheus.Collector. The state comes from the
// allocator's goroutine; if it does not answer within a second, only the
// message counters are reported.
func (c Collector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(messagesDesc, prometheus.CounterValue, float64(c.s.Dropped.Load()), "dropped")
	ch <- prometheus.MustNewConstMetric(messagesDesc, prometheus.CounterValue, float64(c.s.Rejected.Load()), "rejected")
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	st, err := c.s.Status(ctx)
	if err != nil {
		return
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	start, end := ipv4.Bounds(st.Range)
	var owned, unreachable uint64
	for _, o := range st.Owners {
		switch {
		case o.Peer == c.s.cfg.Node.Self:
			owned += o.Size
		case !o.Reachable:
			unreachable += o.Size
		}
	}
	gauge(activeDesc, float64(st.Active))
	gauge(maxDesc, float64(end-uint64(start)))
	gauge(ownedDesc, float64(owned))
	gauge(unreachableDesc, float64(unreachable))
	gauge(pendingDesc, float64(st.PendingAllocs), "allocate")
	gauge(pendingDesc, float64(st.PendingClaims), "claim")
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	counter(conflictsDesc, st.Stats.Conflicts)
	counter(duplicatesDesc, st.Stats.Duplicates)
	counter(refusedDesc, st.Stats.AtLimit, "version_limit")
	counter(refusedDesc, st.Stats.NotOwner, "not_owner")
	counter(donationsDesc, st.Stats.Donations)
}
