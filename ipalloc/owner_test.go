package ipalloc_test

import (
	"fmt"
	"testing"

	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/ipalloc/ipalloctest"
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
		// above it (TestTakeoverResolved follows it to the end: the peer
		// that took it over yields, and the others follow that peer).
		over := map[uint32]uint32{}
		for _, e := range taken.Ring.Entries {
			if e.Peer == nb {
				over[e.Token] = e.Version
			}
		}
		answered := 0
		for _, m := range n.Ready().Msgs {
			if m.Kind != proto.IPAMRing || m.To != 0 {
				continue
			}
			pm, err := proto.ParseIPAMMsg(m.Payload)
			must(t, err)
			for _, e := range pm.Ring.Entries {
				if v, ok := over[e.Token]; ok && e.Peer == na && e.Version > v {
					answered++
				}
			}
		}
		if answered == 0 {
			t.Fatal("a takeover of our space not answered with ours at a higher version")
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

// TestTakeoverResolved: space taken over by rmpeer settles on one owner
// when the peers meet again, however long they were apart: the peer taken
// over, if it was alive after all, wins its space back; of two peers that
// took over the same dead peer on both sides of a partition, the ring's
// order picks one. Before they meet each side uses the space (that is
// what rmpeer of a live peer costs), so the checks run only after.
func TestTakeoverResolved(t *testing.T) {
	const apart = 20 + 600 + 50 // settle, MaxHoldTicks, and more
	// Checked only at the end: apart, both sides use the space, and
	// until the rings meet so do they.
	runApart := func(s *ipalloctest.Sim) {
		for range apart {
			must(t, s.Run(1))
		}
	}
	t.Run("the peer taken over was alive", func(t *testing.T) {
		s := ipalloctest.New(31, slash24)
		for _, p := range []proto.PeerName{na, nb, nc} {
			must(t, s.Add(p, seeded(na, nb, nc)))
		}
		run(t, s, 2)
		for _, p := range []proto.PeerName{na, nb, nc} {
			alloc(t, s, p, fmt.Sprint(p, "-0"))
		}
		theirs := size(s.Peer(nc).Node, nc)
		s.Partition(func(p proto.PeerName) int { return b2i(p == nc) })
		step(t, s)
		if d := do(t, s, na, ipalloc.Request{Op: ipalloc.OpRmPeer, Peer: nc}); d.Err != nil || d.Taken != theirs {
			t.Fatalf("rmpeer: %+v, want %d taken", d, theirs)
		}
		runApart(s)
		s.Heal()
		runApart(s)
		must(t, s.Converged())
		must(t, s.Check())
		if got := size(s.Peer(na).Node, nc); got != theirs {
			t.Fatalf("nc owns %d after it came back, want its %d", got, theirs)
		}
		if n := s.Peer(nc).Node.Stats(); n.NotOwner == 0 {
			t.Error("nc took na's takeover of its space: the test no longer tests the return")
		}
	})
	t.Run("two takeovers apart", func(t *testing.T) {
		nd := ipalloctest.Name(4)
		s := ipalloctest.New(32, slash24)
		all := []proto.PeerName{na, nb, nc, nd}
		for _, p := range all {
			must(t, s.Add(p, seeded(all...)))
		}
		run(t, s, 2)
		for _, p := range all {
			alloc(t, s, p, fmt.Sprint(p, "-0"))
		}
		dead := size(s.Peer(na).Node, nd)
		s.Stop(nd)
		s.Partition(func(p proto.PeerName) int { return b2i(p == na) })
		step(t, s)
		for _, p := range []proto.PeerName{na, nb} {
			if d := do(t, s, p, ipalloc.Request{Op: ipalloc.OpRmPeer, Peer: nd}); d.Err != nil || d.Taken != dead {
				t.Fatalf("rmpeer on %v: %+v, want %d taken", p, d, dead)
			}
		}
		runApart(s)
		s.Heal()
		runApart(s)
		must(t, s.Converged())
		must(t, s.Check())
		owner := s.Peer(na).Node.Ring().Owner(s.Peer(na).Node.Ring().OwnedBy(na)[0].Start)
		if size(s.Peer(na).Node, nd) != 0 || owner != na {
			t.Fatalf("nd still owns %d; owner of na's first span %v", size(s.Peer(na).Node, nd), owner)
		}
	})
}

// TestHeldSpaceNotStolen: while a takeover is held, a relay cannot give
// the space to another peer, nor take it under its own name with a
// version far above a takeover's.
func TestHeldSpaceNotStolen(t *testing.T) {
	nd := ipalloctest.Name(4)
	n := ownerNode(t)
	n.SetReachable([]proto.PeerName{nb})
	if d, _ := submit(t, n, ipalloc.Request{ID: 7, Op: ipalloc.OpRmPeer, Peer: nc}); d.Err != nil || d.Taken == 0 {
		t.Fatalf("rmpeer: %+v", d)
	}
	ours := size(n, na)
	for _, m := range []struct {
		to   proto.PeerName
		bump uint32
	}{{nd, 1}, {nd, 0}, {nb, ring.TransferBump}} {
		refused := n.Stats().NotOwner
		must(t, n.Step(nb, moved(n, na, m.to, m.bump)))
		if size(n, na) != ours || n.Stats().NotOwner == refused {
			t.Fatalf("ring from nb giving our held space to %v at +%d: we own %d (was %d), refused %d",
				m.to, m.bump, size(n, na), ours, n.Stats().NotOwner-refused)
		}
	}
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}
