package hostnet

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
)

var (
	rng     = netip.MustParsePrefix("172.16.16.0/24")
	exposed = netip.MustParsePrefix("172.16.16.201/24")
	second  = netip.MustParsePrefix("172.16.16.203/24")
	c1      = netip.MustParseAddr("172.16.16.5")
	c2      = netip.MustParseAddr("172.16.16.6")
	c3      = netip.MustParseAddr("172.16.16.7")
)

func want() Want {
	return Want{Iface: "ovl0", MTU: 1456, Range: rng, Addrs: []netip.Prefix{exposed, second},
		Hosts: map[string][]netip.Addr{"vethwe1": {c1, c2}, "vethwe2": {c3}}}
}

// whole is the kernel's state when everything wanted is in place.
func whole() Have {
	return Have{
		Links: map[string]Link{"ovl0": {Index: 3, Up: true, MTU: 1456}, "vethwe1": {Index: 7, Up: true, MTU: 1410},
			"vethwe2": {Index: 8, Up: true, MTU: 1410}},
		Addrs: []netip.Prefix{exposed, second},
		Routes: []Route{{Dst: netip.MustParsePrefix("192.168.200.0/24"), Index: 2}, {Dst: rng, Index: 3},
			{Dst: netip.PrefixFrom(c1, 32), Index: 7}, {Dst: netip.PrefixFrom(c2, 32), Index: 7}, {Dst: netip.PrefixFrom(c3, 32), Index: 8}},
	}
}

func withoutRoute(h Have, dst netip.Prefix, index int) Have {
	h.Routes = slices.DeleteFunc(slices.Clone(h.Routes), func(r Route) bool { return r.Dst == dst && r.Index == index })
	return h
}

func TestPlan(t *testing.T) {
	for _, tc := range []struct {
		name string
		want func() Want
		have func() Have
		fix  []Fix
	}{
		{"all in place", want, whole, nil},
		{
			// The bug of issue 18: hiding the last address flushed the
			// range route.
			"range route gone", want, func() Have { return withoutRoute(whole(), rng, 3) },
			[]Fix{{Kind: RangeRoute, Iface: "ovl0", Prefix: rng}},
		},
		{
			"range route through another device", want, func() Have {
				h := withoutRoute(whole(), rng, 3)
				h.Routes = append(h.Routes, Route{Dst: rng, Index: 2})
				return h
			},
			[]Fix{{Kind: RangeRoute, Iface: "ovl0", Prefix: rng}},
		},
		{
			"a more specific route is not ours", want, func() Have {
				h := whole()
				h.Routes = append(h.Routes, Route{Dst: netip.MustParsePrefix("172.16.16.0/25"), Index: 2})
				return h
			},
			nil,
		},
		{
			"device down: up first, then its routes", want, func() Have {
				h := withoutRoute(whole(), rng, 3)
				h.Links["ovl0"] = Link{Index: 3, MTU: 1456}
				return h
			},
			[]Fix{{Kind: LinkUp, Iface: "ovl0"}, {Kind: RangeRoute, Iface: "ovl0", Prefix: rng}},
		},
		{
			"MTU changed", want, func() Have {
				h := whole()
				h.Links["ovl0"] = Link{Index: 3, Up: true, MTU: 1500}
				return h
			},
			[]Fix{{Kind: LinkMTU, Iface: "ovl0", MTU: 1456}},
		},
		{
			"secondary gone with its primary", want, func() Have {
				h := withoutRoute(whole(), rng, 3)
				h.Addrs = nil
				return h
			},
			[]Fix{{Kind: Address, Iface: "ovl0", Prefix: exposed}, {Kind: Address, Iface: "ovl0", Prefix: second},
				{Kind: RangeRoute, Iface: "ovl0", Prefix: rng}},
		},
		{
			"an address of another length is another address", want, func() Have {
				h := whole()
				h.Addrs = []netip.Prefix{netip.PrefixFrom(exposed.Addr(), 32), second}
				return h
			},
			[]Fix{{Kind: Address, Iface: "ovl0", Prefix: exposed}},
		},
		{
			"addresses not wanted are left alone", want, func() Have {
				h := whole()
				h.Addrs = append(h.Addrs, netip.MustParsePrefix("10.1.1.1/8"))
				return h
			},
			nil,
		},
		{
			"container route gone", want, func() Have { return withoutRoute(whole(), netip.PrefixFrom(c3, 32), 8) },
			[]Fix{{Kind: HostRoute, Iface: "vethwe2", Prefix: netip.PrefixFrom(c3, 32)}},
		},
		{
			// Two containers given one address (IPAM off): the route
			// stays where it is, never flips between them.
			"one address on two veths, routed to one", func() Want {
				w := want()
				w.Hosts["vethwe2"] = []netip.Addr{c2, c3}
				return w
			},
			func() Have {
				h := withoutRoute(whole(), netip.PrefixFrom(c2, 32), 7)
				h.Routes = append(h.Routes, Route{Dst: netip.PrefixFrom(c2, 32), Index: 8})
				return h
			},
			nil,
		},
		{
			"one address on two veths, routed to neither", func() Want {
				w := want()
				w.Hosts["vethwe2"] = []netip.Addr{c2, c3}
				return w
			},
			func() Have { return withoutRoute(whole(), netip.PrefixFrom(c2, 32), 7) },
			[]Fix{{Kind: HostRoute, Iface: "vethwe1", Prefix: netip.PrefixFrom(c2, 32)}},
		},
		{
			"container veth down", want, func() Have {
				h := withoutRoute(withoutRoute(whole(), netip.PrefixFrom(c1, 32), 7), netip.PrefixFrom(c2, 32), 7)
				h.Links["vethwe1"] = Link{Index: 7, MTU: 1410}
				return h
			},
			[]Fix{{Kind: LinkUp, Iface: "vethwe1"}, {Kind: HostRoute, Iface: "vethwe1", Prefix: netip.PrefixFrom(c1, 32)},
				{Kind: HostRoute, Iface: "vethwe1", Prefix: netip.PrefixFrom(c2, 32)}},
		},
		{
			"container veth gone: its grace period's business", want, func() Have {
				h := withoutRoute(withoutRoute(whole(), netip.PrefixFrom(c1, 32), 7), netip.PrefixFrom(c2, 32), 7)
				delete(h.Links, "vethwe1")
				return h
			},
			nil,
		},
		{
			"TUN device gone: the router's business", want, func() Have {
				h := withoutRoute(whole(), rng, 3)
				delete(h.Links, "ovl0")
				h.Addrs = nil
				return h
			},
			nil,
		},
		{
			"no range: no range route", func() Want { w := want(); w.Range = netip.Prefix{}; return w },
			func() Have { return withoutRoute(whole(), rng, 3) }, nil,
		},
		{
			"an address twice is one route", func() Want {
				w := want()
				w.Hosts["vethwe2"] = []netip.Addr{c3, c3}
				return w
			},
			func() Have { return withoutRoute(whole(), netip.PrefixFrom(c3, 32), 8) },
			[]Fix{{Kind: HostRoute, Iface: "vethwe2", Prefix: netip.PrefixFrom(c3, 32)}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Plan(tc.want(), tc.have())
			if diff := cmp.Diff(tc.fix, got, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
				t.Errorf("Plan (-want +got):\n%s", diff)
			}
		})
	}
}

