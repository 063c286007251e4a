package ipalloc_test

import (
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/overlayd/overlayd/internal/ipv4"
	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/ipalloc/ipalloctest"
	"github.com/overlayd/overlayd/proto"
)

var r24 = netip.MustParsePrefix("10.0.0.0/24")

// TestFullSubnetStarvesNoOther: an allocation waiting for space in a full
// subnet does not keep another subnet's allocation from asking for space.
func TestFullSubnetStarvesNoOther(t *testing.T) {
	s := ipalloctest.New(1, r24)
	must(t, s.Add(na, seeded(na, nb)))
	must(t, s.Add(nb, seeded(na, nb)))
	run(t, s, 5)
	small := netip.MustParsePrefix("10.0.0.0/30")
	for _, id := range []string{"a1", "a2"} {
		if d := do(t, s, na, ipalloc.Request{Op: ipalloc.OpAlloc, Ident: id, Subnet: small}); d.Err != nil {
			t.Fatal(d.Err)
		}
	}
	full := s.Submit(nb, ipalloc.Request{Op: ipalloc.OpAlloc, Ident: "full", Subnet: small})
	run(t, s, 20)
	d := do(t, s, nb, ipalloc.Request{Op: ipalloc.OpAlloc, Ident: "other", Subnet: netip.MustParsePrefix("10.0.0.64/26")})
	if d.Err != nil || !netip.MustParsePrefix("10.0.0.64/26").Contains(d.Addr.Addr()) {
		t.Fatalf("allocation in another subnet: %v %v", d.Addr, d.Err)
	}
	if _, ok := s.Answer(full); ok {
		t.Fatal("the allocation in the full subnet was answered")
	}
	if got := status(s, nb); got != ipalloc.StatusWaiting {
		t.Errorf("status %q", got)
	}
}

// TestClaimNotFailedByLateRefusal: under loss a claim is asked again; the
// owner's refusal of the repeat (it gave the address already) must not
// fail a claim that succeeded.
func TestClaimNotFailedByLateRefusal(t *testing.T) {
	addr := netip.MustParsePrefix("10.0.0.50/24")
	for seed := range uint64(100) {
		s := ipalloctest.New(seed, r24)
		must(t, s.Add(na, seeded(na, nb)))
		must(t, s.Add(nb, seeded(na, nb)))
		run(t, s, 3)
		s.Net.Loss = 0.3
		id := s.Submit(nb, ipalloc.Request{Op: ipalloc.OpClaim, Ident: "c", Addr: addr})
		var d ipalloc.Done
		for i, got := 0, false; i < 300 && !got; i++ {
			step(t, s)
			d, got = s.Answer(id)
		}
		s.Net.Loss = 0
		run(t, s, 30)
		if owner := s.Peer(nb).Node.Ring().Owner(ipv4.Value(addr.Addr())); d.Err != nil && owner == nb {
			t.Fatalf("seed %d: the claim failed (%v) although the address is ours", seed, d.Err)
		}
	}
}

// TestVersionsStayBounded: a peer that pushes one of our entries to the
// highest version cannot make us write a ring that fails its own checks.
func TestVersionsStayBounded(t *testing.T) {
	n, err := ipalloc.New(ipalloc.Config{Self: na, UID: 1, Universe: r24, Mode: ipalloc.Seed, Seeds: []proto.PeerName{na, nb},
		Rand: rand.New(rand.NewPCG(1, 2))}, nil)
	must(t, err)
	n.Ready()
	n.Advance()
	m := n.Ring().Proto()
	m.Entries[0].Version = proto.MaxRingVersion
	must(t, n.Step(nb, &proto.IPAMMsg{Kind: proto.IPAMRing, Ring: m}))
	must(t, n.Step(nb, &proto.IPAMMsg{Kind: proto.IPAMSpaceRequest, Start: m.Entries[0].Token, Last: m.Entries[0].Token}))
	rd := n.Ready()
	n.Advance()
	must(t, n.Ring().Check())
	if _, err := ipalloc.New(ipalloc.Config{Self: na, UID: 2, Universe: r24, Mode: ipalloc.Seed, Seeds: []proto.PeerName{na, nb},
		Rand: rand.New(rand.NewPCG(1, 2))}, rd.State); err != nil {
		t.Fatalf("restart from the saved state: %v", err)
	}
}

// TestRingSizeIsBounded: rings whose union would pass MaxRingEntries are
// refused, so the state can always be encoded and saved.
func TestRingSizeIsBounded(t *testing.T) {
	u := netip.MustParsePrefix("10.0.0.0/8")
	n, err := ipalloc.New(ipalloc.Config{Self: na, UID: 1, Universe: u, Mode: ipalloc.Seed, Seeds: []proto.PeerName{na, nb},
		Rand: rand.New(rand.NewPCG(1, 2))}, nil)
	must(t, err)
	n.Ready()
	n.Advance()
	st, _ := ipv4.Bounds(u)
	ours := n.Ring().Proto()
	ring1 := proto.Ring{Range: u, Seeds: ours.Seeds, Entries: []proto.RingEntry{ours.Entries[0]}}
	ring2 := proto.Ring{Range: u, Seeds: ours.Seeds, Entries: []proto.RingEntry{ours.Entries[0]}}
	for i := range proto.MaxRingEntries - 1 {
		ring1.Entries = append(ring1.Entries, proto.RingEntry{Token: st + 1<<23 + uint32(i)*8, Peer: nb, Free: 8})
	}
	for i := range 1000 {
		ring2.Entries = append(ring2.Entries, proto.RingEntry{Token: st + 1<<23 + uint32(i)*8 + 4, Peer: nb, Free: 4})
	}
	must(t, n.Step(nb, &proto.IPAMMsg{Kind: proto.IPAMRing, Ring: ring1}))
	if err := n.Step(nb, &proto.IPAMMsg{Kind: proto.IPAMRing, Ring: ring2}); err == nil {
		t.Fatalf("a merge to %d tokens was accepted", n.Ring().Len())
	}
	n.Ready()
	n.Advance()
	n.Submit(ipalloc.Request{ID: 7, Op: ipalloc.OpAlloc, Ident: "x"})
	if rd := n.Ready(); len(rd.Done) != 1 || rd.State == nil {
		t.Fatalf("allocation answered without a state to save: %+v, %d bytes", rd.Done, len(rd.State))
	}
}
