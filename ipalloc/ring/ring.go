// Package ring is the allocator's shared state: the address range seen as
// a ring of tokens, each owned by one peer, merged between peers as a CRDT.
//
// A token owns the addresses from itself up to the next token; the first
// token is always the start of the range, so the last one runs to its end.
// Only the owner of a range changes its entries (grants, free counts); a
// transfer (rmpeer) re-owns a peer's entries with a large version jump.
//
// Merge is a join: the union of the tokens, and at each token the entry
// that is greatest by (version, fewer free addresses, higher peer name).
// That order is total, so every merge order gives the same ring; conflicts
// (two peers that both think they own a range) are resolved by it, and the
// allocator reports those that touch its own allocations. Weave drops the
// connection instead; we never do.
package ring

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/overlayd/overlayd/internal/ipv4"
	"github.com/overlayd/overlayd/proto"
)

// TransferBump is added to the version of transferred entries, so that a
// transfer wins over concurrent small bumps by the old owner.
const TransferBump = 100

// maxOwnVersion is the highest version our own changes give an entry: one
// under proto.MaxRingVersion, which no honest peer reaches (2^31 changes to
// one entry), so an entry at the limit is known to be made up and never
// wins a merge.
const maxOwnVersion = proto.MaxRingVersion - 1

// Span is a run of addresses [Start, End) with one owner.
type Span struct {
	Start uint32
	End   uint64
	Peer  proto.PeerName
}

// Size is the number of addresses in s.
func (s Span) Size() uint64 { return s.End - uint64(s.Start) }

// A Ring is not safe for concurrent use.
type Ring struct {
	universe netip.Prefix
	start    uint32
	end      uint64
	seeds    []proto.PeerName
	entries  []proto.RingEntry // sorted by token, first token == start
	hash     uint64            // of the above, when hashed
	hashed   bool
}

// New returns an empty ring (not yet initialised) over universe, which must
// be an IPv4 prefix of at least 4 addresses with its host bits zero.
func New(universe netip.Prefix) (*Ring, error) {
	if err := CheckRange(universe); err != nil {
		return nil, err
	}
	start, end := ipv4.Bounds(universe)
	return &Ring{universe: universe, start: start, end: end}, nil
}

// CheckRange reports why p cannot be an allocation range, in Weave's words.
func CheckRange(p netip.Prefix) error {
	switch {
	case !p.IsValid() || !p.Addr().Is4():
		return fmt.Errorf("invalid subnet - not an IPv4 prefix: %v", p)
	case p.Masked() != p:
		return fmt.Errorf("invalid subnet - bits after network prefix are not all zero: %v", p)
	case p.Bits() > 30:
		return fmt.Errorf("invalid subnet - smaller than minimum size 4: %v", p)
	case p.Bits() == 0:
		return fmt.Errorf("invalid subnet - the whole address space cannot be a range: %v", p)
	}
	return nil
}

// Universe is the range the ring divides.
func (r *Ring) Universe() netip.Prefix { return r.universe }

// Empty reports whether the ring is still uninitialised.
func (r *Ring) Empty() bool { return len(r.entries) == 0 }

// Seeds are the peers the ring was first divided among, sorted.
func (r *Ring) Seeds() []proto.PeerName { return slices.Clone(r.seeds) }

// Len is the number of tokens.
func (r *Ring) Len() int { return len(r.entries) }

// Clone returns an independent copy.
func (r *Ring) Clone() *Ring {
	c := *r
	c.seeds = slices.Clone(r.seeds)
	c.entries = slices.Clone(r.entries)
	return &c
}

// Proto returns the ring as sent to peers (a copy).
func (r *Ring) Proto() proto.Ring {
	return proto.Ring{Range: r.universe, Seeds: slices.Clone(r.seeds), Entries: slices.Clone(r.entries)}
}

// Hash summarises the ring for anti-entropy: equal rings hash equal.
func (r *Ring) Hash() uint64 {
	if !r.hashed {
		r.hash, r.hashed = hash(r.universe, r.seeds, r.entries), true
	}
	return r.hash
}