// apply is a model of the kernel: what each fix does to have, including
// the kernel's flush of a link's routes when it goes down (modelled by the
// random damage below, not here).
func apply(h Have, f Fix) Have {
	l := h.Links[f.Iface]
	switch f.Kind {
	case LinkUp:
		l.Up = true
		h.Links[f.Iface] = l
	case LinkMTU:
		l.MTU = f.MTU
		h.Links[f.Iface] = l
	case Address:
		h.Addrs = append(h.Addrs, f.Prefix)
	default:
		h.Routes = slices.DeleteFunc(h.Routes, func(r Route) bool { return r.Dst == f.Prefix })
		h.Routes = append(h.Routes, Route{Dst: f.Prefix, Index: l.Index})
	}
	return h
}

// TestPlanConverges damages the kernel's state at random, applies the plan
// to a model of the kernel, and checks that nothing is left to fix and
// that every fix was needed: a link up is planned only when it was down,
// an address only when it was missing, a route only when it led elsewhere
// or nowhere.
func TestPlanConverges(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 2000 {
		w := want()
		if r.IntN(4) == 0 {
			w.Hosts["vethwe2"] = []netip.Addr{c2, c3} // c2 on two veths
		}
		h := whole()
		h.Links = map[string]Link{"ovl0": h.Links["ovl0"], "vethwe1": h.Links["vethwe1"], "vethwe2": h.Links["vethwe2"]}
		var damage []string
		for name, l := range h.Links {
			if r.IntN(4) == 0 {
				l.Up = false
				h.Links[name] = l
				h.Routes = slices.DeleteFunc(h.Routes, func(x Route) bool { return x.Index == l.Index })
				damage = append(damage, name+" down")
			}
		}
		if r.IntN(3) == 0 {
			l := h.Links["ovl0"]
			l.MTU = 1280 + r.IntN(300)
			h.Links["ovl0"] = l
			damage = append(damage, "mtu")
		}
		for _, a := range slices.Clone(h.Addrs) {
			if r.IntN(3) == 0 {
				h.Addrs = slices.DeleteFunc(h.Addrs, func(x netip.Prefix) bool { return x == a })
				damage = append(damage, "addr "+a.String())
			}
		}
		for _, x := range slices.Clone(h.Routes) {
			switch r.IntN(5) {
			case 0:
				h.Routes = slices.DeleteFunc(h.Routes, func(y Route) bool { return y == x })
				damage = append(damage, "route "+x.Dst.String())
			case 1:
				h.Routes = slices.DeleteFunc(h.Routes, func(y Route) bool { return y == x })
				h.Routes = append(h.Routes, Route{Dst: x.Dst, Index: 99})
				damage = append(damage, "route elsewhere "+x.Dst.String())
			}
		}
		if r.IntN(5) == 0 {
			delete(h.Links, "vethwe2")
			damage = append(damage, "vethwe2 gone")
		}
		fixes := Plan(w, h)
		for j, f := range fixes {
			if j > 0 && f.Kind < fixes[j-1].Kind && f.Kind != LinkUp {
				t.Fatalf("case %d (%v): fixes out of order: %v", i, damage, fixes)
			}
			if f.Kind == LinkUp && h.Links[f.Iface].Up {
				t.Fatalf("case %d (%v): %v planned for a link that is up", i, damage, f)
			}
			h = apply(h, f)
		}
		if left := Plan(w, h); len(left) > 0 {
			t.Fatalf("case %d (%v): after %v, still %v", i, damage, fixes, left)
		}
		if len(damage) == 0 && len(fixes) > 0 {
			t.Fatalf("case %d: fixes %v for no damage", i, fixes)
		}
	}
}

func TestKindString(t *testing.T) {
	var names []string
	for k := range NumKinds {
		names = append(names, k.String())
	}
	if fmt.Sprint(names) != "[link_up mtu address range_route container_route]" || Kind(9).String() != "Kind(9)" {
		t.Errorf("kinds: %v %v", names, Kind(9))
	}
}
