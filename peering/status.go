package peering

import (
	"context"
	"net/netip"
	"slices"
	"time"

	"github.com/overlayd/overlayd/proto"
)

// Status is what the router knows at one moment: its targets and
// connections, the peers of the topology, and the route table. Its
// configuration and its counters (Stats) are read elsewhere.
type Status struct {
	Targets     []string
	Connections []ConnStatus
	Peers       []PeerStatus // ourselves first
	Routes      []RouteStatus
	Exposed     []netip.Prefix // the prefixes SetLocal gave
	// GossipPartial is the number of chunked gossip messages waiting for
	// their missing chunks (bounded by peering/gossip.MaxPartial).
	GossipPartial int
	// Encryption says password mode is on; Refused then counts what it
	// refused, by reason (link.SealedStats).
	Encryption bool
	Refused    map[string]uint64
	// TrustedSubnets are the subnets whose peers may send data in clear.
	TrustedSubnets []netip.Prefix
	// RefusedAnnouncements is the number of prefixes peers announce in
	// ring space another peer owns, or wider than one address, left out
	// of the route table.
	RefusedAnnouncements int
	// Unproven counts what the handshake did not answer or take from
	// unproven addresses (link.Machine.Unproven); Impostors, gossip
	// claiming another peer's name (link.Machine.Impostors).
	Unproven, Impostors uint64
}

// ConnStatus is a connection, or a target without one.
type ConnStatus struct {
	Address  string
	Outbound bool
	State    string // connecting, retrying, failed, pending, established
	Info     string // the error of a failed target, with when it is retried
	RetryAt  *time.Time
	Name     proto.PeerName
	Nickname string
	// Overlay is what carries the data: "udp" (the router, in clear) or
	// "wg" (the WireGuard plane, encrypted).
	Overlay string
	MTU     int
}

// PeerStatus is a peer we know, with the connections it reports.
type PeerStatus struct {
	Name        proto.PeerName
	Nickname    string
	UID         uint64
	Connections []PeerConnStatus
}

// PeerConnStatus is one connection of a peer.
type PeerConnStatus struct {
	Name        proto.PeerName
	Nickname    string
	Address     string
	Outbound    bool
	Established bool
}

// RouteStatus is one entry of the route table.
type RouteStatus struct {
	Prefix  netip.Prefix
	Via     proto.PeerName // the peer that serves it
	NextHop proto.PeerName // the relay, when not Via itself
	Local   bool
}

// Stats returns the router's counters, updated atomically as it works.
func (r *Router) Stats() *Stats { return &r.stats }

// DecodeErrorCounts breaks DropMalformed down by message type, named as
// proto names them ("header" for a bad header).
func (s *Stats) DecodeErrorCounts() map[string]uint64 {
	out := make(map[string]uint64, len(s.DecodeErrors))
	for t := range s.DecodeErrors {
		name := "header"
		if t > 0 {
			name = proto.Type(t).String()
		}
		out[name] = s.DecodeErrors[t].Load()
	}
	return out
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
		Targets: nonNil(ls.Targets), Exposed: nonNil(slices.Clone(c.local)),
		Connections: []ConnStatus{}, Routes: []RouteStatus{}, GossipPartial: c.asm.Pending(),
		Encryption: c.m.Secure(), RefusedAnnouncements: c.refused, TrustedSubnets: nonNil(slices.Clone(cfg.TrustedSubnets)),
		Unproven: c.m.Unproven, Impostors: c.m.Impostors,
	}
	if st.Encryption {
		st.Refused = c.m.Sealed.ByReason()
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
			if cfg.DataPlane != nil && !c.Plaintext {
				cs.Overlay = "wg"
			}
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
