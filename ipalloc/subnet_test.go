package ipalloc_test

import (
	"net/netip"
	"testing"

	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/ipalloc/ipalloctest"
)

// TestDefaultSubnet: with --default-subnet, a request that names no subnet
// gets an address from it, with its mask; one that names a subnet gets
// one from that.
func TestDefaultSubnet(t *testing.T) {
	s := ipalloctest.New(1, slash24)
	cfg := seeded(na)
	cfg.DefaultSubnet = netip.MustParsePrefix("172.16.16.64/26")
	must(t, s.Add(na, cfg))
	run(t, s, 2)
	if d := do(t, s, na, ipalloc.Request{Op: ipalloc.OpAlloc, Ident: "c1"}); d.Err != nil || d.Addr.String() != "172.16.16.65/26" {
		t.Fatalf("default subnet: %v %v, want 172.16.16.65/26", d.Addr, d.Err)
	}
	if d := do(t, s, na, ipalloc.Request{Op: ipalloc.OpAlloc, Ident: "c2", Subnet: slash24}); d.Err != nil || d.Addr.String() != "172.16.16.1/24" {
		t.Fatalf("explicit subnet: %v %v, want 172.16.16.1/24", d.Addr, d.Err)
	}
}
