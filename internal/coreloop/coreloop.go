// Package coreloop is the loop every shell of a pure core runs (the
// allocator's and the name store's): one goroutine owns the core; after
// each input it carries out the core's Ready, then waits for the next
// input: a tick, a peer's message, or a call from another goroutine.
package coreloop

import (
	"context"
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