// HashSpan summarises who owns [start, end): the tokens, owners and
// versions of the entries whose ranges meet it (free counts left out, so
// allocations elsewhere do not change it). Two rings that hash equal here
// agree on the owners of every address in the span.
func (r *Ring) HashSpan(start uint32, end uint64) uint64 {
	h := uint64(14695981039346656037)
	mix := func(v uint64) { h = (h ^ v) * 1099511628211 }
	mix(uint64(start)<<32 ^ end)
	for i, e := range r.entries {
		if uint64(e.Token) >= end || r.next(i) <= uint64(start) {
			continue
		}
		mix(uint64(e.Token)<<32 | uint64(e.Version))
		mix(uint64(e.Peer))
		mix(r.next(i))
	}
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	return h
}

// HashProto is Hash of a ring as received.
func HashProto(m *proto.Ring) uint64 { return hash(m.Range, m.Seeds, m.Entries) }

// hash is FNV-1a over 64-bit words, finished with a 64-bit mixer.
func hash(p netip.Prefix, seeds []proto.PeerName, entries []proto.RingEntry) uint64 {
	h := uint64(14695981039346656037)
	mix := func(v uint64) { h = (h ^ v) * 1099511628211 }
	start, _ := ipv4.Bounds(p)
	mix(uint64(start)<<8 | uint64(p.Bits()))
	mix(uint64(len(seeds)))
	for _, s := range seeds {
		mix(uint64(s))
	}
	mix(uint64(len(entries)))
	for _, e := range entries {
		mix(uint64(e.Token)<<32 | uint64(e.Version))
		mix(uint64(e.Peer)<<16 ^ uint64(e.Free)<<48 ^ uint64(e.Free)>>16)
	}
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	return h
}

// Equal reports whether two rings hold the same state.
func (r *Ring) Equal(o *Ring) bool {
	return r.universe == o.universe && slices.Equal(r.seeds, o.seeds) && slices.Equal(r.entries, o.entries)
}

// next returns the end of entry i's range.
func (r *Ring) next(i int) uint64 {
	if i+1 < len(r.entries) {
		return uint64(r.entries[i+1].Token)
	}
	return r.end
}

// ErrNotOwner is returned by Grant when the granter does not own the range.
var ErrNotOwner = errors.New("ring: range not owned by the granting peer")

// SeedsError refuses a ring made for other peers: two rings made
// independently can never merge. The text is Weave's.
type SeedsError struct{ Received, Ours []proto.PeerName }

func (e *SeedsError) Error() string {
	return fmt.Sprintf("IP allocation was seeded by different peers (received: %v, ours: %v)", names(e.Received), names(e.Ours))
}

func names(ns []proto.PeerName) string {
	s := make([]string, len(ns))
	for i, n := range ns {
		s[i] = n.String()
	}
	return "[" + strings.Join(s, " ") + "]"
}

// RangeError refuses a ring of another range. The text is Weave's.
type RangeError struct{ Received, Ours netip.Prefix }

func (e *RangeError) Error() string {
	return fmt.Sprintf("Incompatible IP allocation ranges (received: %v, ours: %v)", e.Received, e.Ours)
}

// Check verifies the invariants of a ring over universe: tokens ascending
// and distinct, inside the range, the first at its start, owners and
// seeds valid, versions bounded, and seeds present exactly when tokens
// are. Free counts are advisory and not checked (they are clamped where
// they are used), so that merging never has to rewrite another peer's
// entry.
func Check(m *proto.Ring, universe netip.Prefix) error { return check(m, universe, false) }

