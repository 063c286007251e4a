// Package coreloop is the loop every shell of a pure core runs (the
// allocator's and the name store's): one goroutine owns the core; after
// each input it carries out the core's Ready, then waits for the next
// input: a tick, a peer's message, or a call from another goroutine.
package coreloop

import (
	"context"
	"sync/atomic"
	"time"
)

// Loop is one shell's loop. Only the goroutine that runs Run calls its
// functions.
type Loop[M any] struct {
	Every time.Duration // between ticks
	// Apply carries out the core's Ready; an error (the state could
	// not be saved) ends the loop.
	Apply func(context.Context) error
	Tick  func()
	Step  func(M)       // a peer's message
	In    <-chan M      // peers' messages
	Calls <-chan func() // work for the core, from other goroutines
}

// Run runs the loop until ctx ends (nil) or Apply fails (its error).
func (l Loop[M]) Run(ctx context.Context) error {
	tick := time.NewTicker(l.Every)
	defer tick.Stop()
	for {
		if err := l.Apply(ctx); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			l.Tick()
		case m := <-l.In:
			l.Step(m)
		case f := <-l.Calls:
			f()
		}
	}
}

// Budget bounds the bytes of the peers' messages waiting in a loop's In,
// besides their number: a queue of a thousand messages of a few MiB each
// would otherwise hold gigabytes. Deliver takes a message's bytes before
// it queues it, Step gives them back.
type Budget struct {
	max    int64
	queued atomic.Int64
}

// NewBudget makes a budget of max bytes.
func NewBudget(max int64) *Budget { return &Budget{max: max} }

// Take reserves n bytes; false, and nothing reserved, when they do not fit.
func (b *Budget) Take(n int) bool {
	if b.queued.Add(int64(n)) > b.max {
		b.queued.Add(-int64(n))
		return false
	}
	return true
}

// Give returns n bytes taken before.
func (b *Budget) Give(n int) { b.queued.Add(-int64(n)) }

// Queued is the bytes taken and not given back.
func (b *Budget) Queued() int64 { return b.queued.Load() }
