package routes

import (
	"math/rand/v2"
	"net/netip"
	"testing"
)

func TestLookup(t *testing.T) {
	tb := New([]Route[string]{
		{netip.MustParsePrefix("10.32.0.0/12"), "range"},
		{netip.MustParsePrefix("10.32.0.1/32"), "host1"},
		{netip.MustParsePrefix("10.32.0.77/24"), "subnet"}, // masked to 10.32.0.0/24
		{netip.MustParsePrefix("10.32.0.1/32"), "duplicate"},
		{netip.MustParsePrefix("::1/128"), "v6 ignored"},
		{netip.MustParsePrefix("0.0.0.0/0"), "default"},
	})
	for _, tc := range []struct{ addr, want string }{
		{"10.32.0.1", "host1"},
		{"10.32.0.2", "subnet"},
		{"10.33.0.2", "range"},
		{"192.168.1.1", "default"},
	} {
		if got, ok := tb.Lookup(netip.MustParseAddr(tc.addr)); !ok || got != tc.want {
			t.Errorf("Lookup(%s) = %q, %v; want %q", tc.addr, got, ok, tc.want)
		}
	}
	if _, ok := tb.Lookup(netip.MustParseAddr("::1")); ok {
		t.Error("IPv6 lookup matched")
	}
	if tb.Len() != 4 || len(tb.Routes()) != 4 {
		t.Errorf("Len %d, Routes %v", tb.Len(), tb.Routes())
	}
	var empty Table[int]
	if _, ok := empty.Lookup(netip.MustParseAddr("1.2.3.4")); ok {
		t.Error("zero table matched")
	}
}

// TestAgainstLinearScan checks random tables against the obvious slow model.
func TestAgainstLinearScan(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	randAddr := func() netip.Addr {
		// A narrow address space so that prefixes overlap often.
		return netip.AddrFrom4([4]byte{10, byte(r.IntN(4)), byte(r.IntN(256)), byte(r.IntN(256))})
	}
	for range 200 {
		var rs []Route[int]
		for i := range r.IntN(50) {
			rs = append(rs, Route[int]{netip.PrefixFrom(randAddr(), 8+r.IntN(25)).Masked(), i})
		}
		tb := New(rs)
		for range 200 {
			a := randAddr()
			want, wantOK, best := 0, false, -1
			for _, rt := range rs {
				if rt.Prefix.Contains(a) && rt.Prefix.Bits() > best {
					want, wantOK, best = rt.Via, true, rt.Prefix.Bits()
				}
			}
			if got, ok := tb.Lookup(a); got != want || ok != wantOK {
				t.Fatalf("Lookup(%v) = %d, %v; model says %d, %v; routes %v", a, got, ok, want, wantOK, rs)
			}
		}
	}
}

func TestLookupAllocatesNothing(t *testing.T) {
	tb := New([]Route[*int]{{netip.MustParsePrefix("10.0.0.0/8"), new(int)}, {netip.MustParsePrefix("10.1.2.3/32"), new(int)}})
	a := netip.MustParseAddr("10.1.2.4")
	if n := testing.AllocsPerRun(1000, func() { tb.Lookup(a) }); n != 0 {
		t.Errorf("%v allocations per lookup", n)
	}
}

func BenchmarkLookup(b *testing.B) {
	var rs []Route[int]
	for i := range 1000 {
		rs = append(rs, Route[int]{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 32, byte(i >> 8), byte(i)}), 32), i})
	}
	rs = append(rs, Route[int]{Prefix: netip.MustParsePrefix("10.32.0.0/12"), Via: 1})
	tb := New(rs)
	a := netip.MustParseAddr("10.33.1.1")
	for b.Loop() {
		tb.Lookup(a)
	}
}