// check is Check; a partial ring (changed entries only) may start past
// the start of the range.
func check(m *proto.Ring, universe netip.Prefix, partial bool) error {
	if m.Range != universe {
		return &RangeError{Received: m.Range, Ours: universe}
	}
	start, end := ipv4.Bounds(universe)
	if (len(m.Seeds) == 0) != (len(m.Entries) == 0) {
		return fmt.Errorf("ring: %d seeds for %d entries", len(m.Seeds), len(m.Entries))
	}
	for i, s := range m.Seeds {
		if s == 0 || i > 0 && s <= m.Seeds[i-1] {
			return errors.New("ring: seeds not sorted, distinct and non-zero")
		}
	}
	for i, e := range m.Entries {
		switch {
		case i == 0 && e.Token != start && !partial:
			return fmt.Errorf("ring: first token %v is not the start of the range", ipv4.Addr(e.Token))
		case i > 0 && e.Token <= m.Entries[i-1].Token:
			return fmt.Errorf("ring: token %v out of order", ipv4.Addr(e.Token))
		case e.Token < start || uint64(e.Token) >= end:
			return fmt.Errorf("ring: token %v outside the range %v", ipv4.Addr(e.Token), universe)
		case e.Peer == 0 && !partial:
			return fmt.Errorf("ring: token %v has no owner", ipv4.Addr(e.Token))
		case e.Version > proto.MaxRingVersion:
			return fmt.Errorf("ring: token %v has version %d, over the limit", ipv4.Addr(e.Token), e.Version)
		}
	}
	return nil
}

// Check verifies r's own invariants.
func (r *Ring) Check() error {
	m := proto.Ring{Range: r.universe, Seeds: r.seeds, Entries: r.entries}
	return Check(&m, r.universe)
}

// FromProto makes a ring from a received or stored one, checking it.
func FromProto(m *proto.Ring, universe netip.Prefix) (*Ring, error) {
	r, err := New(universe)
	if err != nil {
		return nil, err
	}
	if err := Check(m, universe); err != nil {
		return nil, err
	}
	r.seeds = slices.Clone(m.Seeds)
	r.entries = slices.Clone(m.Entries)
	return r, nil
}

// ClaimForPeers initialises an empty ring for peers (Weave's subdivide):
// sorted and de-duplicated, the range is halved recursively, the first
// half of the peers sharing the lower half, until each piece has one
// owner. It does nothing to a ring that is already initialised.
func (r *Ring) ClaimForPeers(peers []proto.PeerName) {
	if !r.Empty() || len(peers) == 0 {
		return
	}
	ps := slices.Clone(peers)
	slices.Sort(ps)
	ps = slices.Compact(ps)
	if ps[0] == 0 {
		ps = ps[1:]
	}
	if len(ps) == 0 {
		return
	}
	r.seeds = ps
	r.hashed = false
	r.subdivide(uint64(r.start), r.end, ps)
}

func (r *Ring) subdivide(from, to uint64, peers []proto.PeerName) {
	share := to - from
	if share == 0 {
		return
	}
	if share == 1 || len(peers) == 1 {
		r.entries = append(r.entries, proto.RingEntry{Token: uint32(from), Peer: peers[0], Free: uint32(min(share, 1<<32-1))})
		return
	}
	mid := from + share/2
	r.subdivide(from, mid, peers[:len(peers)/2])
	r.subdivide(mid, to, peers[len(peers)/2:])
}

// find returns the index of the entry whose range holds a.
func (r *Ring) find(a uint32) int {
	i, _ := slices.BinarySearchFunc(r.entries, a, func(e proto.RingEntry, a uint32) int { return cmp.Compare(e.Token, a) })
	if i < len(r.entries) && r.entries[i].Token == a {
		return i
	}
	return i - 1
}

// Owner returns the peer owning a, or 0 if the ring is empty or a is
// outside the range.
func (r *Ring) Owner(a uint32) proto.PeerName {
	if r.Empty() || a < r.start || uint64(a) >= r.end {
		return 0
	}
	return r.entries[r.find(a)].Peer
}

// Spans returns the ring as runs of addresses, adjacent runs of one owner
// joined, in address order.
func (r *Ring) Spans() []Span {
	var out []Span
	for i, e := range r.entries {
		end := r.next(i)
		if n := len(out); n > 0 && out[n-1].Peer == e.Peer {
			out[n-1].End = end
			continue
		}
		out = append(out, Span{Start: e.Token, End: end, Peer: e.Peer})
	}
	return out
}

