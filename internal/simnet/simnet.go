// Package simnet is what the simulators of the protocol cores share (the
// allocator's ipalloctest, the name store's namestest and the mesh's
// topotest): a simulated network between named peers, and a runner of
// many seeded schedules in parallel.
//
// A Net carries messages in rounds. Each one may be lost, duplicated,
// delayed (so that later ones overtake it) and reordered, at random from
// one *rand.Rand: one seed replays one run. Partitions cut it into groups
// that do not reach each other. What the peers are, whether they are up,
// and which incarnation a message was meant for stay the simulator's.
package simnet

import (
	"cmp"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"

	"github.com/overlayd/overlayd/proto"
)

// Delivery is a message from one peer to another.
type Delivery[M any] struct {
	From, To proto.PeerName
	Msg      M
}

// Counts sum up what a Net did.
type Counts struct {
	Sent, Delivered, Lost, Duplicated, Delayed, Cut int // Cut: sender and receiver in different groups when it was due
}

// Add adds o to c.
func (c *Counts) Add(o Counts) {
	c.Sent += o.Sent
	c.Delivered += o.Delivered
	c.Lost += o.Lost
	c.Duplicated += o.Duplicated
	c.Delayed += o.Delayed
	c.Cut += o.Cut
}

// A Net is a simulated network. Set its fields before the first Send. It
// is not safe for concurrent use.
type Net[M any] struct {
	Loss float64 // chance a message is lost
	Dup  float64 // chance it is delivered twice
	// Delay is the chance a message waits one round more, again and
	// again; MaxDelay makes it wait 0..MaxDelay rounds more, uniformly.
	Delay    float64
	MaxDelay int
	Reorder  bool // a round's messages in random order
	// Latency is the rounds a message takes at least: 1 delivers it in
	// the next round; 0 in the round it was sent (Due then returns it
	// with the answers it causes until the round is quiet).
	Latency int
	Counts  Counts

	rand  *rand.Rand
	round int64
	due   map[int64][]Delivery[M]
	queue int
	group map[proto.PeerName]int // partition; nil: one network
}

// New makes a Net drawing from r.
func New[M any](r *rand.Rand) *Net[M] {
	return &Net[M]{rand: r, due: map[int64][]Delivery[M]{}}
}

// Advance moves to the next round.
func (n *Net[M]) Advance() { n.round++ }

// Len is the number of messages on their way.
func (n *Net[M]) Len() int { return n.queue }

// Send puts a message on its way: lost, duplicated and delayed here, at
// random.
func (n *Net[M]) Send(from, to proto.PeerName, m M) {
	n.Counts.Sent++
	if n.Loss > 0 && n.rand.Float64() < n.Loss {
		n.Counts.Lost++
		return
	}
	copies := 1
	if n.Dup > 0 && n.rand.Float64() < n.Dup {
		copies = 2
		n.Counts.Duplicated++
	}
	for range copies {
		at := n.round + int64(n.Latency)
		if n.MaxDelay > 0 {
			at += int64(n.rand.IntN(n.MaxDelay + 1))
		}
		for n.Delay > 0 && n.rand.Float64() < n.Delay {
			at++
			n.Counts.Delayed++
		}
		n.due[at] = append(n.due[at], Delivery[M]{From: from, To: to, Msg: m})
		n.queue++
	}
}

// Due takes the messages due in the current round, in random order if
// Reorder; those between peers that a partition separates now are cut.
func (n *Net[M]) Due() []Delivery[M] {
	var rounds []int64
	for at := range n.due {
		if at <= n.round {
			rounds = append(rounds, at)
		}
	}
	if len(rounds) == 0 {
		return nil
	}
	slices.Sort(rounds) // oldest first: map order must decide nothing
	var out []Delivery[M]
	for _, at := range rounds {
		out = append(out, n.due[at]...)
		n.queue -= len(n.due[at])
		delete(n.due, at)
	}
	if n.Reorder {
		n.rand.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	}
	kept := out[:0]
	for _, d := range out {
		if !n.Reaches(d.From, d.To) {
			n.Counts.Cut++
			continue
		}
		kept = append(kept, d)
	}
	n.Counts.Delivered += len(kept)
	return kept
}

// Partition splits the network into groups: f gives each peer's group.
// Peers f has not seen are in their own group 0.
func (n *Net[M]) Partition(peers []proto.PeerName, f func(proto.PeerName) int) {
	n.group = map[proto.PeerName]int{}
	for _, p := range peers {
		n.group[p] = f(p)
	}
}

// Heal joins the network again.
func (n *Net[M]) Heal() { n.group = nil }

// Partitioned reports whether a partition is in place.
func (n *Net[M]) Partitioned() bool { return n.group != nil }

// Group is a peer's group (0 when there is no partition).
func (n *Net[M]) Group(p proto.PeerName) int { return n.group[p] }

// Reaches reports whether no partition separates a and b.
func (n *Net[M]) Reaches(a, b proto.PeerName) bool {
	return n.group == nil || n.group[a] == n.group[b]
}

// RunSeeds runs schedule for each seed on GOMAXPROCS goroutines, adds each
// result with add (on one goroutine at a time), stops handing out seeds at
// the first failure, and returns the failures, each with its seed, in seed
// order.
func RunSeeds[T any](seeds []uint64, schedule func(seed uint64) (T, error), add func(T)) []Failure {
	var (
		mu     sync.Mutex
		failed []Failure
	)
	ch := make(chan uint64)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Go(func() {
			for seed := range ch {
				res, err := schedule(seed)
				mu.Lock()
				add(res)
				if err != nil {
					failed = append(failed, Failure{Seed: seed, Err: err})
				}
				mu.Unlock()
			}
		})
	}
	for _, seed := range seeds {
		mu.Lock()
		stop := len(failed) > 0
		mu.Unlock()
		if stop {
			break
		}
		ch <- seed
	}
	close(ch)
	wg.Wait()
	slices.SortFunc(failed, func(a, b Failure) int { return cmp.Compare(a.Seed, b.Seed) })
	return failed
}

// Failure is a schedule that failed.
type Failure struct {
	Seed uint64
	Err  error
}

func (f Failure) Error() string { return fmt.Sprintf("schedule %d: %v", f.Seed, f.Err) }

// Seeds are n seeds from first on.
func Seeds(first uint64, n int) []uint64 {
	s := make([]uint64, n)
	for i := range s {
		s[i] = first + uint64(i)
	}
	return s
}
