// Package routes is overlayd's immutable longest-prefix-match route table.
//
// A Table is built once from a list of routes and never changes afterwards,
// so any number of goroutines may call Lookup concurrently without locks; a
// new routing state is a new Table, published whole (the router keeps it
// behind an atomic.Pointer and loads it once per batch of packets).
//
// The package is pure: no sockets, clocks, goroutines or globals.
package routes

import (
	"net/netip"
	"slices"

	"github.com/overlayd/overlayd/internal/ipv4"
)

// A Route sends the addresses of Prefix to Via.
type Route[V any] struct {
	Prefix netip.Prefix
	Via    V
}

// A Table maps IPv4 addresses to the value of the longest matching prefix.
// The zero Table matches nothing. Lookup does not allocate.
type Table[V any] struct {
	// byLen[l] holds the routes of prefix length l, keyed by the masked
	// address; lens lists the lengths present, longest first.
	byLen [33]map[uint32]V
	lens  []uint8
	n     int
	// Refused is the number of announced prefixes Build left out because
	// they lie in ring space another peer owns.
	Refused int
}

// New builds a table. Prefixes are masked; when two routes have the same
// prefix, the first one wins. Routes that are not IPv4 are ignored.
func New[V any](rs []Route[V]) *Table[V] {
	t := &Table[V]{}
	for _, r := range rs {
		if !r.Prefix.IsValid() || !r.Prefix.Addr().Is4() {
			continue
		}
		p := r.Prefix.Masked()
		l := p.Bits()
		if t.byLen[l] == nil {
			t.byLen[l] = make(map[uint32]V)
			t.lens = append(t.lens, uint8(l))
		}
		k := ipv4.Value(p.Addr())
		if _, dup := t.byLen[l][k]; dup {
			continue
		}
		t.byLen[l][k] = r.Via
		t.n++
	}
	slices.SortFunc(t.lens, func(a, b uint8) int { return int(b) - int(a) })
	return t
}

// Len is the number of distinct prefixes in the table.
func (t *Table[V]) Len() int { return t.n }

// Lookup returns the value of the longest prefix containing a.
func (t *Table[V]) Lookup(a netip.Addr) (v V, ok bool) {
	if !a.Is4() {
		return v, false
	}
	k := ipv4.Value(a)
	for _, l := range t.lens {
		if v, ok = t.byLen[l][k&mask(l)]; ok {
			return v, true
		}
	}
	return v, false
}

// Routes lists the table's routes, sorted by prefix.
func (t *Table[V]) Routes() []Route[V] {
	var rs []Route[V]
	for _, l := range t.lens {
		for k, v := range t.byLen[l] {
			rs = append(rs, Route[V]{Prefix: netip.PrefixFrom(ipv4.Addr(k), int(l)), Via: v})
		}
	}
	slices.SortFunc(rs, func(a, b Route[V]) int {
		if c := a.Prefix.Addr().Compare(b.Prefix.Addr()); c != 0 {
			return c
		}
		return a.Prefix.Bits() - b.Prefix.Bits()
	})
	return rs
}

func mask(l uint8) uint32 {
	if l == 0 {
		return 0
	}
	return ^uint32(0) << (32 - l)
}