// OwnedBy returns the runs peer owns, in address order.
func (r *Ring) OwnedBy(peer proto.PeerName) []Span {
	var out []Span
	for i, e := range r.entries {
		if e.Peer != peer {
			continue
		}
		if n := len(out); n > 0 && out[n-1].End == uint64(e.Token) {
			out[n-1].End = r.next(i)
			continue
		}
		out = append(out, Span{Start: e.Token, End: r.next(i), Peer: peer})
	}
	return out
}

// Entries returns a copy of the tokens with the size of each range.
func (r *Ring) Entries() ([]proto.RingEntry, []uint64) {
	sizes := make([]uint64, len(r.entries))
	for i, e := range r.entries {
		sizes[i] = r.next(i) - uint64(e.Token)
	}
	return slices.Clone(r.entries), sizes
}

// insert puts a token at a, returning its index; an existing token is
// left as it is.
func (r *Ring) insert(a uint32, e proto.RingEntry) int {
	i, found := slices.BinarySearchFunc(r.entries, a, func(e proto.RingEntry, a uint32) int { return cmp.Compare(e.Token, a) })
	if found {
		return i
	}
	e.Token = a
	r.entries = slices.Insert(r.entries, i, e)
	return i
}

// Grant gives [start, end) to peer `to`; `from` must own all of it. A
// token at end keeps the rest of from's range with from; changed entries
// get a version bump, new tokens start at version 0.
func (r *Ring) Grant(start uint32, end uint64, from, to proto.PeerName) error {
	if r.Empty() || start < r.start || end > r.end || uint64(start) >= end {
		return fmt.Errorf("ring: cannot grant %v-%v in %v", ipv4.Addr(start), end, r.universe)
	}
	if len(r.entries)+2 > proto.MaxRingEntries {
		return fmt.Errorf("ring: %d tokens, at the limit: no more grants", len(r.entries))
	}
	for _, s := range r.Spans() {
		if uint64(s.Start) < end && s.End > uint64(start) && s.Peer != from {
			return ErrNotOwner
		}
	}
	r.hashed = false
	if end < r.end {
		r.insert(uint32(end), proto.RingEntry{Peer: from})
	}
	i := r.insert(start, proto.RingEntry{Peer: to, Version: 0})
	// Every token inside [start, end) goes to `to`; so does the one at
	// start if it existed already.
	for ; i < len(r.entries) && uint64(r.entries[i].Token) < end; i++ {
		e := &r.entries[i]
		if e.Peer != to {
			e.Peer = to
			e.Version = min(e.Version+1, maxOwnVersion)
		}
		e.Free = uint32(min(r.next(i)-uint64(e.Token), 1<<32-1))
	}
	return nil
}

// Transfer gives every entry of from to `to`, with versions raised by
// TransferBump, and returns the number of addresses moved.
func (r *Ring) Transfer(from, to proto.PeerName) uint64 {
	var n uint64
	r.hashed = false
	for i := range r.entries {
		e := &r.entries[i]
		if e.Peer == from {
			e.Peer = to
			e.Version = min(e.Version+TransferBump, maxOwnVersion)
			n += r.next(i) - uint64(e.Token)
		}
	}
	return n
}

// ReportFree sets the free count of each of self's entries to free(start,
// end), bumping the version of those that change. It reports whether any
// did.
func (r *Ring) ReportFree(self proto.PeerName, free func(start uint32, end uint64) uint64) bool {
	changed := false
	for i := range r.entries {
		e := &r.entries[i]
		if e.Peer != self {
			continue
		}
		f := uint32(min(free(e.Token, r.next(i)), 1<<32-1))
		if f != e.Free && e.Version < maxOwnVersion {
			e.Free = f
			e.Version++
			changed = true
			r.hashed = false
		}
	}
	return changed
}

