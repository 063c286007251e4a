package ipalloc

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"

	"github.com/overlayd/overlayd/internal/ipv4"
	"github.com/overlayd/overlayd/ipalloc/ring"
	"github.com/overlayd/overlayd/proto"
)

// The status texts of WEAVE.md §1.5, verbatim.
const (
	StatusIdle        = "idle"
	StatusPriming     = "priming"
	StatusReady       = "ready"
	StatusWaiting     = "waiting for IP(s) to become available"
	StatusUnreachable = "all IP ranges owned by unreachable peers - use 'rmpeer' if they are dead"
)

// Status is the allocator's state for people and scripts.
type Status struct {
	Status        string // one of the texts above, or "awaiting consensus (quorum: q, known: k)"
	Range         netip.Prefix
	DefaultSubnet netip.Prefix
	Mode          Mode
	Quorum        int // Consensus mode
	Known         int // voters heard of while awaiting consensus
	Seeds         []proto.PeerName
	Owners        []OwnerStatus // self first, then by name; empty while the ring is
	Entries       []EntryStatus
	Owned         []Owned // addresses held here, by ID
	Active        int     // of those, inside the range
	PendingAllocs int
	PendingClaims int
	Stats         Stats
	Lost          []Lost // the last addresses given up (see Ready.Lost), oldest first
}

// OwnerStatus is one peer's share of the range.
type OwnerStatus struct {
	Peer      proto.PeerName
	Nickname  string // the last known; "" if never known
	Size      uint64
	Reachable bool // it is us, or the router reaches it
}

// EntryStatus is one ring token.
type EntryStatus struct {
	Token    netip.Addr
	Size     uint64
	Peer     proto.PeerName
	Nickname string // the last known; "" if never known
	Version  uint32
	Free     uint32
}

// Status reports the Node's state.
func (n *Node) Status() Status {
	st := Status{Range: n.cfg.Universe, DefaultSubnet: n.cfg.DefaultSubnet, Mode: n.cfg.Mode,
		Seeds: n.ring.Seeds(), Stats: n.stats, Lost: slices.Clone(n.lost), Owners: []OwnerStatus{}, Entries: []EntryStatus{}, Owned: []Owned{}}
	if n.paxos != nil {
		st.Quorum, st.Known = n.paxos.Quorum(), n.paxos.Known()
	}
	for _, p := range n.pend {
		if p.req.Op == OpClaim {
			st.PendingClaims++
		} else if p.req.Op == OpAlloc {
			st.PendingAllocs++
		}
	}
	sizes := map[proto.PeerName]uint64{}
	entries, lens := n.ring.Entries()
	for i, e := range entries {
		st.Entries = append(st.Entries, EntryStatus{Token: ipv4.Addr(e.Token), Size: lens[i], Peer: e.Peer, Nickname: n.nicks[e.Peer],
			Version: e.Version, Free: e.Free})
		if lens[i] > 0 {
			sizes[e.Peer] += lens[i]
		}
	}
	allUnreachable := len(sizes) > 0
	for p, size := range sizes {
		reach := p == n.cfg.Self || n.reach[p]
		allUnreachable = allUnreachable && !reach
		st.Owners = append(st.Owners, OwnerStatus{Peer: p, Nickname: n.nicks[p], Size: size, Reachable: reach})
	}
	slices.SortFunc(st.Owners, func(a, b OwnerStatus) int {
		switch {
		case a.Peer == n.cfg.Self:
			return -1
		case b.Peer == n.cfg.Self:
			return 1
		}
		return cmp.Compare(a.Peer, b.Peer)
	})
	for _, id := range slices.Sorted(maps.Keys(n.owned)) {
		for _, a := range n.owned[id] {
			st.Owned = append(st.Owned, Owned{Ident: id, Addr: a})
		}
	}
	st.Active = len(n.used)
	switch {
	case !n.ring.Empty() && allUnreachable:
		st.Status = StatusUnreachable
	case !n.ring.Empty() && st.PendingAllocs+st.PendingClaims > 0:
		st.Status = StatusWaiting
	case !n.ring.Empty():
		st.Status = StatusReady
	case n.awaiting && n.paxos != nil:
		st.Status = fmt.Sprintf("awaiting consensus (quorum: %d, known: %d)", st.Quorum, st.Known)
	case n.awaiting:
		st.Status = StatusPriming
	default:
		st.Status = StatusIdle
	}
	return st
}

// Ring returns a copy of the ring (for tests and the simulator).
func (n *Node) Ring() *ring.Ring { return n.ring.Clone() }

// Allocations returns the in-range addresses held here, by address.
func (n *Node) Allocations() map[netip.Addr]string {
	out := make(map[netip.Addr]string, len(n.holder))
	for v, id := range n.holder {
		out[ipv4.Addr(v)] = id
	}
	return out
}

// Check verifies the Node's invariants: a valid ring, and every in-range
// allocation inside space the ring says is ours.
func (n *Node) Check() error {
	if err := n.ring.Check(); err != nil {
		return err
	}
	if len(n.used) != len(n.holder) {
		return fmt.Errorf("ipalloc: %d used addresses for %d holders", len(n.used), len(n.holder))
	}
	for _, v := range n.used {
		if n.ring.Owner(v) != n.cfg.Self {
			return fmt.Errorf("ipalloc: %v allocated to %s in space owned by %v", ipv4.Addr(v), n.holder[v], n.ring.Owner(v))
		}
	}
	return nil
}

// Usable returns the space this peer may allocate from: what the ring says
// it owns, minus space taken over by rmpeer that has not settled.
func (n *Node) Usable() []ring.Span { return subtract(n.ring.OwnedBy(n.cfg.Self), n.holds) }

// HasRing reports whether the ring is initialised here.
func (n *Node) HasRing() bool { return !n.ring.Empty() }
