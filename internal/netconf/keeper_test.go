package netconf

import (
	"net/netip"
	"testing"
	"time"

	"github.com/overlayd/overlayd/internal/hostnet"
)

// TestFlapGuard: a fix applied flapLimit times within flapWindow is
// suspended for flapQuiet (something else keeps changing the same thing);
// one applied now and then is never suspended.
func TestFlapGuard(t *testing.T) {
	k := NewKeeper(KeeperConfig{Iface: "ovl0", MTU: 1456})
	t0 := time.Unix(1000, 0)
	for i := range 3 * flapLimit {
		if k.flapped("route a", t0.Add(time.Duration(i)*2*flapWindow)) {
			t.Fatalf("a fix applied every %v was suspended at %d", 2*flapWindow, i)
		}
	}
	for i := range flapLimit - 1 {
		if k.flapped("route b", t0.Add(time.Duration(i)*time.Millisecond)) {
			t.Fatalf("suspended after %d", i+1)
		}
	}
	now := t0.Add(flapLimit * time.Millisecond)
	if !k.flapped("route b", now) {
		t.Fatalf("not suspended after %d in %v", flapLimit, flapLimit*time.Millisecond)
	}
	if until := k.quiet["route b"]; !until.Equal(now.Add(flapQuiet)) {
		t.Errorf("suspended until %v", until)
	}
	if len(k.flaps) > 1 {
		t.Errorf("flap records kept: %v", k.flaps)
	}
}

// TestInterest: events about our links, the range's route and the
// containers' routes are ours; others are not.
func TestInterest(t *testing.T) {
	k := NewKeeper(KeeperConfig{Iface: "ovl0", MTU: 1456, Range: netip.MustParsePrefix("10.32.0.0/12")})
	k.SetHost("vethwe1", []netip.Addr{netip.MustParseAddr("10.32.0.5")})
	w := k.interest(hostnet.Have{Links: map[string]hostnet.Link{"ovl0": {Index: 3}, "vethwe1": {Index: 7}}})
	if w.tun != 3 || !w.links[3] || !w.links[7] || w.links[2] {
		t.Errorf("links %v, tun %d", w.links, w.tun)
	}
	for p, want := range map[string]bool{"10.32.0.0/12": true, "10.32.0.5/32": true, "10.32.0.6/32": false, "0.0.0.0/0": false} {
		if w.dsts[netip.MustParsePrefix(p)] != want {
			t.Errorf("%s: %v", p, !want)
		}
	}
	if _, ok := prefixOf(nil); ok {
		t.Error("prefixOf(nil)")
	}
}
