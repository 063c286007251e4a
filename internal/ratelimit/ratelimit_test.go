package ratelimit

import (
	"net/netip"
	"testing"
	"time"
)

// TestPerSource: a source has its burst at once and its rate after that;
// another source's bucket is untouched by the first one's spending.
func TestPerSource(t *testing.T) {
	tb := New[netip.Addr](10, 5)
	a, b := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	for tb.bucket(a) == tb.bucket(b) { // a fresh key until they differ
		tb = New[netip.Addr](10, 5)
	}
	now := time.Unix(1000, 0)
	count := func(src netip.Addr, at time.Time, n int) (got int) {
		for range n {
			if tb.Allow(src, at) {
				got++
			}
		}
		return got
	}
	if got := count(a, now, 100); got != 5 {
		t.Errorf("a burst of 100 at once: %d allowed, want the burst of 5", got)
	}
	if got := count(b, now, 100); got != 5 {
		t.Errorf("another source, after the first spent its burst: %d allowed, want 5", got)
	}
	if got := count(a, now.Add(time.Second), 100); got != 5 {
		t.Errorf("a second later: %d allowed, want 5 (10 a second, capped at the burst)", got)
	}
	if got := count(a, now.Add(time.Second+300*time.Millisecond), 100); got != 3 {
		t.Errorf("0.3 s after that: %d allowed, want 3", got)
	}
}

func (t *Table[K]) bucket(k K) any { return t.buckets[hashOf(t, k)] }

// TestNoAllocs: Allow is on the receive path.
func TestNoAllocs(t *testing.T) {
	tb := New[netip.AddrPort](1e9, 1)
	src := netip.MustParseAddrPort("10.0.0.1:6783")
	now := time.Now()
	if n := testing.AllocsPerRun(1000, func() { tb.Allow(src, now) }); n != 0 {
		t.Errorf("Allow allocates %v times a call", n)
	}
}

func BenchmarkAllow(b *testing.B) {
	tb := New[netip.Addr](1e9, 1)
	src := netip.MustParseAddr("10.0.0.1")
	now := time.Now()
	for b.Loop() {
		tb.Allow(src, now)
	}
}