// Reassert makes the space at token a, which self owns, win over an entry
// at version `over` there: a token is made at a if there is none, and its
// version raised above over (at most to the highest our changes reach).
// It reports whether the ring changed; it fails if self does not own a.
func (r *Ring) Reassert(self proto.PeerName, a uint32, over uint32) (bool, error) {
	if r.Empty() || r.Owner(a) != self {
		return false, ErrNotOwner
	}
	r.hashed = false
	i := r.find(a)
	if r.entries[i].Token != a {
		if len(r.entries)+1 > proto.MaxRingEntries {
			return false, fmt.Errorf("ring: %d tokens, at the limit", len(r.entries))
		}
		// Free counts are the owner's to report: the caller reports
		// them again.
		i = r.insert(a, proto.RingEntry{Peer: self, Version: min(over+1, maxOwnVersion)})
		return true, nil
	}
	e := &r.entries[i]
	if v := min(max(e.Version, over+1), maxOwnVersion); v != e.Version {
		e.Version = v
		return true, nil
	}
	return false, nil
}

// less orders two entries at the same token: the greater one wins a merge.
func less(a, b proto.RingEntry) bool {
	if a.Version != b.Version {
		return a.Version < b.Version
	}
	if a.Free != b.Free {
		return a.Free > b.Free // fewer free addresses: more likely in use
	}
	return a.Peer < b.Peer
}

// AtLimit counts the entries of m at proto.MaxRingVersion: Merge never
// takes them.
func AtLimit(m *proto.Ring) int {
	n := 0
	for _, e := range m.Entries {
		if e.Version >= proto.MaxRingVersion {
			n++
		}
	}
	return n
}

// ErrAtLimit refuses a whole ring with an entry at the version limit while
// we have none: there is nothing better to keep in its place.
var ErrAtLimit = errors.New("ring: an entry at the version limit, which no honest peer reaches")

// ErrNeedWhole refuses a partial ring while we have none to merge it into.
var ErrNeedWhole = errors.New("ring: a partial ring needs a ring to merge into")

// Merge joins a received ring into r. It fails, leaving r unchanged, if
// the ring breaks an invariant, is of another range, or was made for
// other peers. It reports whether r changed. A partial ring (only the
// entries that changed: see Diff) merges the same way, as the join is per
// token. An entry at proto.MaxRingVersion never wins: where we hold its
// token ours stays, where we do not the token is not taken (AtLimit
// counts them).
func (r *Ring) Merge(m *proto.Ring, partial bool) (bool, error) {
	changed, _, err := r.MergeAllowed(m, partial, nil)
	return changed, err
}

// A Change is a received entry that would win over ours: Old is the entry
// we hold at its token or, for a token new to us (Split), the entry whose
// range it falls in.
type Change struct {
	Old, New proto.RingEntry
	Split    bool
}

// Moves reports whether c gives space to another peer.
func (c Change) Moves() bool { return c.New.Peer != c.Old.Peer }

// MergeAllowed merges as Merge does, but takes only the changes that
// allowed (nil: all) accepts into a ring that is not empty; the others are
// skipped, and counted in refused. An empty ring takes a received ring
// whole: there is nothing yet to judge a change against.
func (r *Ring) MergeAllowed(m *proto.Ring, partial bool, allowed func(Change) bool) (changed bool, refused int, err error) {
	if err := check(m, r.universe, partial); err != nil {
		return false, 0, err
	}
	if len(m.Entries) == 0 {
		return false, 0, nil
	}
	if partial {
		if r.Empty() {
			return false, 0, ErrNeedWhole
		}
		// Bound markers: we must hold those tokens already.
		entries := make([]proto.RingEntry, 0, len(m.Entries))
		for _, e := range m.Entries {
			if e.Peer != 0 {
				entries = append(entries, e)
				continue
			}
			if i := r.find(e.Token); i < 0 || r.entries[i].Token != e.Token {
				return false, 0, ErrNeedWhole
			}
		}
		m = &proto.Ring{Range: m.Range, Seeds: m.Seeds, Entries: entries}
	}
	if !r.Empty() && !slices.Equal(r.seeds, m.Seeds) {
		return false, 0, &SeedsError{Received: slices.Clone(m.Seeds), Ours: slices.Clone(r.seeds)}
	}
	if r.Empty() && AtLimit(m) > 0 {
		return false, 0, ErrAtLimit
	}
	r.hashed = false
	if r.Empty() {
		r.seeds = slices.Clone(m.Seeds)
		r.entries = slices.Clone(m.Entries)
		return true, 0, nil
	}
	out := make([]proto.RingEntry, 0, max(len(r.entries), len(m.Entries)))
	allow := func(c Change) bool {
		if allowed == nil || allowed(c) {
			return true
		}
		refused++
		return false
	}
	i, j := 0, 0
	for i < len(r.entries) || j < len(m.Entries) {
		switch {
		case j == len(m.Entries) || i < len(r.entries) && r.entries[i].Token < m.Entries[j].Token:
			out = append(out, r.entries[i])
			i++
		case i == len(r.entries) || m.Entries[j].Token < r.entries[i].Token:
			// A new token splits the range of the entry before it
			// (there is one: our first token is the range's start).
			if e := m.Entries[j]; e.Version < proto.MaxRingVersion && allow(Change{Old: r.entries[max(i-1, 0)], New: e, Split: true}) {
				out = append(out, e)
				changed = true
			}
			j++
		default:
			e := r.entries[i]
			if m.Entries[j].Version < proto.MaxRingVersion && less(e, m.Entries[j]) && allow(Change{Old: e, New: m.Entries[j]}) {
				e = m.Entries[j]
				changed = true
			}
			out = append(out, e)
			i++
			j++
		}
	}
	if len(out) > proto.MaxRingEntries {
		return false, 0, fmt.Errorf("ring: merging would make %d tokens, over the limit of %d", len(out), proto.MaxRingEntries)
	}
	r.entries = out
	return changed, refused, nil
}

