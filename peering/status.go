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
	Overlay  string // "udp" for the plain data path
	MTU      int
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
