package daemon

import (
	"context"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/buildinfo"
	"github.com/overlayd/overlayd/internal/hostnet"
	"github.com/overlayd/overlayd/internal/netconf"
	"github.com/overlayd/overlayd/peering"
	"github.com/overlayd/overlayd/proto"
)

// Status implements api.Backend.
func (d *Daemon) Status(ctx context.Context) (api.Status, error) {
	rs, err := d.router.Status(ctx)
	if err != nil {
		return api.Status{}, err
	}
	st := api.Status{Version: buildinfo.Version, Router: d.routerStatus(rs)}
	if d.alloc != nil {
		is, err := d.alloc.Status(ctx)
		if err != nil {
			return api.Status{}, err
		}
		st.IPAM = d.ipamStatus(is, rs)
	}
	st.DNS = d.dnsStatus()
	st.DNS.Entries = nil // they can be many: GET /v1/dns has them
	if d.driver != nil {
		st.Plugin = d.driver.Status()
	}
	return st, nil
}

// routerStatus is the router's section: its configuration, what it
// knows, and its counters.
func (d *Daemon) routerStatus(rs peering.Status) api.RouterStatus {
	st := api.RouterStatus{
		Name: d.name, Nickname: d.cfg.Nickname, UID: d.router.UID(), Port: d.pc.LocalPort(),
		ProtocolMinVersion: proto.MinVersion, ProtocolMaxVersion: proto.MaxVersion,
		PeerDiscovery: d.cfg.Discovery, ConnLimit: d.cfg.ConnLimit, MTU: d.mtu, UDPGSO: d.pc.GSO(), UDPGRO: d.pc.GRO(),
		Targets: rs.Targets, Exposed: rs.Exposed, GossipPartial: rs.GossipPartial, Stats: routerStats(d.router.Stats()),
		Encryption: rs.Encryption, DataEncryption: d.plane != nil, WireGuard: d.wireGuardStatus(), PasswordRefused: rs.Refused, RefusedAnnouncements: rs.RefusedAnnouncements,
		Unproven: rs.Unproven, Impostors: rs.Impostors,
		TrustedSubnets: rs.TrustedSubnets,
		Connections:    make([]api.Connection, len(rs.Connections)), Peers: make([]api.Peer, len(rs.Peers)),
		Routes: make([]api.Route, len(rs.Routes)),
	}
	for i, c := range rs.Connections {
		st.Connections[i] = api.Connection(c)
	}
	for i, p := range rs.Peers {
		st.Peers[i] = api.Peer{Name: p.Name, Nickname: p.Nickname, UID: p.UID, Connections: make([]api.PeerConnection, len(p.Connections))}
		for j, c := range p.Connections {
			st.Peers[i].Connections[j] = api.PeerConnection(c)
		}
	}
	for i, r := range rs.Routes {
		st.Routes[i] = api.Route(r)
	}
	return st
}

// routerStats reads the router's counters.
func routerStats(s *peering.Stats) api.RouterStats {
	return api.RouterStats{
		TunPackets: s.TunPackets.Load(), SentPackets: s.SentPackets.Load(), SentBytes: s.SentBytes.Load(),
		ReceivedPackets: s.ReceivedPackets.Load(), ReceivedBytes: s.ReceivedBytes.Load(),
		DropUnroutable: s.DropUnroutable.Load(), DropSendError: s.DropSendError.Load(),
		DropUnknownPeer: s.DropUnknownPeer.Load(), DropNotForUs: s.DropNotForUs.Load(),
		DropMalformed: s.DropMalformed.Load(), DropCtrlQueue: s.DropCtrlQueue.Load(), DropPeerQueue: s.DropPeerQueue.Load(),
		DropSourceRate: s.DropSourceRate.Load(), DropPeerRate: s.DropPeerRate.Load(),
		DropTunWrite: s.DropTunWrite.Load(), DropTunRead: s.DropTunRead.Load(),
		DropHops: s.DropHops.Load(), RelayedPackets: s.RelayedPackets.Load(), RelayedBytes: s.RelayedBytes.Load(),
		GossipSentBytes: s.GossipSentBytes.Load(), GossipReceivedBytes: s.GossipReceivedBytes.Load(),
		GossipRejected: s.GossipRejected.Load(), GossipUnknownChannel: s.GossipUnknownChannel.Load(),
		GossipRelayed: s.GossipRelayed.Load(), DecodeErrors: s.DecodeErrorCounts(),
		OtherSentBytes: s.OtherSentBytes.Load(), OtherReceivedBytes: s.OtherReceivedBytes.Load(),
	}
}

