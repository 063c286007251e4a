package topology

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/overlayd/overlayd/proto"
)

func node(t *testing.T, self proto.PeerName, uid uint64) *Node {
	t.Helper()
	n, err := New(Config{Self: self, UID: uid, Port: 6783, Rand: rand.New(rand.NewPCG(1, uid))})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func conn(p proto.PeerName, est bool) proto.TopoConn {
	return proto.TopoConn{Peer: p, Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 0, byte(p)}), 6783), Established: est}
}

func entry(name proto.PeerName, uid, version uint64, conns ...proto.TopoConn) proto.TopoPeer {
	return proto.TopoPeer{Name: name, UID: uid, Version: version, Port: 6783, Conns: conns}
}

func entries(es ...proto.TopoPeer) *proto.TopoMsg {
	return &proto.TopoMsg{Kind: proto.TopoEntries, Entries: es}
}

func TestMergeKeepsNewestAndIsIdempotent(t *testing.T) {
	n := node(t, 1, 100)
	n.SetLocal([]proto.TopoConn{conn(2, true)}, nil)
	n.Step(2, 200, entries(entry(2, 200, 3, conn(1, true), conn(3, true)), entry(3, 300, 5, conn(2, true))))
	h := n.Hash()
	// Older versions, duplicates and the same message again change nothing.
	n.Advance()
	n.Step(2, 200, entries(entry(3, 300, 4), entry(2, 200, 3, conn(1, true), conn(3, true))))
	if n.Hash() != h || n.Ready().Changed {
		t.Error("an old or repeated entry changed the node")
	}
	// Same version, higher UID wins (a tie between incarnations).
	n.Step(2, 200, entries(entry(3, 301, 5, conn(2, true))))
	if n.Peer(3).UID != 301 {
		t.Errorf("tie not broken by UID: %+v", n.Peer(3))
	}
	if got := n.Routes(); got[2] != 2 || got[3] != 2 {
		t.Errorf("routes %v", got)
	}
}

func TestImpersonationRefused(t *testing.T) {
	n := node(t, 1, 100)
	n.SetLocal([]proto.TopoConn{conn(2, true)}, nil)
	err := n.Step(2, 200, entries(entry(2, 666, 9, conn(1, true)), entry(3, 300, 1, conn(2, true))))
	if !errors.Is(err, ErrImpersonation) || n.Rejected != 1 {
		t.Fatalf("err %v, rejected %d", err, n.Rejected)
	}
	if n.Peer(2) != nil || n.Peer(3) == nil {
		t.Error("the forged entry was taken, or the good one dropped")
	}
}

// TestRestartedSelfBumpsPastOldIncarnation: an entry of our own name from an
// older incarnation makes us jump past its version.
func TestRestartedSelfBumpsPastOldIncarnation(t *testing.T) {
	n := node(t, 1, 100)
	n.SetLocal([]proto.TopoConn{conn(2, true)}, nil)
	n.Step(2, 200, entries(entry(1, 99, 40, conn(2, true))))
	if v := n.Peer(1).Version; v != 41 || n.Peer(1).UID != 100 {
		t.Errorf("our entry: %+v", n.Peer(1))
	}
}

// TestRoutesNeedBothEnds: a connection only one end reports established
// carries no route; paths are shortest, ties broken by name.
func TestRoutesNeedBothEnds(t *testing.T) {
	n := node(t, 1, 100)
	n.SetLocal([]proto.TopoConn{conn(2, true), conn(3, true)}, nil)
	n.Step(2, 200, entries(
		entry(2, 200, 1, conn(1, true), conn(4, true)),
		entry(3, 300, 1, conn(1, true), conn(4, true)),
		entry(4, 400, 1, conn(2, true), conn(3, true), conn(5, true)),
		entry(5, 500, 1, conn(4, false)), // 5 says pending: no route
	))
	r := n.Routes()
	if r[4] != 2 {
		t.Errorf("4 via %v, want 2 (lower of two equal paths)", r[4])
	}
	if _, ok := r[5]; ok {
		t.Errorf("route to 5 over a one-sided connection: %v", r)
	}
}

// TestGarbageCollection: a peer nobody reports a connection to is removed
// after two rounds, and copies of its old entry are not taken back; a new
// incarnation is.
func TestGarbageCollection(t *testing.T) {
	n := node(t, 1, 100)
	n.SetLocal([]proto.TopoConn{conn(2, true)}, nil)
	n.Step(2, 200, entries(entry(2, 200, 1, conn(1, true), conn(3, true)), entry(3, 300, 7, conn(2, true))))
	n.Step(2, 200, entries(entry(2, 200, 2, conn(1, true)))) // 2 lost 3
	n.Tick()
	if n.Peer(3) == nil {
		t.Fatal("removed after one round")
	}
	n.Tick()
	if n.Peer(3) != nil || len(n.Ready().Removed) != 1 {
		t.Fatalf("3 not removed: %+v", n.Ready())
	}
	n.Step(2, 200, entries(entry(3, 300, 7, conn(2, true))))
	if n.Peer(3) != nil {
		t.Error("a copy of the removed entry came back")
	}
	n.Step(2, 200, entries(entry(3, 301, 1), entry(2, 200, 3, conn(1, true), conn(3, true))))
	if n.Peer(3) == nil {
		t.Error("the new incarnation was refused")
	}
}

