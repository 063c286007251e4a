package peering

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/overlayd/overlayd/peering/link"
	"github.com/overlayd/overlayd/peering/routes"
	"github.com/overlayd/overlayd/proto"
)

// Status is the router's state as the control API reports it.
type Status struct {
	Name               proto.PeerName `json:"name"`
	Nickname           string         `json:"nickname"`
	UID                uint64         `json:"uid"`
	Port               uint16         `json:"port"`
	ProtocolMinVersion uint8          `json:"protocolMinVersion"`
	ProtocolMaxVersion uint8          `json:"protocolMaxVersion"`
	Encryption         bool           `json:"encryption"`
	PeerDiscovery      bool           `json:"peerDiscovery"`
	ConnLimit          int            `json:"connLimit"`
	MTU                int            `json:"mtu"`
	Targets            []string       `json:"targets"`
	Connections        []ConnStatus   `json:"connections"`
	Peers              []PeerStatus   `json:"peers"`
	Routes             []RouteStatus  `json:"routes"`
	Exposed            []netip.Prefix `json:"exposed"`
	// GossipPartial is the number of chunked gossip messages waiting for
	// their missing chunks (bounded by peering/gossip.MaxPartial).
	GossipPartial int           `json:"gossipPartial"`
	Stats         StatsSnapshot `json:"stats"`
}

// ConnStatus is one line of `status connections`: a connection, or a target
// without one.
type ConnStatus struct {
	Address  string         `json:"address"`
	Outbound bool           `json:"outbound"`
	State    string         `json:"state"` // connecting, retrying, failed, pending, established
	Info     string         `json:"info"`  // the error of a failed target
	RetryAt  *time.Time     `json:"retryAt,omitempty"`
	Name     proto.PeerName `json:"name,omitempty"`
	Nickname string         `json:"nickname,omitempty"`
	Overlay  string         `json:"overlay,omitempty"` // "udp" for the plain data path
	MTU      int            `json:"mtu,omitempty"`
}

// PeerStatus is a peer we know, with the connections it has.
type PeerStatus struct {
	Name        proto.PeerName   `json:"name"`
	Nickname    string           `json:"nickname"`
	UID         uint64           `json:"uid"`
	Connections []PeerConnStatus `json:"connections"`
}

// PeerConnStatus is one connection of a peer.
type PeerConnStatus struct {
	Name        proto.PeerName `json:"name"`
	Nickname    string         `json:"nickname"`
	Address     string         `json:"address"`
	Outbound    bool           `json:"outbound"`
	Established bool           `json:"established"`
}

// RouteStatus is one entry of the route table.
type RouteStatus struct {
	Prefix  netip.Prefix   `json:"prefix"`
	Via     proto.PeerName `json:"via"`               // the peer that serves it
	NextHop proto.PeerName `json:"nextHop,omitempty"` // the relay, when not Via itself
	Local   bool           `json:"local,omitempty"`
}

// StatsSnapshot is a copy of Stats.
type StatsSnapshot struct {
	TunPackets      uint64 `json:"tunPackets"`
	SentPackets     uint64 `json:"sentPackets"`
	SentBytes       uint64 `json:"sentBytes"`
	ReceivedPackets uint64 `json:"receivedPackets"`
	ReceivedBytes   uint64 `json:"receivedBytes"`
	DropUnroutable  uint64 `json:"dropUnroutable"`
	DropSendError   uint64 `json:"dropSendError"`
	DropUnknownPeer uint64 `json:"dropUnknownPeer"`
	DropNotForUs    uint64 `json:"dropNotForUs"`
	DropMalformed   uint64 `json:"dropMalformed"`
	DropCtrlQueue   uint64 `json:"dropCtrlQueue"`
	DropTunWrite    uint64 `json:"dropTunWrite"`
	DropTunRead     uint64 `json:"dropTunRead"`
	DropHops        uint64 `json:"dropHops"`
	RelayedPackets  uint64 `json:"relayedPackets"`
	RelayedBytes    uint64 `json:"relayedBytes"`

	GossipSentBytes      uint64 `json:"gossipSentBytes"`
	GossipReceivedBytes  uint64 `json:"gossipReceivedBytes"`
	GossipRejected       uint64 `json:"gossipRejected"`
	GossipUnknownChannel uint64 `json:"gossipUnknownChannel"`
	GossipRelayed        uint64 `json:"gossipRelayed"`
	OtherSentBytes       uint64 `json:"otherGossipSentBytes"`
	OtherReceivedBytes   uint64 `json:"otherGossipReceivedBytes"`
	// DecodeErrors counts undecodable datagrams by type ("header" for a bad
	// header).
	DecodeErrors map[string]uint64 `json:"decodeErrors"`
}

