package ring

import (
	"errors"
	"fmt"
	"math/bits"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/overlayd/overlayd/internal/ipv4"
	"github.com/overlayd/overlayd/proto"
)

var (
	slash24 = netip.MustParsePrefix("172.16.16.0/24")
	slash29 = netip.MustParsePrefix("10.0.0.0/29") // 8 addresses
)

const (
	pa proto.PeerName = 0x0a0000000001 + iota
	pb
	pc
	pd
)

// addr24 is the ring address of 172.16.16.<o>.
func addr24(o int) uint32 { return ipv4.Value(netip.AddrFrom4([4]byte{172, 16, 16, 0})) + uint32(o) }

func newRing(t *testing.T, universe netip.Prefix, peers ...proto.PeerName) *Ring {
	t.Helper()
	r, err := New(universe)
	if err != nil {
		t.Fatal(err)
	}
	r.ClaimForPeers(peers)
	if err := r.Check(); err != nil {
		t.Fatal(err)
	}
	return r
}

// fromProto builds a ring over universe from explicit entries.
func fromProto(t *testing.T, universe netip.Prefix, seeds []proto.PeerName, entries ...proto.RingEntry) *Ring {
	t.Helper()
	r, err := FromProto(&proto.Ring{Range: universe, Seeds: seeds, Entries: entries}, universe)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// layout prints the ring as "offset=peer/size vVersion fFree" per token,
// offsets relative to the start of the range.
func layout(r *Ring) string {
	es, sizes := r.Entries()
	var out []string
	for i, e := range es {
		out = append(out, fmt.Sprintf("%d=%x/%d v%d f%d", e.Token-r.start, uint64(e.Peer)&0xff, sizes[i], e.Version, e.Free))
	}
	return strings.Join(out, " ")
}

// checkHash verifies that the cached hash is the hash of the state.
func checkHash(t *testing.T, r *Ring) {
	t.Helper()
	m := r.Proto()
	if got, want := r.Hash(), HashProto(&m); got != want {
		t.Fatalf("stale hash: Hash %x, HashProto(Proto) %x; ring %s", got, want, layout(r))
	}
}

// peerNames returns n distinct names in a shuffled order, to show that
// ClaimForPeers sorts.
func peerNames(n int) []proto.PeerName {
	out := make([]proto.PeerName, n)
	for i, k := range rand.New(rand.NewPCG(uint64(n), 1)).Perm(n) {
		out[i] = proto.PeerName(0x0a0000000000 + uint64(k+1)*0x101)
	}
	return out
}

func TestClaimForPeers(t *testing.T) {
	for _, universe := range []netip.Prefix{slash29, slash24} {
		_, end := ipv4.Bounds(universe)
		size := end - uint64(ipv4.Value(universe.Addr()))
		for n := 1; n <= 12; n++ {
			t.Run(fmt.Sprintf("%v/%d", universe, n), func(t *testing.T) {
				peers := peerNames(n)
				r := newRing(t, universe, peers...)
				sorted := slices.Sorted(slices.Values(peers))
				if got := r.Seeds(); !slices.Equal(got, sorted) {
					t.Fatalf("seeds %v, want %v", got, sorted)
				}
				es, sizes := r.Entries()
				if want := min(n, int(size)); len(es) != want {
					t.Fatalf("%d tokens, want %d: %s", len(es), want, layout(r))
				}
				var total uint64
				lo := size >> bits.Len(uint(n-1)) // ceil(log2 n) halvings
				hi := size >> (bits.Len(uint(n)) - 1)
				for i, e := range es {
					total += sizes[i]
					if e.Version != 0 || uint64(e.Free) != sizes[i] {
						t.Errorf("token %d: version %d free %d size %d", i, e.Version, e.Free, sizes[i])
					}
					if i > 0 && e.Peer <= es[i-1].Peer {
						t.Errorf("token %d owned by %v after %v: owners not in name order", i, e.Peer, es[i-1].Peer)
					}
					if n <= int(size) && (sizes[i] < lo || sizes[i] > hi) {
						t.Errorf("token %d has %d addresses, want %d..%d", i, sizes[i], lo, hi)
					}
					if !sizeIsPow2(sizes[i]) || uint64(e.Token-r.start)%sizes[i] != 0 {
						t.Errorf("token %d: %d addresses at offset %d is not CIDR-aligned", i, sizes[i], e.Token-r.start)
					}
				}
				if total != size {
					t.Errorf("tokens cover %d addresses, want %d", total, size)
				}
				if n <= int(size) {
					if got := r.Peers(); !slices.Equal(got, sorted) {
						t.Errorf("owners %v, want every peer %v", got, sorted)
					}
				}
			})
		}
	}
}

func sizeIsPow2(n uint64) bool { return n != 0 && n&(n-1) == 0 }

func TestClaimForPeersExact(t *testing.T) {
	cases := []struct {
		universe netip.Prefix
		n        int
		want     string
	}{
		{slash24, 1, "0=1/256 v0 f256"},
		{slash24, 2, "0=1/128 v0 f128 128=2/128 v0 f128"},
		{slash24, 3, "0=1/128 v0 f128 128=2/64 v0 f64 192=3/64 v0 f64"}, // /25, /26, /26
		{slash29, 5, "0=1/2 v0 f2 2=2/2 v0 f2 4=3/2 v0 f2 6=4/1 v0 f1 7=5/1 v0 f1"},
		{slash29, 12, "0=1/1 v0 f1 1=2/1 v0 f1 2=4/1 v0 f1 3=5/1 v0 f1 4=7/1 v0 f1 5=8/1 v0 f1 6=a/1 v0 f1 7=b/1 v0 f1"},
	}
	for _, c := range cases {
		var peers []proto.PeerName
		for i := c.n; i >= 1; i-- { // descending: ClaimForPeers sorts
			peers = append(peers, 0x0a0000000000+proto.PeerName(i))
		}
		r := newRing(t, c.universe, peers...)
		if got := layout(r); got != c.want {
			t.Errorf("%v, %d peers:\n got %s\nwant %s", c.universe, c.n, got, c.want)
		}
		checkHash(t, r)
	}
}

func TestClaimForPeersDedupe(t *testing.T) {
	r := newRing(t, slash24, pc, pa, 0, pc, pb, pa)
	if got, want := r.Seeds(), []proto.PeerName{pa, pb, pc}; !slices.Equal(got, want) {
		t.Fatalf("seeds %v, want %v", got, want)
	}
	if got, want := layout(r), "0=1/128 v0 f128 128=2/64 v0 f64 192=3/64 v0 f64"; got != want {
		t.Fatalf("ring %s, want %s", got, want)
	}
	// An initialised ring is left alone.
	h := r.Hash()
	r.ClaimForPeers([]proto.PeerName{pd})
	if r.Hash() != h || r.Len() != 3 {
		t.Fatalf("ClaimForPeers changed an initialised ring: %s", layout(r))
	}
	// Nobody (or only the zero name) leaves it empty.
	e, _ := New(slash24)
	e.ClaimForPeers(nil)
	e.ClaimForPeers([]proto.PeerName{0, 0})
	if !e.Empty() || len(e.Seeds()) != 0 {
		t.Fatalf("ClaimForPeers of no peers: %s seeds %v", layout(e), e.Seeds())
	}
}

func TestOwner(t *testing.T) {
	r := newRing(t, slash24, pa, pb, pc)
	for _, c := range []struct {
		o    int
		want proto.PeerName
	}{{0, pa}, {1, pa}, {127, pa}, {128, pb}, {191, pb}, {192, pc}, {255, pc}, {256, 0}, {-1, 0}} {
		if got := r.Owner(addr24(0) + uint32(c.o)); got != c.want {
			t.Errorf("Owner(.%d) = %v, want %v", c.o, got, c.want)
		}
	}
	e, _ := New(slash24)
	if got := e.Owner(addr24(5)); got != 0 {
		t.Errorf("empty ring: Owner = %v, want 0", got)
	}
}

func TestGrant(t *testing.T) {
	t.Run("simple", func(t *testing.T) {
		r := newRing(t, slash24, pa, pb)
		if err := r.Grant(addr24(192), uint64(addr24(0))+256, pb, pc); err != nil {
			t.Fatal(err)
		}
		checkHash(t, r)
		es, sizes := r.Entries()
		if len(es) != 3 || es[2].Token != addr24(192) || es[2].Peer != pc || es[2].Version != 0 || es[2].Free != 64 || sizes[2] != 64 {
			t.Fatalf("ring %s", layout(r))
		}
		if es[1].Peer != pb || sizes[1] != 64 || es[0].Peer != pa || sizes[0] != 128 {
			t.Fatalf("ring %s", layout(r))
		}
		if err := r.Check(); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("split in the middle", func(t *testing.T) {
		r := newRing(t, slash24, pa)
		if err := r.Grant(addr24(64), uint64(addr24(128)), pa, pb); err != nil {
			t.Fatal(err)
		}
		checkHash(t, r)
		es, sizes := r.Entries()
		if len(es) != 3 {
			t.Fatalf("a hole in the middle makes %d tokens, want 3: %s", len(es), layout(r))
		}
		want := []struct {
			o    int
			peer proto.PeerName
			size uint64
		}{{0, pa, 64}, {64, pb, 64}, {128, pa, 128}}
		for i, w := range want {
			if es[i].Token != addr24(w.o) || es[i].Peer != w.peer || sizes[i] != w.size {
				t.Fatalf("token %d: got %s, want .%d=%v/%d", i, layout(r), w.o, w.peer, w.size)
			}
		}
		if es[1].Version != 0 || es[1].Free != 64 || es[2].Version != 0 {
			t.Errorf("new tokens start at version 0: %s", layout(r))
		}
		if r.Owner(addr24(63)) != pa || r.Owner(addr24(64)) != pb || r.Owner(addr24(127)) != pb || r.Owner(addr24(128)) != pa {
			t.Errorf("owners around the hole: %s", layout(r))
		}
	})
	t.Run("at start", func(t *testing.T) {
		r := newRing(t, slash24, pa)
		if err := r.Grant(addr24(0), uint64(addr24(64)), pa, pb); err != nil {
			t.Fatal(err)
		}
		checkHash(t, r)
		if got, want := layout(r), "0=2/64 v1 f64 64=1/192 v0 f0"; got != want {
			t.Fatalf("ring %s, want %s", got, want)
		}
		if err := r.Check(); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("whole range", func(t *testing.T) {
		r := newRing(t, slash24, pa, pb)
		if err := r.Grant(addr24(0), uint64(addr24(0))+256, pa, pc); !errors.Is(err, ErrNotOwner) {
			t.Fatalf("granting b's space too: %v, want ErrNotOwner", err)
		}
		if err := r.Grant(addr24(128), uint64(addr24(0))+256, pb, pc); err != nil {
			t.Fatal(err)
		}
		if got, want := layout(r), "0=1/128 v0 f128 128=3/128 v1 f128"; got != want {
			t.Fatalf("ring %s, want %s", got, want)
		}
	})
	t.Run("not owned", func(t *testing.T) {
		r := newRing(t, slash24, pa, pb)
		before := r.Clone()
		for _, c := range []struct {
			start, end int
			from       proto.PeerName
		}{{100, 150, pa}, {100, 150, pb}, {0, 10, pb}, {130, 140, pa}, {200, 256, pc}} {
			if err := r.Grant(addr24(c.start), uint64(addr24(0))+uint64(c.end), c.from, pd); !errors.Is(err, ErrNotOwner) {
				t.Errorf("grant .%d-.%d from %v: %v, want ErrNotOwner", c.start, c.end, c.from, err)
			}
		}
		if !r.Equal(before) || r.Hash() != before.Hash() {
			t.Fatalf("refused grants changed the ring: %s", layout(r))
		}
	})
	t.Run("bad bounds", func(t *testing.T) {
		r := newRing(t, slash24, pa)
		before := r.Clone()
		for _, c := range [][2]uint64{{uint64(addr24(10)), uint64(addr24(10))}, {uint64(addr24(10)), uint64(addr24(5))},
			{uint64(addr24(0)) - 1, uint64(addr24(5))}, {uint64(addr24(10)), uint64(addr24(0)) + 257}} {
			if err := r.Grant(uint32(c[0]), c[1], pa, pb); err == nil || errors.Is(err, ErrNotOwner) {
				t.Errorf("grant %v-%v: %v, want a bounds error", ipv4.Addr(uint32(c[0])), c[1], err)
			}
		}
		if !r.Equal(before) {
			t.Fatalf("refused grants changed the ring: %s", layout(r))
		}
		e, _ := New(slash24)
		if err := e.Grant(addr24(0), uint64(addr24(10)), pa, pb); err == nil {
			t.Errorf("grant in an empty ring succeeded")
		}
	})
}

func TestTransfer(t *testing.T) {
	r := newRing(t, slash24, pa, pb, pc)
	if err := r.Grant(addr24(64), uint64(addr24(96)), pa, pc); err != nil { // c owns two ranges
		t.Fatal(err)
	}
	h := r.Hash()
	if n := r.Transfer(pc, pb); n != 96 {
		t.Fatalf("Transfer returned %d, want 96", n)
	}
	checkHash(t, r)
	if r.Hash() == h {
		t.Fatal("hash unchanged by a transfer")
	}
	if got, want := layout(r), "0=1/64 v0 f128 64=2/32 v100 f32 96=1/32 v0 f0 128=2/64 v0 f64 192=2/64 v100 f64"; got != want {
		t.Fatalf("ring %s\nwant %s", got, want)
	}
	if n := r.Transfer(pd, pa); n != 0 {
		t.Fatalf("Transfer of a peer owning nothing returned %d", n)
	}
	if err := r.Check(); err != nil {
		t.Fatal(err)
	}

	// Versions stop at the bound.
	r = fromProto(t, slash24, []proto.PeerName{pa}, proto.RingEntry{Token: addr24(0), Peer: pa, Version: proto.MaxRingVersion - 50})
	if n := r.Transfer(pa, pb); n != 256 {
		t.Fatalf("Transfer returned %d, want 256", n)
	}
	if es, _ := r.Entries(); es[0].Version != proto.MaxRingVersion-1 || es[0].Peer != pb {
		t.Fatalf("transfer near the version bound: %s", layout(r))
	}
	if err := r.Check(); err != nil {
		t.Fatal(err)
	}
}

func TestReportFree(t *testing.T) {
	r := newRing(t, slash24, pa, pb)
	same := func(start uint32, end uint64) uint64 { return end - uint64(start) }
	h := r.Hash()
	if r.ReportFree(pa, same) {
		t.Fatal("ReportFree of unchanged counts reported a change")
	}
	if r.Hash() != h || layout(r) != "0=1/128 v0 f128 128=2/128 v0 f128" {
		t.Fatalf("unchanged counts changed the ring: %s", layout(r))
	}
	if !r.ReportFree(pa, func(uint32, uint64) uint64 { return 100 }) {
		t.Fatal("ReportFree of new counts reported no change")
	}
	checkHash(t, r)
	if got, want := layout(r), "0=1/128 v1 f100 128=2/128 v0 f128"; got != want {
		t.Fatalf("ring %s, want %s (only self's entries change)", got, want)
	}
	if r.ReportFree(pa, func(uint32, uint64) uint64 { return 100 }) {
		t.Fatal("reporting the same count again reported a change")
	}
	if got, want := layout(r), "0=1/128 v1 f100 128=2/128 v0 f128"; got != want {
		t.Fatalf("ring %s, want %s", got, want)
	}
	if r.ReportFree(pd, func(uint32, uint64) uint64 { return 1 }) {
		t.Fatal("ReportFree for a peer owning nothing reported a change")
	}
}

func TestMergeAdopt(t *testing.T) {
	src := newRing(t, slash24, pa, pb)
	if err := src.Grant(addr24(192), uint64(addr24(0))+256, pb, pc); err != nil {
		t.Fatal(err)
	}
	r, _ := New(slash24)
	m := src.Proto()
	changed, err := r.Merge(&m, false)
	if err != nil || !changed {
		t.Fatalf("merge into an empty ring: %v, %v", changed, err)
	}
	if !r.Equal(src) || r.Hash() != src.Hash() {
		t.Fatalf("adopted %s, want %s", layout(r), layout(src))
	}
	if !slices.Equal(r.Seeds(), []proto.PeerName{pa, pb}) {
		t.Fatalf("seeds not adopted: %v", r.Seeds())
	}
	// The merged ring does not alias the message.
	m.Entries[0].Version = 77
	m.Seeds[0] = pd
	if !r.Equal(src) {
		t.Fatal("ring aliases the merged message")
	}
	// An empty ring merges as nothing.
	e, _ := New(slash24)
	em := e.Proto()
	if changed, err := r.Merge(&em, false); changed || err != nil {
		t.Fatalf("merging an empty ring: %v, %v", changed, err)
	}
	if changed, err := e.Merge(&em, false); changed || err != nil || !e.Empty() {
		t.Fatalf("merging an empty ring into an empty ring: %v, %v", changed, err)
	}
}

func TestMergeEntries(t *testing.T) {
	seeds := []proto.PeerName{pa, pb}
	base := func() []proto.RingEntry {
		return []proto.RingEntry{{Token: addr24(0), Peer: pa, Version: 3, Free: 100}, {Token: addr24(128), Peer: pb, Version: 3, Free: 100}}
	}
	type tc struct {
		name    string
		theirs  proto.RingEntry // replaces or adds to base at its token
		winner  string          // "ours" or "theirs"
		changed bool
	}
	cases := []tc{
		{"token only in theirs", proto.RingEntry{Token: addr24(192), Peer: pc, Free: 64}, "theirs", true},
		{"higher version wins", proto.RingEntry{Token: addr24(128), Peer: pc, Version: 4, Free: 128}, "theirs", true},
		{"lower version loses", proto.RingEntry{Token: addr24(128), Peer: pc, Version: 2, Free: 0}, "ours", false},
		{"equal version: fewer free wins", proto.RingEntry{Token: addr24(128), Peer: pa, Version: 3, Free: 99}, "theirs", true},
		{"equal version: more free loses", proto.RingEntry{Token: addr24(128), Peer: pc, Version: 3, Free: 101}, "ours", false},
		{"equal version and free: higher peer wins", proto.RingEntry{Token: addr24(128), Peer: pc, Version: 3, Free: 100}, "theirs", true},
		{"equal version and free: lower peer loses", proto.RingEntry{Token: addr24(128), Peer: pa, Version: 3, Free: 100}, "ours", false},
		{"identical", proto.RingEntry{Token: addr24(128), Peer: pb, Version: 3, Free: 100}, "ours", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			theirs := base()
			i, found := slices.BinarySearchFunc(theirs, c.theirs.Token, func(e proto.RingEntry, a uint32) int { return int(int64(e.Token) - int64(a)) })
			if found {
				theirs[i] = c.theirs
			} else {
				theirs = slices.Insert(theirs, i, c.theirs)
			}
			ours := fromProto(t, slash24, seeds, base()...)
			them := fromProto(t, slash24, seeds, theirs...)
			m := them.Proto()
			changed, err := ours.Merge(&m, false)
			if err != nil {
				t.Fatal(err)
			}
			if changed != c.changed {
				t.Errorf("changed = %v, want %v", changed, c.changed)
			}
			checkHash(t, ours)
			want := them
			if c.winner == "ours" {
				want = fromProto(t, slash24, seeds, base()...)
			}
			if !ours.Equal(want) {
				t.Errorf("merged %s, want %s", layout(ours), layout(want))
			}
			// And the other way round: the join is symmetric.
			m2 := fromProto(t, slash24, seeds, base()...).Proto()
			changed2, err := them.Merge(&m2, false)
			if err != nil {
				t.Fatal(err)
			}
			if !them.Equal(ours) {
				t.Errorf("reversed merge %s, want %s", layout(them), layout(ours))
			}
			if want := c.winner == "ours" && c.name != "identical"; changed2 != want {
				t.Errorf("reversed merge: changed = %v, want %v", changed2, want)
			}
		})
	}
}

// randomGrants applies up to n random grants (each by the owner of a
// random address, of a random run inside its span, to a random peer) and
// other owner actions to r.
func randomGrants(t *testing.T, rng *rand.Rand, r *Ring, peers []proto.PeerName, n int) {
	t.Helper()
	for range n {
		spans := r.Spans()
		s := spans[rng.IntN(len(spans))]
		switch rng.IntN(6) {
		case 0:
			r.ReportFree(s.Peer, func(start uint32, end uint64) uint64 { return uint64(rng.IntN(int(end - uint64(start) + 1))) })
			continue
		case 1:
			if rng.IntN(4) == 0 {
				r.Transfer(s.Peer, peers[rng.IntN(len(peers))])
				continue
			}
		}
		size := s.Size()
		a := uint64(s.Start) + rng.Uint64N(size)
		b := a + 1 + rng.Uint64N(s.End-a)
		to := peers[rng.IntN(len(peers))]
		if to == s.Peer {
			// A grant to oneself resets free counts without a version
			// bump: not a change the join can order. Owners never do it.
			continue
		}
		if err := r.Grant(uint32(a), b, s.Peer, to); err != nil {
			t.Fatalf("grant %v-%v of a span of %v: %v", ipv4.Addr(uint32(a)), b, s.Peer, err)
		}
		if err := r.Check(); err != nil {
			t.Fatal(err)
		}
	}
}

func TestMergeCommutativeIdempotent(t *testing.T) {
	peers := []proto.PeerName{pa, pb, pc, pd}
	for seed := range uint64(200) {
		rng := rand.New(rand.NewPCG(seed, 42))
		universe := slash24
		if seed%2 == 1 {
			universe = slash29
		}
		ancestor := newRing(t, universe, peers[:1+rng.IntN(len(peers))]...)
		randomGrants(t, rng, ancestor, peers, rng.IntN(4))
		replicas := make([]*Ring, 2+rng.IntN(4))
		for i := range replicas {
			replicas[i] = ancestor.Clone()
			randomGrants(t, rng, replicas[i], peers, rng.IntN(6))
			// Some replicas have already heard from others.
			if i > 0 && rng.IntN(3) == 0 {
				m := replicas[rng.IntN(i)].Proto()
				if _, err := replicas[i].Merge(&m, false); err != nil {
					t.Fatalf("seed %d: %v", seed, err)
				}
				randomGrants(t, rng, replicas[i], peers, rng.IntN(3))
			}
		}
		var first *Ring
		for range 4 {
			order := rng.Perm(len(replicas))
			var into *Ring
			if rng.IntN(2) == 0 {
				into, _ = New(universe)
			} else {
				into = ancestor.Clone()
			}
			for _, k := range order {
				m := replicas[k].Proto()
				before := into.Clone()
				changed, err := into.Merge(&m, false)
				if err != nil {
					t.Fatalf("seed %d: merge: %v", seed, err)
				}
				if changed == before.Equal(into) {
					t.Fatalf("seed %d: Merge reported changed=%v, but before %s after %s", seed, changed, layout(before), layout(into))
				}
				if err := into.Check(); err != nil {
					t.Fatalf("seed %d: merged ring: %v", seed, err)
				}
				checkHash(t, into)
			}
			if first == nil {
				first = into
				continue
			}
			if !into.Equal(first) || into.Hash() != first.Hash() {
				t.Fatalf("seed %d: merge order %v gives\n%s\nanother gives\n%s", seed, order, layout(into), layout(first))
			}
		}
		// Idempotent: merging any replica (or the result) again changes nothing.
		for _, k := range append(rng.Perm(len(replicas)), -1) {
			var m proto.Ring
			if k < 0 {
				m = first.Proto()
			} else {
				m = replicas[k].Proto()
			}
			h := first.Hash()
			changed, err := first.Merge(&m, false)
			if err != nil || changed || first.Hash() != h {
				t.Fatalf("seed %d: merging again: changed %v, %v", seed, changed, err)
			}
		}
		// Pairwise symmetry.
		x, y := replicas[0].Clone(), replicas[1].Clone()
		mx, my := replicas[0].Proto(), replicas[1].Proto()
		if _, err := x.Merge(&my, false); err != nil {
			t.Fatal(err)
		}
		if _, err := y.Merge(&mx, false); err != nil {
			t.Fatal(err)
		}
		if !x.Equal(y) {
			t.Fatalf("seed %d: a⊔b = %s, b⊔a = %s", seed, layout(x), layout(y))
		}
	}
}

func TestMergeRangeError(t *testing.T) {
	ours := newRing(t, slash24, pa)
	other := newRing(t, netip.MustParsePrefix("10.0.0.0/24"), pa)
	m := other.Proto()
	h := ours.Hash()
	changed, err := ours.Merge(&m, false)
	if changed || err == nil {
		t.Fatalf("merge of another range: %v, %v", changed, err)
	}
	var re *RangeError
	if !errors.As(err, &re) {
		t.Fatalf("error %T %v, want *RangeError", err, err)
	}
	if got, want := err.Error(), "Incompatible IP allocation ranges (received: 10.0.0.0/24, ours: 172.16.16.0/24)"; got != want {
		t.Fatalf("error %q\nwant  %q", got, want)
	}
	if ours.Hash() != h {
		t.Fatal("refused merge changed the ring")
	}
	// An empty ring refuses it too.
	e, _ := New(slash24)
	if _, err := e.Merge(&m, false); !errors.As(err, &re) || !e.Empty() {
		t.Fatalf("empty ring: %v", err)
	}
}

func TestMergeSeedsError(t *testing.T) {
	ours := newRing(t, slash24, pa, pb)
	theirs := newRing(t, slash24, pa, pc)
	m := theirs.Proto()
	before := ours.Clone()
	changed, err := ours.Merge(&m, false)
	var se *SeedsError
	if changed || !errors.As(err, &se) {
		t.Fatalf("merge of a ring seeded otherwise: %v, %T %v", changed, err, err)
	}
	if want := "IP allocation was seeded by different peers (received: ["; !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("error %q, want prefix %q", err, want)
	}
	if want := fmt.Sprintf("(received: [%v %v], ours: [%v %v])", pa, pc, pa, pb); !strings.HasSuffix(err.Error(), want) {
		t.Errorf("error %q, want suffix %q", err, want)
	}
	if !ours.Equal(before) || ours.Hash() != before.Hash() {
		t.Fatal("refused merge changed the ring")
	}
	// The same, for a partial ring.
	pm := proto.Ring{Range: slash24, Seeds: []proto.PeerName{pa, pc}, Entries: []proto.RingEntry{{Token: addr24(128), Peer: pc, Version: 9}}}
	if _, err := ours.Merge(&pm, true); !errors.As(err, &se) || !ours.Equal(before) {
		t.Fatalf("partial ring seeded otherwise: %v", err)
	}
}

func TestMergeInvalid(t *testing.T) {
	seeds := []proto.PeerName{pa, pb}
	e := func(o int, p proto.PeerName, v uint32) proto.RingEntry {
		return proto.RingEntry{Token: addr24(0) + uint32(o), Peer: p, Version: v}
	}
	cases := []struct {
		name    string
		seeds   []proto.PeerName
		entries []proto.RingEntry
	}{
		{"unsorted", seeds, []proto.RingEntry{e(0, pa, 9), e(128, pb, 9), e(64, pa, 9)}},
		{"duplicate token", seeds, []proto.RingEntry{e(0, pa, 9), e(128, pb, 9), e(128, pa, 9)}},
		{"first token not range start", seeds, []proto.RingEntry{e(1, pa, 9), e(128, pb, 9)}},
		{"token outside range", seeds, []proto.RingEntry{e(0, pa, 9), e(128, pb, 9), e(256, pb, 9)}},
		{"token below range", seeds, []proto.RingEntry{e(-1, pa, 9), e(0, pa, 9)}},
		{"zero owner", seeds, []proto.RingEntry{e(0, pa, 9), e(128, 0, 9)}},
		{"version over the limit", seeds, []proto.RingEntry{e(0, pa, 9), e(128, pb, proto.MaxRingVersion+1)}},
		{"no seeds", nil, []proto.RingEntry{e(0, pa, 9)}},
		{"seeds without entries", seeds, nil},
		{"unsorted seeds", []proto.PeerName{pb, pa}, []proto.RingEntry{e(0, pa, 9)}},
		{"zero seed", []proto.PeerName{0, pa}, []proto.RingEntry{e(0, pa, 9)}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := proto.Ring{Range: slash24, Seeds: c.seeds, Entries: c.entries}
			if err := Check(&m, slash24); err == nil {
				t.Fatal("Check accepted it")
			}
			if _, err := FromProto(&m, slash24); err == nil {
				t.Fatal("FromProto accepted it")
			}
			for _, into := range []*Ring{newRing(t, slash24, pa, pb), newRing(t, slash24)} {
				before := into.Clone()
				h := into.Hash()
				changed, err := into.Merge(&m, false)
				if err == nil || changed {
					t.Fatalf("merge: %v, %v", changed, err)
				}
				if !into.Equal(before) || into.Hash() != h {
					t.Fatalf("refused merge changed the ring: %s", layout(into))
				}
			}
		})
	}
	// The version limit itself is allowed.
	m := proto.Ring{Range: slash24, Seeds: seeds, Entries: []proto.RingEntry{e(0, pa, proto.MaxRingVersion)}}
	if err := Check(&m, slash24); err != nil {
		t.Fatalf("version at the limit: %v", err)
	}
}

func TestDiffPartialMerge(t *testing.T) {
	t.Run("grant", func(t *testing.T) {
		old := newRing(t, slash24, pa, pb)
		now := old.Clone()
		if err := now.Grant(addr24(64), uint64(addr24(96)), pa, pc); err != nil {
			t.Fatal(err)
		}
		now.ReportFree(pa, func(start uint32, end uint64) uint64 { return end - uint64(start) })
		d := now.Diff(old)
		if len(d) == 0 {
			t.Fatal("empty diff")
		}
		m := proto.Ring{Range: slash24, Seeds: now.Seeds(), Entries: d}
		into := old.Clone()
		changed, err := into.Merge(&m, true)
		if err != nil || !changed {
			t.Fatalf("partial merge: %v, %v", changed, err)
		}
		if !into.Equal(now) {
			t.Fatalf("old + diff = %s, want %s", layout(into), layout(now))
		}
		checkHash(t, into)
		// Merging it again changes nothing.
		if changed, err := into.Merge(&m, true); changed || err != nil {
			t.Fatalf("partial merge again: %v, %v", changed, err)
		}
		if d := now.Diff(now); len(d) != 0 {
			t.Fatalf("diff of a ring with itself: %v", d)
		}
	})
	t.Run("random", func(t *testing.T) {
		peers := []proto.PeerName{pa, pb, pc, pd}
		for seed := range uint64(200) {
			rng := rand.New(rand.NewPCG(seed, 7))
			old := newRing(t, slash24, peers[:1+rng.IntN(4)]...)
			randomGrants(t, rng, old, peers, rng.IntN(5))
			now := old.Clone()
			randomGrants(t, rng, now, peers, 1+rng.IntN(4))
			d := now.Diff(old)
			for i, e := range d {
				if e.Peer == 0 && (i == 0 || d[i-1].Peer == 0) {
					t.Fatalf("seed %d: bound marker not after a changed entry: %v", seed, d)
				}
			}
			m := proto.Ring{Range: slash24, Seeds: now.Seeds(), Entries: d}
			into := old.Clone()
			if len(d) == 0 {
				if !now.Equal(old) {
					t.Fatalf("seed %d: empty diff between different rings", seed)
				}
				continue
			}
			if _, err := into.Merge(&m, true); err != nil {
				t.Fatalf("seed %d: %v", seed, err)
			}
			if !into.Equal(now) {
				t.Fatalf("seed %d: old + diff = %s, want %s", seed, layout(into), layout(now))
			}
		}
	})
	t.Run("missing bound token", func(t *testing.T) {
		o := newRing(t, slash24, pa) // a owns everything
		n1 := o.Clone()
		if err := n1.Grant(addr24(64), uint64(addr24(128)), pa, pb); err != nil {
			t.Fatal(err)
		}
		n2 := n1.Clone()
		if err := n2.Grant(addr24(64), uint64(addr24(96)), pb, pc); err != nil {
			t.Fatal(err)
		}
		d := n2.Diff(n1)
		if len(d) == 0 || d[len(d)-1].Peer != 0 || d[len(d)-1].Token != addr24(128) {
			t.Fatalf("diff %v: want a bound marker at .128 last", d)
		}
		m := proto.Ring{Range: slash24, Seeds: n2.Seeds(), Entries: d}
		before := o.Clone()
		changed, err := o.Merge(&m, true)
		if !errors.Is(err, ErrNeedWhole) || changed {
			t.Fatalf("partial ring past a token we lack: %v, %v; want ErrNeedWhole", changed, err)
		}
		if !o.Equal(before) || o.Hash() != before.Hash() {
			t.Fatalf("refused partial ring changed ours: %s", layout(o))
		}
		// One that holds the token merges it.
		into := n1.Clone()
		if _, err := into.Merge(&m, true); err != nil || !into.Equal(n2) {
			t.Fatalf("n1 + diff: %v, %s", err, layout(into))
		}
		// A partial ring can't start an empty one.
		e, _ := New(slash24)
		if _, err := e.Merge(&m, true); !errors.Is(err, ErrNeedWhole) || !e.Empty() {
			t.Fatalf("partial into empty: %v", err)
		}
	})
}

func TestDonors(t *testing.T) {
	seeds := []proto.PeerName{pa, pb, pc, pd}
	e := func(o int, p proto.PeerName, free uint32) proto.RingEntry {
		return proto.RingEntry{Token: addr24(0) + uint32(o), Peer: p, Free: free}
	}
	r := fromProto(t, slash24, seeds,
		e(0, pa, 10),
		e(32, pb, 20),
		e(64, pc, 5),
		e(96, pd, 0), // no free space: never asked
		e(128, pc, 15),
		e(160, pa, 40),  // more than the range holds: counts as 32
		e(192, pb, 200), // counts as 64
	)
	whole := uint64(addr24(0)) + 256
	// Free: a 10+32=42, b 20+64=84, c 20, d 0.
	if got, want := r.Donors(pd, addr24(0), whole), []proto.PeerName{pb, pa, pc}; !slices.Equal(got, want) {
		t.Errorf("Donors(d) = %v, want %v", got, want)
	}
	if got, want := r.Donors(pb, addr24(0), whole), []proto.PeerName{pa, pc}; !slices.Equal(got, want) {
		t.Errorf("Donors(b) = %v, want %v (self excluded)", got, want)
	}
	// Only ranges that overlap the wanted space count: [.64, .160) has
	// c (5 + 15) and d (0).
	if got, want := r.Donors(pa, addr24(64), uint64(addr24(160))), []proto.PeerName{pc}; !slices.Equal(got, want) {
		t.Errorf("Donors in .64-.160 = %v, want %v", got, want)
	}
	// Ties go to the higher name.
	r = fromProto(t, slash24, seeds, e(0, pa, 10), e(64, pc, 10), e(128, pb, 10), e(192, pd, 3))
	if got, want := r.Donors(pd, addr24(0), whole), []proto.PeerName{pc, pb, pa}; !slices.Equal(got, want) {
		t.Errorf("tied Donors = %v, want %v", got, want)
	}
	if got := r.Donors(pd, addr24(60), uint64(addr24(64))); !slices.Equal(got, []proto.PeerName{pa}) {
		t.Errorf("Donors in .60-.64 = %v, want [a]", got)
	}
	e0, _ := New(slash24)
	if got := e0.Donors(pa, addr24(0), whole); len(got) != 0 {
		t.Errorf("empty ring has donors %v", got)
	}
}

func TestHash(t *testing.T) {
	r1 := newRing(t, slash24, pa, pb, pc)
	r2 := newRing(t, slash24, pc, pb, pa)
	if r1.Hash() != r2.Hash() || !r1.Equal(r2) {
		t.Fatal("equal rings hash differently")
	}
	m := r1.Proto()
	if HashProto(&m) != r1.Hash() {
		t.Fatal("HashProto(Proto) != Hash")
	}
	e1, _ := New(slash24)
	e2, _ := New(netip.MustParsePrefix("10.0.0.0/24"))
	if e1.Hash() == e2.Hash() {
		t.Error("empty rings of different ranges hash equal")
	}
	seen := map[uint64]string{r1.Hash(): layout(r1)}
	steps := []func(r *Ring){
		func(r *Ring) { _ = r.Grant(addr24(200), uint64(addr24(210)), pc, pd) },
		func(r *Ring) { r.ReportFree(pa, func(uint32, uint64) uint64 { return 3 }) },
		func(r *Ring) { r.Transfer(pb, pa) },
		func(r *Ring) {
			m := proto.Ring{Range: slash24, Seeds: r.Seeds(), Entries: []proto.RingEntry{{Token: addr24(100), Peer: pd, Version: 1}}}
			if _, err := r.Merge(&m, true); err != nil {
				t.Fatal(err)
			}
		},
	}
	for i, step := range steps {
		step(r1)
		checkHash(t, r1)
		if prev, ok := seen[r1.Hash()]; ok {
			t.Errorf("step %d: hash %x of %s already seen for %s", i, r1.Hash(), layout(r1), prev)
		}
		seen[r1.Hash()] = layout(r1)
		c := r1.Clone()
		if c.Hash() != r1.Hash() {
			t.Errorf("step %d: clone hashes differently", i)
		}
	}
	// A ring differing only in a seed hashes differently.
	r3 := newRing(t, slash24, pa, pb)
	r4 := fromProto(t, slash24, []proto.PeerName{pa, pb, pc}, r3.Proto().Entries...)
	if r3.Hash() == r4.Hash() {
		t.Error("rings with different seeds hash equal")
	}
}

func TestCheckRange(t *testing.T) {
	for _, c := range []struct {
		p    string
		want string
	}{
		{"10.0.0.1/24", "invalid subnet - bits after network prefix are not all zero: 10.0.0.1/24"},
		{"10.0.0.0/31", "invalid subnet - smaller than minimum size 4: 10.0.0.0/31"},
		{"10.0.0.0/32", "invalid subnet - smaller than minimum size 4: 10.0.0.0/32"},
		{"10.0.0.0/30", ""},
		{"10.32.0.0/12", ""},
		{"0.0.0.0/0", "invalid subnet - the whole address space cannot be a range: 0.0.0.0/0"},
		{"fd00::/64", "invalid subnet - not an IPv4 prefix: fd00::/64"},
	} {
		err := CheckRange(netip.MustParsePrefix(c.p))
		got := ""
		if err != nil {
			got = err.Error()
		}
		if got != c.want {
			t.Errorf("CheckRange(%s) = %q, want %q", c.p, got, c.want)
		}
		if _, err := New(netip.MustParsePrefix(c.p)); (err == nil) != (c.want == "") {
			t.Errorf("New(%s): %v", c.p, err)
		}
	}
	if err := CheckRange(netip.Prefix{}); err == nil {
		t.Error("CheckRange of the zero prefix passed")
	}
}

func TestSpansOwnedBy(t *testing.T) {
	r := newRing(t, slash24, pa, pb)
	if err := r.Grant(addr24(64), uint64(addr24(96)), pa, pb); err != nil {
		t.Fatal(err)
	}
	// a: [.0,.64) [.96,.128); b: [.64,.96) [.128,.256).
	sp := r.Spans()
	if len(sp) != 4 {
		t.Fatalf("spans %v", sp)
	}
	var total uint64
	for _, s := range sp {
		total += s.Size()
	}
	if total != 256 {
		t.Fatalf("spans cover %d", total)
	}
	ob := r.OwnedBy(pb)
	if len(ob) != 2 || ob[0].Start != addr24(64) || ob[0].End != uint64(addr24(96)) || ob[1].Start != addr24(128) || ob[1].End != uint64(addr24(0))+256 {
		t.Fatalf("OwnedBy(b) = %v", ob)
	}
	if got := r.Peers(); !slices.Equal(got, []proto.PeerName{pa, pb}) {
		t.Fatalf("Peers = %v", got)
	}
}

// TestMergePartialTokenBelowRange: a partial ring may start past the start
// of the range, but none of its tokens may lie below it. Merged, such a
// token becomes the ring's first: the ring fails Check, every peer refuses
// it, and a node that saved it cannot restart.
func TestMergePartialTokenBelowRange(t *testing.T) {
	r := newRing(t, slash24, pa, pb)
	before := r.Clone()
	m := proto.Ring{Range: slash24, Seeds: r.Seeds(), Entries: []proto.RingEntry{
		{Token: ipv4.Value(netip.MustParseAddr("10.0.0.0")), Peer: pb, Version: 1},
	}}
	changed, err := r.Merge(&m, true)
	if err == nil || changed || !r.Equal(before) {
		t.Fatalf("partial ring with a token below the range: changed %v, err %v; ring now %s (Check: %v)", changed, err, layout(r), r.Check())
	}
}

func TestSpanPrefixes(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 5))
	for i := range 2000 {
		var s Span
		switch i {
		case 0:
			s = Span{Start: 0, End: 1 << 32}
		case 1:
			s = Span{Start: addr24(0), End: uint64(addr24(0)) + 256}
		default:
			s.Start = uint32(rng.Uint64N(1 << 32))
			s.End = uint64(s.Start) + 1 + rng.Uint64N(min(1<<32-uint64(s.Start), 1<<uint(1+rng.IntN(31))))
		}
		ps := s.Prefixes()
		cur := uint64(s.Start)
		for j, p := range ps {
			if p.Masked() != p || uint64(ipv4.Value(p.Addr())) != cur {
				t.Fatalf("%v-%v: prefix %d is %v, want one starting at %v", ipv4.Addr(s.Start), s.End, j, p, ipv4.Addr(uint32(cur)))
			}
			size := uint64(1) << (32 - p.Bits())
			// Fewest blocks: no two neighbours make one bigger block.
			if j > 0 && ps[j-1].Bits() == p.Bits() && (cur-size)%(2*size) == 0 {
				t.Fatalf("%v-%v: %v and %v could be one block", ipv4.Addr(s.Start), s.End, ps[j-1], p)
			}
			cur += size
		}
		if cur != s.End {
			t.Fatalf("%v-%v: prefixes %v end at %d", ipv4.Addr(s.Start), s.End, ps, cur)
		}
	}
	if got := (Span{Start: addr24(1), End: uint64(addr24(0)) + 8}).Prefixes(); fmt.Sprint(got) != "[172.16.16.1/32 172.16.16.2/31 172.16.16.4/30]" {
		t.Fatalf("prefixes of .1-.7: %v", got)
	}
}

