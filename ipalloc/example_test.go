package ipalloc_test

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/ipalloc/ipalloctest"
	"github.com/overlayd/overlayd/proto"
)

var slash24 = netip.MustParsePrefix("172.16.16.0/24")

func alloc(t *testing.T, s *ipalloctest.Sim, on proto.PeerName, ident string) string {
	t.Helper()
	id := s.Submit(on, ipalloc.Request{Op: ipalloc.OpAlloc, Ident: ident})
	for range 200 {
		if d, ok := s.Answer(id); ok {
			if d.Err != nil {
				t.Fatalf("alloc %s on %v: %v", ident, on, d.Err)
			}
			return d.Addr.String()
		}
		if err := s.Run(1); err != nil {
			t.Fatal(err)
		}
		if err := s.Check(); err != nil {
			t.Fatal(err)
		}
	}
	t.Fatalf("alloc %s on %v: no answer after 200 ticks; status %q", ident, on, s.Peer(on).Node.Status().Status)
	return ""
}

func status(s *ipalloctest.Sim, p proto.PeerName) string { return s.Peer(p).Node.Status().Status }

// TestWorkedExample is WEAVE.md §1.13 step by step: two peers split the
// range by consensus on the first allocation, a third is donated the upper
// half of the upper peer's biggest free block.
func TestWorkedExample(t *testing.T) {
	s := ipalloctest.New(1, slash24)
	a, b, c := proto.PeerName(0x12d2fe7ac1f2), proto.PeerName(0xe6b190cdda76), proto.PeerName(0xaeafa6361837)
	must(t, s.Add(a, ipalloc.Config{Quorum: 1})) // launched with no peers
	must(t, s.Add(b, ipalloc.Config{Quorum: 2})) // lists a
	must(t, s.Run(5))
	for _, p := range []proto.PeerName{a, b} {
		if got := status(s, p); got != "idle" {
			t.Fatalf("%v before any allocation: status %q, want idle", p, got)
		}
	}
	if got := alloc(t, s, b, "cb"); got != "172.16.16.128/24" {
		t.Fatalf("b's first address %s, want 172.16.16.128/24", got)
	}
	for _, p := range []proto.PeerName{a, b} {
		if got := status(s, p); got != "ready" {
			t.Fatalf("%v after the allocation: status %q, want ready", p, got)
		}
	}
	if got := alloc(t, s, a, "ca"); got != "172.16.16.1/24" {
		t.Fatalf("a's first address %s, want 172.16.16.1/24", got)
	}
	if got := alloc(t, s, b, "cb"); got != "172.16.16.128/24" {
		t.Fatalf("b's address again %s: allocation is not idempotent", got)
	}
	must(t, s.Add(c, ipalloc.Config{Quorum: 1}))
	must(t, s.Run(3))
	if got := status(s, c); got != "ready" {
		t.Fatalf("c after joining: status %q, want ready (it received the ring)", got)
	}
	if got := alloc(t, s, c, "cc"); got != "172.16.16.224/24" {
		t.Fatalf("c's first address %s, want 172.16.16.224/24", got)
	}
	must(t, s.Run(20))
	must(t, s.Converged())
	st := s.Peer(c).Node.Status()
	want := map[proto.PeerName]uint64{c: 32, a: 128, b: 96}
	if len(st.Owners) != 3 || st.Owners[0].Peer != c {
		t.Fatalf("owners %+v: want c first, then a and b", st.Owners)
	}
	for _, o := range st.Owners {
		if want[o.Peer] != o.Size {
			t.Errorf("%v owns %d, want %d", o.Peer, o.Size, want[o.Peer])
		}
	}
	if st.Active != 1 {
		t.Errorf("c has %d active, want 1", st.Active)
	}
	var tokens []string
	for _, e := range st.Entries {
		tokens = append(tokens, e.Token.String()+"="+e.Peer.String())
	}
	if got := strings.Join(tokens, " "); got != "172.16.16.0=12:d2:fe:7a:c1:f2 172.16.16.128=e6:b1:90:cd:da:76 172.16.16.224=ae:af:a6:36:18:37" {
		t.Errorf("ring %s", got)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