// TestAntiEntropy: two nodes that missed each other's news find out through
// the hash and digests, and end with the same hash.
func TestAntiEntropy(t *testing.T) {
	a, b := node(t, 1, 100), node(t, 2, 200)
	a.SetLocal([]proto.TopoConn{conn(2, true)}, nil)
	b.SetLocal([]proto.TopoConn{conn(1, true)}, nil)
	b.Step(1, 100, entries(entry(9, 900, 1, conn(2, true)))) // only b knows 9
	a.Advance()
	b.Advance()
	a.Step(2, 200, &proto.TopoMsg{Kind: proto.TopoHash, Count: uint32(b.Len()), Hash: b.Hash()})
	for range 10 {
		moved := false
		for _, pair := range [][2]*Node{{a, b}, {b, a}} {
			from, to := pair[0], pair[1]
			rd := from.Ready()
			from.Advance()
			for _, m := range rd.Msgs {
				moved = true
				to.Step(from.cfg.Self, from.cfg.UID, &m.Msg)
			}
		}
		if !moved {
			break
		}
	}
	if a.Hash() != b.Hash() || a.Peer(9) == nil || b.Peer(1) == nil {
		t.Errorf("not in sync: a %d peers, b %d peers", a.Len(), b.Len())
	}
}

func TestCandidatesAndDiscover(t *testing.T) {
	n := node(t, 1, 100)
	n.SetLocal([]proto.TopoConn{conn(2, true)}, nil)
	n.Step(2, 200, entries(entry(2, 200, 1, conn(1, true), conn(3, true), conn(4, true)),
		entry(3, 300, 1, conn(2, true)), entry(4, 400, 1, conn(2, true))))
	c := n.Candidates()
	if len(c) != 2 || c[0].Name != 3 || c[1].Name != 4 || c[0].Addr != netip.MustParseAddrPort("10.0.0.3:6783") {
		t.Errorf("candidates %+v", c)
	}
	r := rand.New(rand.NewPCG(1, 2))
	if got := Discover(c, 0, 4, 0, r); len(got) != 2 {
		t.Errorf("unlimited: %v", got)
	}
	if got := Discover(c, 99, 50, 200, r); len(got) != 1 {
		t.Errorf("one left under half the limit: %v", got)
	}
	if got := Discover(c, 47, 1000, 200, r); len(got) != 1 {
		t.Errorf("1,000 peers: want degree 48, one left: %v", got)
	}
	if Admit(179, 200, false) != true || Admit(180, 200, false) || !Admit(199, 200, true) || Admit(200, 200, true) {
		t.Error("Admit")
	}
}

// TestLargeStateGoesInBoundedMessages: a digest answer with thousands of
// entries is split into entries messages of at most MaxEntriesBytes.
func TestLargeStateGoesInBoundedMessages(t *testing.T) {
	n := node(t, 1, 100)
	n.SetLocal([]proto.TopoConn{conn(2, true)}, nil)
	var es []proto.TopoPeer
	conns := []proto.TopoConn{conn(1, true)}
	for i := range 3000 {
		es = append(es, entry(proto.PeerName(1000+i), uint64(1000+i), 1, conns...))
	}
	es = append(es, entry(2, 200, 1, conn(1, true)))
	n.Step(2, 200, entries(es...))
	n.Advance()
	n.Step(3, 300, &proto.TopoMsg{Kind: proto.TopoDigestRequest})
	msgs, total := 0, 0
	for _, m := range n.Ready().Msgs {
		if m.Msg.Kind == proto.TopoEntries {
			msgs++
			total += len(m.Msg.Entries)
			if size := proto.TopoMsgSize(&m.Msg); size > MaxEntriesBytes {
				t.Errorf("a message of %d bytes", size)
			}
		}
	}
	if total != n.Len() || msgs < 2 {
		t.Errorf("%d entries in %d messages, want all %d in several", total, msgs, n.Len())
	}
	// A second digest request in the same round is not answered.
	n.Advance()
	n.Step(3, 300, &proto.TopoMsg{Kind: proto.TopoDigestRequest})
	if len(n.Ready().Msgs) != 0 {
		t.Error("answered twice in one round")
	}
}

// TestVersionsCannotWrap: an entry at the version limit is skipped on
// receipt (the rest of its message stands), and a copy of our own entry
// just under it does not push ours to a version others would skip.
func TestVersionsCannotWrap(t *testing.T) {
	b, _ := proto.AppendTopoMsg(nil, entries(entry(1, 99, proto.MaxTopoVersion, conn(2, true)), entry(3, 7, 5, conn(2, true))))
	m, err := proto.ParseTopoMsg(b)
	if err != nil || m.Skipped != 1 || len(m.Entries) != 1 || m.Entries[0].Name != 3 {
		t.Fatalf("%+v, %v: want the entry at 2^62 skipped and the other kept", m, err)
	}
	n := node(t, 1, 100)
	before := n.Peer(1).Version
	err = n.Step(2, 200, &proto.TopoMsg{Kind: proto.TopoEntries, Entries: []proto.TopoPeer{entry(1, 99, proto.MaxTopoVersion-1)}})
	if err == nil || n.Peer(1).Version != before || n.Rejected != 1 {
		t.Errorf("a copy of ours at 2^62-1: %v, version %d (was %d), rejected %d", err, n.Peer(1).Version, before, n.Rejected)
	}
	n.Step(2, 200, &m)
	if n.Rejected != 2 || n.Peer(3) == nil {
		t.Errorf("rejected %d, entry of 3 %v", n.Rejected, n.Peer(3))
	}
}
