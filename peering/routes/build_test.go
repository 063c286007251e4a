package routes

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// via is where the test's packets go: a peer's name, or "here".
type via = string

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func reachable(peers ...int) func(int) (via, bool) {
	return func(p int) (via, bool) {
		for _, q := range peers {
			if p == q {
				return fmt.Sprint("peer", p), true
			}
		}
		return "", false
	}
}

func TestBuild(t *testing.T) {
	base := Sources[int, via]{
		Self: 1, Here: "here",
		Owners: []Owner[int]{{pfx("10.32.0.0/13"), 1}, {pfx("10.40.0.0/14"), 2}, {pfx("10.44.0.0/14"), 3}},
		Path:   reachable(2, 3, 4),
	}
	for _, tc := range []struct {
		name string
		edit func(*Sources[int, via])
		addr string
		want via // "" for no route
	}{
		{"own space", nil, "10.33.1.1", "here"},
		{"a peer's space", nil, "10.41.0.9", "peer2"},
		{"outside the range", nil, "192.168.1.1", ""},
		{"an unreachable owner's space", func(s *Sources[int, via]) { s.Path = reachable(2) }, "10.45.0.1", ""},
		{
			"an announcement in another's space is refused", func(s *Sources[int, via]) {
				s.Announced = []Announcement[int]{{4, []netip.Prefix{pfx("10.41.0.9/32")}}}
			}, "10.41.0.9", "peer2",
		},
		{
			"an announcement over several owners is refused", func(s *Sources[int, via]) {
				s.Announced = []Announcement[int]{{2, []netip.Prefix{pfx("10.32.0.0/11")}}}
			}, "10.33.1.1", "here",
		},
		{
			"an exposed address the announcer owns is more specific", func(s *Sources[int, via]) {
				s.Owners = []Owner[int]{{pfx("10.41.0.0/24"), 4}, {pfx("10.41.1.0/24"), 2}}
				s.Announced = []Announcement[int]{{4, []netip.Prefix{pfx("10.41.0.9/32")}}}
			}, "10.41.0.9", "peer4",
		},
		{
			"our exposed address in another's space", func(s *Sources[int, via]) {
				s.Local = []netip.Prefix{pfx("10.41.0.9/32")}
			}, "10.41.0.9", "here",
		},
		{
			"local beats an announcement of the same prefix", func(s *Sources[int, via]) {
				s.Local = []netip.Prefix{pfx("1.1.1.1/32")}
				s.Announced = []Announcement[int]{{2, []netip.Prefix{pfx("1.1.1.1/32")}}}
			}, "1.1.1.1", "here",
		},
		{
			"an announcement of another's ring prefix is refused", func(s *Sources[int, via]) {
				s.Announced = []Announcement[int]{{4, []netip.Prefix{pfx("10.40.0.0/14")}}}
			}, "10.40.0.1", "peer2",
		},
		{
			"the lower name wins a contested announcement, whatever the order", func(s *Sources[int, via]) {
				s.Announced = []Announcement[int]{{4, []netip.Prefix{pfx("1.1.1.1/32")}}, {3, []netip.Prefix{pfx("1.1.1.1/32")}}}
			}, "1.1.1.1", "peer3",
		},
		{
			"an unreachable announcer yields to the next", func(s *Sources[int, via]) {
				s.Announced = []Announcement[int]{{5, []netip.Prefix{pfx("1.1.1.1/32")}}, {4, []netip.Prefix{pfx("1.1.1.1/32")}}}
				s.Path = reachable(4)
			}, "1.1.1.1", "peer4",
		},
		{
			"our own announcement, gossiped back, is ignored", func(s *Sources[int, via]) {
				s.Announced = []Announcement[int]{{1, []netip.Prefix{pfx("10.41.0.9/32")}}}
			}, "10.41.0.9", "peer2",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := base
			if tc.edit != nil {
				tc.edit(&s)
			}
			tab := Build(s)
			got, ok := tab.Lookup(netip.MustParseAddr(tc.addr))
			if !ok {
				got = ""
			}
			if got != tc.want {
				t.Errorf("%s goes to %q, want %q", tc.addr, got, tc.want)
			}
			if refused := strings.HasSuffix(tc.name, "is refused"); refused != (tab.Refused > 0) {
				t.Errorf("%d announcements refused", tab.Refused)
			}
		})
	}
}