// Diff returns the entries of r that old lacks or holds older: what a
// peer holding old needs to reach r. After each run of them comes a bound
// marker (owner 0) at the next token, so that a receiver knows where the
// last range of the run ends; one that lacks that token must not merge
// the partial ring (Merge refuses it), or it would see the range run on.
func (r *Ring) Diff(old *Ring) []proto.RingEntry {
	var out []proto.RingEntry
	j := 0
	inRun := false
	for _, e := range r.entries {
		for j < len(old.entries) && old.entries[j].Token < e.Token {
			j++
		}
		changed := j >= len(old.entries) || old.entries[j] != e
		switch {
		case changed:
			out = append(out, e)
		case inRun:
			out = append(out, proto.RingEntry{Token: e.Token})
		}
		inRun = changed
	}
	return out
}

// Donors returns the peers other than self with free space that overlaps
// [start, end), most free space first, ties to the higher name: whom to
// ask for space, in order. Weave draws at random, weighted by free space;
// a sort makes the choice reproducible.
func (r *Ring) Donors(self proto.PeerName, start uint32, end uint64) []proto.PeerName {
	free := map[proto.PeerName]uint64{}
	for i, e := range r.entries {
		next := r.next(i)
		if e.Peer == self || e.Free == 0 || uint64(e.Token) >= end || next <= uint64(start) {
			continue
		}
		free[e.Peer] += min(uint64(e.Free), next-uint64(e.Token))
	}
	out := make([]proto.PeerName, 0, len(free))
	for p := range free {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b proto.PeerName) int {
		if c := cmp.Compare(free[b], free[a]); c != 0 {
			return c
		}
		return cmp.Compare(b, a)
	})
	return out
}

// Peers returns every peer that owns a token, sorted.
func (r *Ring) Peers() []proto.PeerName {
	var out []proto.PeerName
	for _, e := range r.entries {
		out = append(out, e.Peer)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// Prefixes returns s as the fewest CIDR blocks that cover it exactly.
func (s Span) Prefixes() []netip.Prefix {
	var out []netip.Prefix
	for cur := uint64(s.Start); cur < s.End; {
		size := uint64(1)
		for size < 1<<32 && cur%(size*2) == 0 && cur+size*2 <= s.End {
			size *= 2
		}
		out = append(out, netip.PrefixFrom(ipv4.Addr(uint32(cur)), 32-bitsOf(size)))
		cur += size
	}
	return out
}

func bitsOf(size uint64) int {
	n := 0
	for size > 1 {
		size >>= 1
		n++
	}
	return n
}