// Connect implements api.Backend.
func (d *Daemon) Connect(ctx context.Context, peers []string) error {
	if len(peers) == 0 {
		return api.BadRequest("no peer address given")
	}
	for _, p := range peers {
		if _, _, err := peering.ParseTarget(p); err != nil {
			return &api.RequestError{Err: err}
		}
	}
	return d.router.Connect(ctx, peers)
}

// Forget implements api.Backend.
func (d *Daemon) Forget(ctx context.Context, peers []string) error {
	if len(peers) == 0 {
		return api.BadRequest("no peer address given")
	}
	err := d.router.Forget(ctx, peers)
	if err != nil && ctx.Err() == nil {
		return &api.RequestError{Err: err}
	}
	return err
}

// keeperCollector exposes what the keeper put back, by kind.
func keeperCollector(k *netconf.Keeper) prometheus.Collector {
	var cs collectors
	for kind := range hostnet.NumKinds {
		cs = append(cs, prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "overlayd_netconf_restored_total",
			Help:        "Links, addresses and routes of overlayd's that something removed or changed and overlayd put back, by kind.",
			ConstLabels: prometheus.Labels{"kind": kind.String()}}, func() float64 { return float64(k.Restored(kind)) }))
	}
	return cs
}

// wireGuardStatus sums up the WireGuard device's peers; nil without one.
func (d *Daemon) wireGuardStatus() *api.WireGuardStatus {
	if d.plane == nil {
		return nil
	}
	ws := &api.WireGuardStatus{Port: d.cfg.WGPort, PublicKey: d.secure.Identity.Public.String()}
	st, err := d.plane.Stats()
	if err != nil {
		d.log.Warn("reading the WireGuard device", zap.Error(err))
		return ws
	}
	for _, p := range st {
		ws.Peers++
		if !p.LastHandshake.IsZero() {
			ws.Sessions++
		}
		ws.RxBytes += p.RxBytes
		ws.TxBytes += p.TxBytes
	}
	return ws
}

// planeCollector reports the WireGuard device's peers and bytes, read
// once per scrape.
type planeCollector struct {
	d            *Daemon
	peers, bytes *prometheus.Desc
}

func newPlaneCollector(d *Daemon) *planeCollector {
	return &planeCollector{d: d,
		peers: prometheus.NewDesc("overlayd_wireguard_peers", "Peers of the WireGuard data plane, by whether a handshake has completed (session) or not (waiting).", []string{"state"}, nil),
		bytes: prometheus.NewDesc("overlayd_wireguard_bytes_total", "Bytes the WireGuard data plane sent and received, counted by WireGuard (its headers included), for the peers it has now.", []string{"direction"}, nil),
	}
}

func (c *planeCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.peers; ch <- c.bytes }

func (c *planeCollector) Collect(ch chan<- prometheus.Metric) {
	ws := c.d.wireGuardStatus()
	ch <- prometheus.MustNewConstMetric(c.peers, prometheus.GaugeValue, float64(ws.Sessions), "session")
	ch <- prometheus.MustNewConstMetric(c.peers, prometheus.GaugeValue, float64(ws.Peers-ws.Sessions), "waiting")
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(ws.RxBytes), "received")
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(ws.TxBytes), "sent")
}
