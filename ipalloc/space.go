package ipalloc

import (
	"cmp"
	"math/bits"
	"slices"

	"github.com/overlayd/overlayd/ipalloc/ring"
)

// used is the sorted set of in-range addresses allocated on this peer.
type used []uint32

func (u used) search(a uint32) (int, bool) {
	return slices.BinarySearch(u, a)
}

func (u *used) add(a uint32) {
	if i, ok := u.search(a); !ok {
		*u = slices.Insert(*u, i, a)
	}
}

func (u *used) remove(a uint32) {
	if i, ok := u.search(a); ok {
		*u = slices.Delete(*u, i, i+1)
	}
}

func (u used) has(a uint32) bool {
	_, ok := u.search(a)
	return ok
}

// count is the number of used addresses in [start, end).
func (u used) count(start uint32, end uint64) uint64 {
	i, _ := u.search(start)
	j := len(u)
	if end <= 1<<32-1 {
		j, _ = u.search(uint32(end))
	}
	return uint64(max(j-i, 0))
}

// clip returns the part of s inside [start, end), and whether there is any.
func clip(s ring.Span, start uint32, end uint64) (ring.Span, bool) {
	if uint64(s.Start) < uint64(start) {
		s.Start = start
	}
	s.End = min(s.End, end)
	return s, uint64(s.Start) < s.End
}

// gaps calls f for each run of addresses of s not in u, in order, until f
// returns false.
func (u used) gaps(s ring.Span, f func(ring.Span) bool) bool {
	i, _ := u.search(s.Start)
	cur := uint64(s.Start)
	for ; i < len(u) && uint64(u[i]) < s.End; i++ {
		if uint64(u[i]) > cur {
			if !f(ring.Span{Start: uint32(cur), End: uint64(u[i]), Peer: s.Peer}) {
				return false
			}
		}
		cur = uint64(u[i]) + 1
	}
	if cur < s.End {
		return f(ring.Span{Start: uint32(cur), End: s.End, Peer: s.Peer})
	}
	return true
}

// biggestAligned returns the largest CIDR-aligned block inside s
// (Weave's BiggestCIDRRange).
func biggestAligned(s ring.Span) ring.Span {
	n := s.Size()
	for size := uint64(1) << (63 - bits.LeadingZeros64(n)); size > 0; size >>= 1 {
		start := (uint64(s.Start) + size - 1) &^ (size - 1)
		if start+size <= s.End {
			return ring.Span{Start: uint32(start), End: start + size, Peer: s.Peer}
		}
	}
	return ring.Span{}
}

// subtract removes the holds not yet in use from spans (both sorted by
// start).
func subtract(spans []ring.Span, holds []hold) []ring.Span {
	if len(holds) == 0 {
		return spans
	}
	var out []ring.Span
	for _, s := range spans {
		cur := s
		for _, h := range holds {
			if h.inUse || h.End <= uint64(cur.Start) || uint64(h.Start) >= cur.End {
				continue
			}
			if uint64(h.Start) > uint64(cur.Start) {
				out = append(out, ring.Span{Start: cur.Start, End: uint64(h.Start), Peer: s.Peer})
			}
			if h.End >= cur.End {
				cur.End = uint64(cur.Start) // consumed
				break
			}
			cur.Start = uint32(h.End)
		}
		if uint64(cur.Start) < cur.End {
			out = append(out, cur)
		}
	}
	slices.SortFunc(out, func(a, b ring.Span) int { return cmp.Compare(a.Start, b.Start) })
	return out
}