// slowLookup is the model: every candidate route in precedence order; the
// longest prefix containing a wins, and among equal prefixes the first.
func slowLookup(s Sources[int, via], a netip.Addr) (via, bool) {
	type cand struct {
		p netip.Prefix
		v via
	}
	var cs []cand
	for _, p := range s.Local {
		cs = append(cs, cand{p, s.Here})
	}
	for _, o := range s.Owners {
		if o.Peer == s.Self {
			cs = append(cs, cand{o.Prefix, s.Here})
		} else if v, ok := s.Path(o.Peer); ok {
			cs = append(cs, cand{o.Prefix, v})
		}
	}
	for peer := 0; peer < 16; peer++ { // names in order
		for _, an := range s.Announced {
			if an.Peer != peer || peer == s.Self {
				continue
			}
			if v, ok := s.Path(peer); ok {
				for _, p := range an.Prefixes {
					if p.Bits() == 32 && !slices.ContainsFunc(s.Owners, func(o Owner[int]) bool { return o.Peer != peer && o.Prefix.Overlaps(p) }) {
						cs = append(cs, cand{p, v})
					}
				}
			}
		}
	}
	best, bits := "", -1
	for _, c := range cs {
		if c.p.Masked().Contains(a) && c.p.Bits() > bits {
			best, bits = c.v, c.p.Bits()
		}
	}
	return best, bits >= 0
}

// TestBuildRandom checks Build against the model on random sources: random
// prefixes within a small space (so they overlap and collide), random
// reachability, random addresses.
func TestBuildRandom(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 11))
	randPrefix := func() netip.Prefix {
		a := netip.AddrFrom4([4]byte{10, 32, byte(r.IntN(4)), byte(r.IntN(256))})
		return netip.PrefixFrom(a, 22+r.IntN(11)).Masked()
	}
	for i := range 2000 {
		s := Sources[int, via]{Self: r.IntN(8), Here: "here"}
		var up []int
		for p := range 8 {
			if r.IntN(4) > 0 {
				up = append(up, p)
			}
		}
		s.Path = reachable(up...)
		for range r.IntN(4) {
			s.Local = append(s.Local, randPrefix())
		}
		for range r.IntN(8) {
			s.Owners = append(s.Owners, Owner[int]{randPrefix(), r.IntN(8)})
		}
		for range r.IntN(6) {
			an := Announcement[int]{Peer: r.IntN(8)}
			for range 1 + r.IntN(3) {
				an.Prefixes = append(an.Prefixes, randPrefix())
			}
			s.Announced = append(s.Announced, an)
		}
		tab := Build(s)
		for range 200 {
			a := netip.AddrFrom4([4]byte{10, 32, byte(r.IntN(4)), byte(r.IntN(256))})
			got, ok := tab.Lookup(a)
			want, wok := slowLookup(s, a)
			if ok != wok || got != want {
				t.Fatalf("case %d: %v goes to %q (%v), the model says %q (%v)\nsources: %+v", i, a, got, ok, want, wok, s)
			}
		}
	}
}

func BenchmarkBuild(b *testing.B) {
	s := Sources[int, via]{Self: 0, Here: "here", Path: reachable(1, 2, 3, 4, 5, 6, 7)}
	for i := range 64 {
		s.Owners = append(s.Owners, Owner[int]{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(32 + i/16), byte(i % 16 * 16), 0}), 20), i % 8})
	}
	for p := range 8 {
		an := Announcement[int]{Peer: p}
		for j := range 32 {
			an.Prefixes = append(an.Prefixes, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 32, byte(p), byte(j)}), 32))
		}
		s.Announced = append(s.Announced, an)
	}
	b.ReportAllocs()
	for b.Loop() {
		Build(s)
	}
}