func (s *Stats) snapshot() StatsSnapshot {
	snap := StatsSnapshot{
		TunPackets: s.TunPackets.Load(), SentPackets: s.SentPackets.Load(), SentBytes: s.SentBytes.Load(),
		ReceivedPackets: s.ReceivedPackets.Load(), ReceivedBytes: s.ReceivedBytes.Load(),
		DropUnroutable: s.DropUnroutable.Load(), DropSendError: s.DropSendError.Load(),
		DropUnknownPeer: s.DropUnknownPeer.Load(), DropNotForUs: s.DropNotForUs.Load(),
		DropMalformed: s.DropMalformed.Load(), DropCtrlQueue: s.DropCtrlQueue.Load(),
		DropTunWrite: s.DropTunWrite.Load(), DropTunRead: s.DropTunRead.Load(),
		DropHops: s.DropHops.Load(), RelayedPackets: s.RelayedPackets.Load(), RelayedBytes: s.RelayedBytes.Load(),
		GossipSentBytes: s.GossipSentBytes.Load(), GossipReceivedBytes: s.GossipReceivedBytes.Load(),
		GossipRejected: s.GossipRejected.Load(), GossipUnknownChannel: s.GossipUnknownChannel.Load(),
		GossipRelayed: s.GossipRelayed.Load(), DecodeErrors: map[string]uint64{},
		OtherSentBytes: s.OtherSentBytes.Load(), OtherReceivedBytes: s.OtherReceivedBytes.Load(),
	}
	for t := range s.DecodeErrors {
		name := "header"
		if t > 0 {
			name = proto.Type(t).String()
		}
		snap.DecodeErrors[name] = s.DecodeErrors[t].Load()
	}
	return snap
}

// Status reports the router's state. It waits for the control loop, so it
// fails only when ctx ends first.
func (r *Router) Status(ctx context.Context) (Status, error) {
	var st Status
	err := r.do(ctx, func(c *control) { st = c.status() })
	return st, err
}

// status turns the cores' views into the API's, with wall-clock times.
func (c *control) status() Status {
	r := c.r
	ls := c.m.Status()
	cfg := &r.cfg
	st := Status{
		Name: cfg.Name, Nickname: cfg.Nickname, UID: cfg.UID, Port: r.port,
		ProtocolMinVersion: proto.MinVersion, ProtocolMaxVersion: proto.MaxVersion,
		PeerDiscovery: cfg.Discovery, ConnLimit: cfg.ConnLimit,
		MTU: cfg.MTU, Targets: nonNil(ls.Targets), Exposed: nonNil(slices.Clone(c.local)),
		Connections: []ConnStatus{}, Routes: []RouteStatus{}, Stats: r.stats.snapshot(),
		GossipPartial: c.asm.Pending(),
	}
	now := time.Now()
	for _, c := range ls.Connections {
		cs := ConnStatus{Address: c.Address, Outbound: c.Outbound, State: c.State, Name: c.Name, Nickname: c.Nickname}
		if c.Err != nil {
			cs.Info = c.Err.Error()
		}
		switch {
		case c.State == "failed" && c.RetryNever:
			cs.Info += ", retry: never"
		case c.State == "failed":
			at := now.Add(r.ticks(c.RetryTicks))
			cs.RetryAt = &at
			cs.Info += ", retry: " + at.Format("2006-01-02 15:04:05")
		}
		if c.Name != 0 && c.State != "connecting" && c.State != "retrying" {
			cs.Overlay, cs.MTU = "udp", cfg.MTU
		}
		st.Connections = append(st.Connections, cs)
	}
	// Every peer the topology knows, ourselves first, with the
	// connections it reports.
	peers := c.topo.Peers()
	slices.SortStableFunc(peers, func(a, b *proto.TopoPeer) int {
		switch {
		case a.Name == cfg.Name:
			return -1
		case b.Name == cfg.Name:
			return 1
		}
		return 0
	})
	for _, e := range peers {
		ps := PeerStatus{Name: e.Name, Nickname: e.Nickname, UID: e.UID, Connections: []PeerConnStatus{}}
		for _, cn := range e.Conns {
			nick := ""
			if other := c.topo.Peer(cn.Peer); other != nil {
				nick = other.Nickname
			}
			ps.Connections = append(ps.Connections, PeerConnStatus{Name: cn.Peer, Nickname: nick,
				Address: cn.Addr.String(), Outbound: cn.Outbound, Established: cn.Established})
		}
		st.Peers = append(st.Peers, ps)
	}
	snap := r.snap.Load()
	for _, rt := range snap.routes.Routes() {
		rs := RouteStatus{Prefix: rt.Prefix, Via: rt.Via.name, Local: rt.Via.local}
		if rt.Via.relayed {
			if nb, ok := snap.peers[rt.Via.ep.Remote]; ok {
				rs.NextHop = nb.name
			}
		}
		st.Routes = append(st.Routes, rs)
	}
	return st
}

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

