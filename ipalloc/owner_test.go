package ipalloc_test

import (
	"testing"

	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/ipalloc/ring"
	"github.com/overlayd/overlayd/proto"
)

// ownerNode is na with a ring shared by na, nb and nc, reaching both.
func ownerNode(t *testing.T) *ipalloc.Node {
	t.Helper()
	n, err := newNode(t, ipalloc.Config{Self: na, Universe: slash24, Mode: ipalloc.Seed, Seeds: []proto.PeerName{na, nb, nc}}, nil)
	must(t, err)
	n.SetReachable([]proto.PeerName{nb, nc})
	if d, _ := submit(t, n, ipalloc.Request{Op: ipalloc.OpAlloc, Ident: "x"}); d.Err != nil {
		t.Fatalf("alloc: %+v", d)
	}
	return n
}

// moved is n's ring with every entry of `from` given to `to`, versions
// raised by bump.
func moved(n *ipalloc.Node, from, to proto.PeerName, bump uint32) *proto.IPAMMsg {
	m := proto.IPAMMsg{Kind: proto.IPAMRing, Ring: n.Ring().Proto()}
	for i, e := range m.Ring.Entries {
		if e.Peer == from {
			m.Ring.Entries[i].Peer, m.Ring.Entries[i].Version = to, e.Version+bump
		}
	}
	return &m
}

// asked lists the peers n asked for their rings since the last Advance.
func asked(n *ipalloc.Node) []proto.PeerName {
	var out []proto.PeerName
	for _, m := range n.Ready().Msgs {
		if m.Kind == proto.IPAMRingRequest {
			out = append(out, m.To)
		}
	}
	n.Advance()
	return out
}

func size(n *ipalloc.Node, p proto.PeerName) uint64 {
	var t uint64
	for _, s := range n.Ring().OwnedBy(p) {
		t += s.Size()
	}
	return t
}

// TestOwnershipRules: a received ring moves space only as its owner
// could: a grant by the owner, or a takeover by the new owner of space
// of a peer we cannot reach. Others are skipped and counted, and the peer
// that may make the move is asked for its ring.
func TestOwnershipRules(t *testing.T) {
	t.Run("a third peer's space", func(t *testing.T) {
		n := ownerNode(t)
		asked(n)
		before := size(n, nc)
		must(t, n.Step(nb, moved(n, nc, nb, 1)))
		if size(n, nc) != before || n.Stats().NotOwner == 0 {
			t.Fatalf("nb took nc's space: nc owns %d (was %d), refused %d", size(n, nc), before, n.Stats().NotOwner)
		}
		if got := asked(n); len(got) != 1 || got[0] != nc {
			t.Fatalf("asked %v for their rings, want nc", got)
		}
		// The same ring from nc is its grant.
		must(t, n.Step(nc, moved(n, nc, nb, 1)))
		if size(n, nc) != 0 || size(n, nb) != 2*before {
			t.Fatalf("nc's grant to nb not taken: nb %d, nc %d", size(n, nb), size(n, nc))
		}
	})
	t.Run("our space", func(t *testing.T) {
		n := ownerNode(t)
		n.Advance()
		ours := size(n, na)
		taken := moved(n, na, nb, ring.TransferBump)
		must(t, n.Step(nb, taken))
		if size(n, na) != ours {
			t.Fatalf("nb took our space: we own %d, was %d", size(n, na), ours)
		}
		// A takeover of our space is answered with ours at versions
		// above it: a peer that took the takeover takes our answer.
		third, err := ring.FromProto(&taken.Ring, slash24)
		must(t, err)
		answered := false
		for _, m := range n.Ready().Msgs {
			if m.Kind == proto.IPAMRing && m.To == 0 {
				pm, err := proto.ParseIPAMMsg(m.Payload)
				must(t, err)
				_, err = third.Merge(&pm.Ring, pm.Partial)
				must(t, err)
				answered = true
			}
		}
		if !answered {
			t.Fatal("a takeover of our space not answered")
		}
		if got := third.OwnedBy(na); len(got) == 0 || got[0].Size() != ours {
			t.Fatalf("after our answer a third peer gives us %v, want %d addresses", got, ours)
		}
	})
	t.Run("takeover of an unreachable peer", func(t *testing.T) {
		n := ownerNode(t)
		before := size(n, nc)
		must(t, n.Step(nb, moved(n, nc, nb, ring.TransferBump)))
		if size(n, nc) != before {
			t.Fatal("nb took over nc while we reach nc")
		}
		n.SetReachable([]proto.PeerName{nb})
		must(t, n.Step(nb, moved(n, nc, nb, ring.TransferBump)))
		if size(n, nc) != 0 {
			t.Fatalf("nb's takeover of unreachable nc refused: nc still owns %d", size(n, nc))
		}
		// Not from a relay: only the new owner makes a takeover.
		n = ownerNode(t)
		n.SetReachable([]proto.PeerName{nb})
		must(t, n.Step(nb, moved(n, nc, na+10, ring.TransferBump)))
		if size(n, nc) != before {
			t.Fatal("a relay's takeover for another peer taken")
		}
	})
}
