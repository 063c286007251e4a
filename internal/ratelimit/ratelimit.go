// Package ratelimit limits events per source: a token bucket per source,
// so that one source cannot take what many share (a queue, a server's
// answers).
//
// The buckets are a fixed table indexed by a keyed hash of the source, not
// a map: memory is the same however many sources there are, and nothing
// needs evicting. The key is random per process, so a sender cannot choose
// sources that land on a given one's bucket. Two sources that share a
// bucket share its rate: a given source shares its bucket with any one
// other with probability 1/Slots.
package ratelimit

import (
	"hash/maphash"
	"time"

	"golang.org/x/time/rate"
)

// Slots is the number of buckets of a Table.
const Slots = 1024

// Table is a token bucket per source of type K (an address, an endpoint).
// It is safe for concurrent use.
type Table[K comparable] struct {
	seed    maphash.Seed
	buckets [Slots]*rate.Limiter
}

// New makes a Table that lets each source have perSecond events a second
// on average, and burst at once.
func New[K comparable](perSecond float64, burst int) *Table[K] {
	t := &Table[K]{seed: maphash.MakeSeed()}
	for i := range t.buckets {
		t.buckets[i] = rate.NewLimiter(rate.Limit(perSecond), burst)
	}
	return t
}

// Allow takes a token of source's bucket at now, and says whether there
// was one.
func (t *Table[K]) Allow(source K, now time.Time) bool {
	return t.buckets[hashOf(t, source)].AllowN(now, 1)
}

func hashOf[K comparable](t *Table[K], k K) uint64 { return maphash.Comparable(t.seed, k) % Slots }