// Connect adds targets (HOST[:PORT]) and dials them at once. A target we
// already have has its back-off reset. Nothing is added if any address is
// malformed.
func (r *Router) Connect(ctx context.Context, addrs []string) error {
	var err error
	if derr := r.do(ctx, func(c *control) { err = c.m.Connect(addrs) }); derr != nil {
		return derr
	}
	return err
}

// ErrUnknownTarget is returned by Forget for an address that is not a target.
var ErrUnknownTarget = link.ErrUnknownTarget

// Forget removes targets and closes their connections. It fails, changing
// nothing, if an address is malformed or not a target.
func (r *Router) Forget(ctx context.Context, addrs []string) error {
	var err error
	if derr := r.do(ctx, func(c *control) { err = c.m.Forget(addrs) }); derr != nil {
		return derr
	}
	return err
}

// SetLocal replaces the prefixes this host serves (its exposed addresses)
// and announces them to every peer. It does not wait for the control loop:
// the latest call wins, and the router's status and routes show it from
// the next call that reads them.
func (r *Router) SetLocal(prefixes []netip.Prefix) error {
	ps := slices.Clone(prefixes)
	for _, p := range ps {
		if !p.IsValid() || !p.Addr().Is4() {
			return fmt.Errorf("peering: cannot serve %v: only IPv4 prefixes", p)
		}
	}
	if len(ps) > proto.MaxPrefixes {
		return fmt.Errorf("peering: cannot serve more than %d prefixes", proto.MaxPrefixes)
	}
	slices.SortFunc(ps, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	if ps == nil {
		ps = []netip.Prefix{} // none: not "nothing pending"
	}
	r.pendMu.Lock()
	r.pendLocal = ps
	r.pendMu.Unlock()
	r.poke()
	return nil
}

// Owner says which peer owns a part of the allocation range.
type Owner = routes.Owner[proto.PeerName]

// SetOwners replaces the allocator's view of who owns the range: packets
// for an address go to its owner (a prefix a peer announces, such as an
// exposed address, is more specific and wins). Like SetLocal, it does not
// wait.
func (r *Router) SetOwners(owners []Owner) error {
	own := slices.Clone(owners)
	for _, o := range own {
		if !o.Prefix.IsValid() || !o.Prefix.Addr().Is4() || o.Peer == 0 {
			return fmt.Errorf("peering: bad owner %v of %v", o.Peer, o.Prefix)
		}
	}
	if own == nil {
		own = []Owner{}
	}
	r.pendMu.Lock()
	r.pendOwners = own
	r.pendMu.Unlock()
	r.poke()
	return nil
}

// poke wakes the control loop.
func (r *Router) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Reachable returns the peers the router can send to now, directly or
// through others.
func (r *Router) Reachable() []proto.PeerName {
	snap := r.snap.Load()
	out := make([]proto.PeerName, 0, len(snap.byName))
	for name := range snap.byName {
		out = append(out, name)
	}
	slices.Sort(out)
	return out
}

// Nickname returns the nickname of a reachable peer, "" if it is not
// reachable or its topology entry has not arrived.
func (r *Router) Nickname(p proto.PeerName) string {
	if snap := r.snap.Load(); snap != nil {
		return snap.nicks[p]
	}
	return ""
}

// ParseTarget checks a peer address given as HOST, HOST:PORT, [IPv6] or
// [IPv6]:PORT and returns its host and port.
func ParseTarget(s string) (host string, port uint16, err error) { return link.ParseTarget(s) }
