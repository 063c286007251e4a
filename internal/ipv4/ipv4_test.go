package ipv4

import (
	"math/rand/v2"
	"net/netip"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 10000 {
		v := r.Uint32()
		a := Addr(v)
		if !a.Is4() || Value(a) != v {
			t.Fatalf("%d -> %v -> %d", v, a, Value(a))
		}
	}
	if Value(netip.MustParseAddr("10.32.0.1")) != 10<<24|32<<16|1 {
		t.Error("10.32.0.1")
	}
}

func TestBounds(t *testing.T) {
	for _, tc := range []struct {
		p           string
		first, last string
		size        uint64
	}{
		{"172.16.16.0/24", "172.16.16.0", "172.16.16.255", 256},
		{"172.16.16.77/24", "172.16.16.0", "172.16.16.255", 256}, // host bits ignored
		{"10.32.0.0/12", "10.32.0.0", "10.47.255.255", 1 << 20},
		{"0.0.0.0/0", "0.0.0.0", "255.255.255.255", 1 << 32},
		{"255.255.255.255/32", "255.255.255.255", "255.255.255.255", 1},
	} {
		p := netip.MustParsePrefix(tc.p)
		first, end := Bounds(p)
		if Addr(first).String() != tc.first || end-uint64(first) != tc.size || Last(p).String() != tc.last {
			t.Errorf("%s: first %v, size %d, last %v", tc.p, Addr(first), end-uint64(first), Last(p))
		}
	}
}
