package names_test

import (
	"testing"

	"github.com/overlayd/overlayd/names"
	"github.com/overlayd/overlayd/proto"
)

// TestFromOriginOnly: without signatures, an entry is taken only from its
// origin: another peer can neither add, tombstone nor move a name of a
// third; a copy of one of ours from anyone is answered with ours; and
// anti-entropy asks the origin instead of passing its entries on.
func TestFromOriginOnly(t *testing.T) {
	s := newStore(t, self, nil, func(c *names.Config) { c.TrustRelays = false })
	s.SetReachable([]proto.PeerName{peerA, peerB})
	web := entry("web.weave.local.", "10.0.0.1", "c1", peerA, 1, false, 0)
	mustStep(t, s, peerB, web)
	if _, live := s.View().Live(); live != 0 || s.Stats().NotOrigin != 1 {
		t.Fatalf("peerB added peerA's name: %d live, %d refused", live, s.Stats().NotOrigin)
	}
	mustStep(t, s, peerA, web)
	tomb := web
	tomb.Version, tomb.Tombstone = 2, true
	moved := web
	moved.Version, moved.Addr = 2, ip("192.0.2.1")
	mustStep(t, s, peerB, tomb, moved)
	if got := s.View().Lookup("web.weave.local."); len(got) != 1 || got[0] != ip("10.0.0.1") {
		t.Fatalf("after peerB's forgeries web resolves to %v", got)
	}
	if s.Stats().NotOrigin != 3 {
		t.Fatalf("NotOrigin %d, want 3", s.Stats().NotOrigin)
	}
	drain(t, s)

	// A copy of ours from anyone, tombstoned: we answer with ours.
	ours := mustAdd(t, s, "me", "10.0.0.9", "c9")
	drain(t, s)
	fake := ours
	fake.Version++
	fake.Tombstone = true
	mustStep(t, s, peerB, fake)
	if got := s.View().Lookup("me.weave.local."); len(got) != 1 {
		t.Fatalf("our name after peerB's tombstone: %v", got)
	}
	answered := false
	for _, e := range entriesOf(drain(t, s)) {
		answered = answered || e.Hostname == "me.weave.local." && !e.Tombstone && e.Version > fake.Version
	}
	if !answered {
		t.Fatal("a tombstone of our entry not answered with ours")
	}

	// peerB's digest differs on peerA's entries: they go nowhere, peerA
	// is asked to compare, and peerB gets ours.
	if err := s.Step(peerB, &proto.NamesMsg{Kind: proto.NamesDigest, Echo: true}); err != nil {
		t.Fatal(err)
	}
	var askedA, toB bool
	for _, m := range drain(t, s) {
		switch {
		case m.To == peerA && m.Msg.Kind == proto.NamesDigest:
			askedA = true
		case m.To == peerB && m.Msg.Kind == proto.NamesEntries:
			for _, e := range m.Msg.Entries {
				if e.Origin != self {
					t.Fatalf("sent peerB an entry of %v", e.Origin)
				}
			}
			toB = true
		}
	}
	if !askedA || !toB {
		t.Fatalf("asked peerA %v, sent peerB ours %v", askedA, toB)
	}
}

// TestAskMissingOrigin: a digest that lists entries of an origin we have
// none of (we are new) makes us ask that origin, not wait for it to change.
func TestAskMissingOrigin(t *testing.T) {
	s := newStore(t, self, nil, func(c *names.Config) { c.TrustRelays = false })
	s.SetReachable([]proto.PeerName{peerA, peerB})
	drain(t, s)
	d := &proto.NamesMsg{Kind: proto.NamesDigest, Digests: []proto.NameDigest{{Origin: peerA, Hash: 42}}}
	if err := s.Step(peerB, d); err != nil {
		t.Fatal(err)
	}
	asked := false
	for _, m := range drain(t, s) {
		asked = asked || m.To == peerA && m.Msg.Kind == proto.NamesDigest
	}
	if !asked {
		t.Fatal("peerA, whose entries peerB has and we lack, not asked")
	}
}
