package routes

import (
	"cmp"
	"net/netip"
	"slices"

	"github.com/overlayd/overlayd/internal/ipv4"
)

// An Owner is the peer that owns a prefix of the allocation range.
type Owner[K any] struct {
	Prefix netip.Prefix
	Peer   K
}

// An Announcement is the prefixes a peer says it serves: its exposed
// addresses and the addresses outside the range held there.
type Announcement[K any] struct {
	Peer     K
	Prefixes []netip.Prefix
}

// Sources are what a route table is built from. K names peers (ordered, so
// that every host breaks ties alike); V is where packets go.
type Sources[K cmp.Ordered, V any] struct {
	Self      K
	Local     []netip.Prefix    // prefixes this host serves
	Owners    []Owner[K]        // the allocation ring
	Announced []Announcement[K] // what peers announce (Self's are ignored)
	Here      V                 // where packets for this host go
	// Path says where packets for a peer go, and false when no path
	// reaches it.
	Path func(K) (V, bool)
}

// Build makes the table. The longest prefix always wins; for the same
// prefix the first of these does:
//
//  1. a prefix this host serves (Local);
//  2. the ring's owner (Here when it is Self);
//  3. an announcement, the peer with the lowest name first.
//
// An announced prefix that meets ring space owned by another peer is left
// out (and counted in the table's Refused): inside the range a peer may
// announce only addresses it owns (an exposed address is claimed, hence
// owned, by the peer that exposes it), so that no peer can draw another's
// traffic to itself. So is any announcement but a single IPv4 address
// (/32): peers announce their exposed and manual addresses one by one,
// and a wider prefix could draw whole networks outside the range.
//
// A route to an unreachable peer is left out, so the next in line may take
// its prefix. Build does not keep s's slices.
func Build[K cmp.Ordered, V any](s Sources[K, V]) *Table[V] {
	var rs []Route[V]
	for _, p := range s.Local {
		rs = append(rs, Route[V]{Prefix: p, Via: s.Here})
	}
	for _, o := range s.Owners {
		if o.Peer == s.Self {
			rs = append(rs, Route[V]{Prefix: o.Prefix, Via: s.Here})
		} else if v, ok := s.Path(o.Peer); ok {
			rs = append(rs, Route[V]{Prefix: o.Prefix, Via: v})
		}
	}
	owners := slices.Clone(s.Owners)
	slices.SortFunc(owners, func(a, b Owner[K]) int { return a.Prefix.Addr().Compare(b.Prefix.Addr()) })
	ann := slices.Clone(s.Announced)
	slices.SortStableFunc(ann, func(a, b Announcement[K]) int { return cmp.Compare(a.Peer, b.Peer) })
	refused := 0
	for _, a := range ann {
		if a.Peer == s.Self {
			continue
		}
		if v, ok := s.Path(a.Peer); ok {
			for _, p := range a.Prefixes {
				if p.Bits() != 32 || ownedByOther(owners, p, a.Peer) {
					refused++
					continue
				}
				rs = append(rs, Route[V]{Prefix: p, Via: v})
			}
		}
	}
	t := New(rs)
	t.Refused = refused
	return t
}

// ownedByOther reports whether p meets a prefix of owners (sorted by
// address) whose owner is not peer.
func ownedByOther[K comparable](owners []Owner[K], p netip.Prefix, peer K) bool {
	first, end := ipv4.Bounds(p)
	for _, o := range owners {
		start, oend := ipv4.Bounds(o.Prefix)
		if uint64(start) >= end {
			return false // this one and the rest start after p
		}
		if oend > uint64(first) && o.Peer != peer {
			return true
		}
	}
	return false
}