// TestVersionLimitNeverWins: an entry at proto.MaxRingVersion (one no
// honest peer reaches) loses to what we hold, adds no token, and makes a
// ring we cannot start from; our own changes stop one under it.
func TestVersionLimitNeverWins(t *testing.T) {
	r := newRing(t, slash24, pa, pb)
	before := r.Clone()
	seeds := r.Seeds()
	ours, _ := r.Entries()
	forged := proto.Ring{Range: slash24, Seeds: seeds, Entries: []proto.RingEntry{
		{Token: addr24(0), Peer: pc, Version: proto.MaxRingVersion},  // an existing token
		{Token: addr24(10), Peer: pc, Version: proto.MaxRingVersion}, // a new one
		ours[1]}}
	if AtLimit(&forged) != 2 {
		t.Fatalf("AtLimit %d", AtLimit(&forged))
	}
	changed, err := r.Merge(&forged, false)
	if err != nil || changed || !r.Equal(before) {
		t.Fatalf("merge of entries at the limit: changed %v, %v:\n%s", changed, err, layout(r))
	}
	if _, err := (&Ring{universe: slash24}).Merge(&forged, false); !errors.Is(err, ErrAtLimit) {
		t.Errorf("an empty ring took a ring with entries at the limit: %v", err)
	}
	// One under the limit is an ordinary (if unlikely) version and wins.
	forged.Entries[0].Version = proto.MaxRingVersion - 1
	forged.Entries = slices.Delete(forged.Entries, 1, 2)
	if changed, err := r.Merge(&forged, false); err != nil || !changed || r.Owner(addr24(0)) != pc {
		t.Errorf("version under the limit: %v %v", changed, err)
	}
	// Our own bumps from there stay under the limit.
	r.Grant(addr24(0), uint64(addr24(64)), pc, pa)
	if es, _ := r.Entries(); es[0].Version != proto.MaxRingVersion-1 {
		t.Errorf("a grant reached version %d", es[0].Version)
	}
	if err := r.Check(); err != nil {
		t.Error(err)
	}
}
