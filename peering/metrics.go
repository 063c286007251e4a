package peering

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Collector exposes the router's counters to Prometheus. It reads them at
// scrape time: the data path only bumps atomics and never waits on a scrape.
type Collector struct {
	r *Router

	peers, conns, packets, bytes, drops, gossip, gossipErrs, decode, outDrops, refused, refusedAnn *prometheus.Desc
}

var _ prometheus.Collector = (*Collector)(nil)

// Collector returns a Prometheus collector for r, to be registered with the
// daemon's own registry.
func (r *Router) Collector() *Collector {
	return &Collector{
		r: r,
		peers: prometheus.NewDesc("overlayd_peers",
			"Peers in this router's topology, itself included.", nil, nil),
		conns: prometheus.NewDesc("overlayd_connections",
			"Connections and targets by state (connecting, retrying, failed, pending, established).", []string{"state"}, nil),
		packets: prometheus.NewDesc("overlayd_forwarded_packets_total",
			"IP packets carried: sent to peers, or received from them and written to the TUN device.", []string{"direction"}, nil),
		bytes: prometheus.NewDesc("overlayd_forwarded_bytes_total",
			"Bytes of the packets in overlayd_forwarded_packets_total (overlay header included when sent).", []string{"direction"}, nil),
		drops: prometheus.NewDesc("overlayd_dropped_packets_total",
			"Packets and datagrams dropped, by reason.", []string{"reason"}, nil),
		gossip: prometheus.NewDesc("overlayd_gossip_bytes_total",
			"Gossip bytes by channel and direction.", []string{"channel", "direction"}, nil),
		decode: prometheus.NewDesc("overlayd_decode_errors_total",
			"Datagrams that did not decode, by message type (header: bad version, type or length).", []string{"type"}, nil),
		outDrops: prometheus.NewDesc("overlayd_gossip_dropped_total",
			"Outbound gossip messages dropped, by channel and reason: its queue was full (or the message too large), or no path led to the peer.",
			[]string{"channel", "reason"}, nil),
		refused: prometheus.NewDesc("overlayd_password_refused_total",
			"Password mode: control datagrams and handshakes refused, by reason (cookie_sent counts cookies sent to unproven diallers).", []string{"reason"}, nil),
		refusedAnn: prometheus.NewDesc("overlayd_routes_refused_announcements",
			"Prefixes peers announce in ring space another peer owns, left out of the route table.", nil, nil),
		gossipErrs: prometheus.NewDesc("overlayd_gossip_rejected_total",
			"Gossip refused, by kind: bad chunks or entries, forged origin, unknown channel, unsigned (password mode: not signed by its origin).", []string{"kind"}, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.peers, c.conns, c.packets, c.bytes, c.drops, c.gossip, c.gossipErrs, c.decode, c.outDrops, c.refused, c.refusedAnn} {
		ch <- d
	}
}

// Collect implements prometheus.Collector. Connection states come from the
// control loop; if it does not answer within a second the gauges are left
// out of this scrape.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	s := &c.r.stats
	counter := func(d *prometheus.Desc, v *atomic.Uint64, label ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v.Load()), label...)
	}
	counter(c.packets, &s.SentPackets, "sent")
	counter(c.packets, &s.ReceivedPackets, "received")
	counter(c.packets, &s.RelayedPackets, "relayed")
	counter(c.bytes, &s.SentBytes, "sent")
	counter(c.bytes, &s.ReceivedBytes, "received")
	counter(c.bytes, &s.RelayedBytes, "relayed")
	counter(c.gossip, &s.GossipSentBytes, "topology", "sent")
	counter(c.gossip, &s.GossipReceivedBytes, "topology", "received")
	counter(c.gossip, &s.OtherSentBytes, "other", "sent")
	counter(c.gossip, &s.OtherReceivedBytes, "other", "received")
	counter(c.gossipErrs, &s.GossipRejected, "rejected")
	counter(c.gossipErrs, &s.GossipUnknownChannel, "unknown_channel")
	counter(c.gossipErrs, &s.GossipUnsigned, "unsigned")
	for kind, v := range s.DecodeErrorCounts() {
		ch <- prometheus.MustNewConstMetric(c.decode, prometheus.CounterValue, float64(v), kind)
	}
	for _, d := range []struct {
		reason string
		v      *atomic.Uint64
	}{
		{"unroutable", &s.DropUnroutable}, {"send_error", &s.DropSendError}, {"unknown_peer", &s.DropUnknownPeer},
		{"not_for_us", &s.DropNotForUs}, {"malformed", &s.DropMalformed}, {"control_queue_full", &s.DropCtrlQueue}, {"peer_queue_full", &s.DropPeerQueue},
		{"source_limit", &s.DropSourceRate}, {"peer_limit", &s.DropPeerRate},
		{"tun_write", &s.DropTunWrite}, {"tun_read", &s.DropTunRead}, {"too_many_hops", &s.DropHops},
		{"plaintext_data", &s.DropPlainData},
	} {
		counter(c.drops, d.v, d.reason)
	}
	for _, name := range c.r.channels {
		o := c.r.outboxes[name]
		counter(c.outDrops, &o.dropped, name, "queue_full")
		counter(c.outDrops, &o.unreachable, name, "unreachable")
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	st, err := c.r.Status(ctx)
	if err != nil {
		return
	}
	states := map[string]int{"connecting": 0, "retrying": 0, "failed": 0, "pending": 0, "established": 0}
	for _, cs := range st.Connections {
		states[cs.State]++
	}
	for state, n := range states {
		ch <- prometheus.MustNewConstMetric(c.conns, prometheus.GaugeValue, float64(n), state)
	}
	ch <- prometheus.MustNewConstMetric(c.peers, prometheus.GaugeValue, float64(len(st.Peers)))
	ch <- prometheus.MustNewConstMetric(c.refusedAnn, prometheus.GaugeValue, float64(st.RefusedAnnouncements))
	for reason, n := range st.Refused {
		ch <- prometheus.MustNewConstMetric(c.refused, prometheus.CounterValue, float64(n), reason)
	}
}
