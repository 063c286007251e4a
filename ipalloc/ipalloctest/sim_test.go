package ipalloctest_test

import (
	"flag"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/overlayd/overlayd/internal/simnet"
	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/ipalloc/ipalloctest"
	"github.com/overlayd/overlayd/proto"
)

var (
	schedules = flag.Int("schedules", 1000, "random schedules to run")
	seedFlag  = flag.Uint64("seed", 0, "run only this schedule")
	maxPeers  = flag.Int("peers", 120, "most peers in a schedule (at least 50)")
)

// TestSchedules runs random schedules: 50 to 200 peers (with -peers),
// allocations, releases, claims inside and outside the range, partitions,
// restarts from saved state, dead peers taken over by one or two survivors
// at once, on a network that loses, duplicates and reorders. After every
// step no address is allocated on two peers and no space is usable by two;
// once healed and quiet, every ring is the same and every request of a
// live peer is answered.
func TestSchedules(t *testing.T) {
	n := *schedules
	first := uint64(1)
	if *seedFlag != 0 {
		first, n = *seedFlag, 1
	}
	start := time.Now()
	var total totals
	for _, f := range simnet.RunSeeds(simnet.Seeds(first, n), runSchedule, total.add) {
		t.Errorf("%v\nreplay: go test ./ipalloc/ipalloctest -run TestSchedules -seed %d", f, f.Seed)
	}
	t.Logf("%d schedules in %v: %+v", total.Schedules, time.Since(start).Round(time.Millisecond), total)
}

// totals sum up what the schedules did, so that a change that makes them
// do nothing shows.
type totals struct {
	Schedules, Peers, MaxPeers, Allocated, Claimed, Released, Refused int // RmPeers: answered without error
	RmPeers, TakenOver, Partitions, Restarts                          int
	Conflicts, Donations                                              uint64
	Messages                                                          [8]int // by kind
}

func (t *totals) add(o totals) {
	t.Schedules += o.Schedules
	t.Peers += o.Peers
	t.MaxPeers = max(t.MaxPeers, o.MaxPeers)
	t.Allocated += o.Allocated
	t.Claimed += o.Claimed
	t.Released += o.Released
	t.Refused += o.Refused
	t.RmPeers += o.RmPeers
	t.TakenOver += o.TakenOver
	t.Partitions += o.Partitions
	t.Restarts += o.Restarts
	t.Conflicts += o.Conflicts
	t.Donations += o.Donations
	for i, n := range o.Messages {
		t.Messages[i] += n
	}
}

func runSchedule(seed uint64) (tot totals, err error) {
	tot.Schedules = 1
	universe := netip.MustParsePrefix("10.32.0.0/16")
	s := ipalloctest.New(seed, universe)
	r := s.Rand()
	peers := 50 + r.IntN(max(*maxPeers-49, 1))
	s.Net.Loss, s.Net.Dup, s.Net.Reorder = r.Float64()*0.1, r.Float64()*0.05, r.IntN(2) == 0
	initial := 1 + r.IntN(min(peers, 9))
	quorum := initial/2 + 1
	added := 0
	add := func() error {
		name := ipalloctest.Name(added)
		added++
		cfg := ipalloc.Config{Quorum: quorum, RetryTicks: 5, SettleTicks: 10}
		if added > initial {
			// Peers added later join as observers, as Weave advises:
			// as voters they would make quorums that need not overlap
			// (WEAVE.md §7.3).
			cfg.Mode = ipalloc.Observer
		}
		return s.Add(name, cfg)
	}
	for range initial {
		if err := add(); err != nil {
			return tot, err
		}
	}
	type req struct {
		id    uint64
		peer  proto.PeerName
		uid   uint64
		claim bool
	}
	var reqs []req
	var rmpeers []uint64
	dead := map[proto.PeerName]bool{}
	stopped := map[proto.PeerName]int64{}
	idents := 0
	partitionUntil := int64(-1)
	steps := 200 + r.IntN(100)
	for step := range steps {
		live := s.Live()
		pick := live[r.IntN(len(live))].Name
		switch x := r.IntN(100); {
		case added < peers && x < 40:
			for range min(1+r.IntN(15), peers-added) {
				if err := add(); err != nil {
					return tot, err
				}
			}
		case x < 65:
			idents++
			reqs = append(reqs, req{s.Submit(pick, ipalloc.Request{Op: ipalloc.OpAlloc, Ident: fmt.Sprintf("%v-%d", pick, r.IntN(idents))}), pick, s.Peer(pick).UID(), false})
		case x < 75:
			holder := live[r.IntN(len(live))]
			if st := holder.Node.Status(); len(st.Owned) > 0 {
				o := st.Owned[r.IntN(len(st.Owned))]
				s.Submit(holder.Name, ipalloc.Request{Op: ipalloc.OpRelease, Ident: o.Ident})
				tot.Released++
			}
		case x < 80:
			a := netip.AddrFrom4([4]byte{10, 32, byte(r.IntN(256)), byte(1 + r.IntN(254))})
			if r.IntN(4) == 0 {
				a = netip.AddrFrom4([4]byte{192, 0, 2, byte(r.IntN(8))})
			}
			idents++
			reqs = append(reqs, req{s.Submit(pick, ipalloc.Request{Op: ipalloc.OpClaim, Ident: fmt.Sprintf("%v-c%d", pick, idents), Addr: netip.PrefixFrom(a, 16)}), pick, s.Peer(pick).UID(), true})
		case x < 83 && partitionUntil < 0 && step < steps-60:
			cut := r.IntN(3) + 1
			s.Partition(func(p proto.PeerName) int { return int(p) % (cut + 1) })
			partitionUntil = s.Ticks() + int64(10+r.IntN(40))
			tot.Partitions++
		case x < 86 && len(live) > 2:
			s.Stop(pick)
			stopped[pick] = s.Ticks() + int64(1+r.IntN(20))
			tot.Restarts++
		case x < 88 && len(live) > 3 && partitionUntil < 0 && step < steps-60:
			// A peer dies for good; one or two survivors take it over at once.
			s.Stop(pick)
			dead[pick] = true
			if err := s.Step(); err != nil { // the survivors learn it is gone
				return tot, err
			}
			live = s.Live()
			for range 1 + r.IntN(2) {
				rmpeers = append(rmpeers, s.Submit(live[r.IntN(len(live))].Name, ipalloc.Request{Op: ipalloc.OpRmPeer, Peer: pick}))
			}
		}
		if partitionUntil >= 0 && s.Ticks() >= partitionUntil {
			s.Heal()
			partitionUntil = -1
		}
		for _, name := range slices.Sorted(maps.Keys(stopped)) { // in order: Restart draws from the seed
			if s.Ticks() >= stopped[name] {
				delete(stopped, name)
				if err := s.Restart(name); err != nil {
					return tot, err
				}
			}
		}
		if err := s.Step(); err != nil {
			return tot, fmt.Errorf("tick %d: %w", s.Ticks(), err)
		}
		if err := s.Check(); err != nil {
			if *seedFlag != 0 {
				for _, l := range s.Log {
					fmt.Println(l)
				}
				for _, p := range s.Live() {
					es, _ := p.Node.Ring().Entries()
					fmt.Println(p.Name, p.Node.Usable(), es)
				}
			}
			return tot, fmt.Errorf("tick %d: %w", s.Ticks(), err)
		}
	}
	// Heal, restart, and let it settle on a perfect network.
	s.Heal()
	for _, name := range slices.Sorted(maps.Keys(stopped)) {
		if err := s.Restart(name); err != nil {
			return tot, err
		}
	}
	s.Net.Loss, s.Net.Dup, s.Net.Reorder = 0, 0, false
	for range 120 {
		if err := s.Step(); err != nil {
			return tot, err
		}
		if err := s.Check(); err != nil {
			return tot, fmt.Errorf("settling, tick %d: %w", s.Ticks(), err)
		}
	}
	if err := s.Converged(); err != nil {
		if *seedFlag != 0 { // a replay: show what differs
			for _, l := range s.Log {
				fmt.Println(l)
			}
			for _, p := range s.Live() {
				es, _ := p.Node.Ring().Entries()
				fmt.Println("RING", p.Name, es)
			}
			fmt.Println("DEAD", dead)
		}
		return tot, err
	}
	tot.Peers, tot.MaxPeers = added, added
	tot.Messages = s.Sent
	for _, p := range s.Live() {
		st := p.Node.Stats()
		tot.Conflicts += st.Conflicts
		tot.Donations += st.Donations
	}
	for _, id := range rmpeers {
		if d, ok := s.Answer(id); ok && d.Err == nil {
			tot.RmPeers++
			if d.Taken > 0 {
				tot.TakenOver++
			}
		}
	}
	for _, q := range reqs {
		if d, ok := s.Answer(q.id); ok {
			switch {
			case d.Err != nil:
				tot.Refused++
			case q.claim:
				tot.Claimed++
			default:
				tot.Allocated++
			}
		}
		p := s.Peer(q.peer)
		if _, ok := s.Answer(q.id); !ok && p.Node != nil && p.UID() == q.uid && p.Node.Status().Status == ipalloc.StatusReady {
			return tot, fmt.Errorf("request %d on %v never answered (status %q)", q.id, q.peer, p.Node.Status().Status)
		}
	}
	return tot, nil
}

// TestAdversary: a peer on the network sends, every tick, its ring with
// every range made its own at the version limit, one version up, and
// split by tokens of its own, and replays of rings it saw earlier, while five voters reach consensus, allocate from every
// peer, and a newcomer joins (its empty ring must not take the forgery).
// After every tick: no honest ring gives the adversary any space, no
// address is allocated twice, no space is usable by two; at the end every
// request is answered, the rings agree and the forgeries were refused.
func TestAdversary(t *testing.T) {
	for seed := uint64(1); seed <= 5; seed++ {
		s := ipalloctest.New(seed, netip.MustParsePrefix("10.32.0.0/22"))
		s.Net.Loss = 0.05
		voters := ipalloc.Config{Quorum: 3, RetryTicks: 5, SettleTicks: 10}
		observer := voters
		observer.Mode = ipalloc.Observer
		for i := range 5 {
			if err := s.Add(ipalloctest.Name(i), voters); err != nil {
				t.Fatal(err)
			}
		}
		adversary := ipalloctest.Name(5)
		if err := s.Add(adversary, observer); err != nil {
			t.Fatal(err)
		}
		s.Adversary = adversary
		var ids []uint64
		fail := func(format string, a ...any) {
			t.Helper()
			t.Fatalf("seed %d: %s\nlog:\n%s\nreplay: go test ./ipalloc/ipalloctest -run TestAdversary", seed, fmt.Sprintf(format, a...), strings.Join(s.Log[max(0, len(s.Log)-20):], "\n"))
		}
		for tick := range 300 {
			if err := s.Attack(); err != nil {
				t.Fatal(err)
			}
			if tick == 150 {
				if err := s.Add(ipalloctest.Name(6), observer); err != nil {
					t.Fatal(err)
				}
			}
			if tick%3 == 0 && tick < 250 {
				honest := slices.DeleteFunc(slices.Clone(s.Live()), func(p *ipalloctest.Peer) bool { return p.Name == adversary })
				p := honest[tick/3%len(honest)]
				ids = append(ids, s.Submit(p.Name, ipalloc.Request{Op: ipalloc.OpAlloc, Ident: fmt.Sprintf("c%d", tick)}))
			}
			if err := s.Step(); err != nil {
				fail("tick %d: %v", tick, err)
			}
			if err := s.Check(); err != nil {
				fail("tick %d: %v", tick, err)
			}
			for _, p := range s.Live() {
				if p.Name != adversary && len(p.Node.Ring().OwnedBy(adversary)) > 0 {
					fail("tick %d: %v's ring gives the adversary %v", tick, p.Name, p.Node.Ring().OwnedBy(adversary))
				}
			}
		}
		for _, id := range ids {
			if d, ok := s.Answer(id); !ok || d.Err != nil {
				fail("request %d: answered %v, %+v", id, ok, d)
			}
		}
		if err := s.Converged(); err != nil {
			fail("%v", err)
		}
		var atLimit, notOwner uint64
		for _, p := range s.Live() {
			atLimit += p.Node.Stats().AtLimit
			notOwner += p.Node.Stats().NotOwner
		}
		if atLimit == 0 || notOwner == 0 {
			fail("refused: %d entries at the version limit, %d moves by a non-owner: the attack did not arrive", atLimit, notOwner)
		}
		t.Logf("seed %d: %d allocations, %d entries at the limit refused, %d moves by a non-owner refused, %d messages refused whole", seed, len(ids), atLimit, notOwner, s.Refused)
	}
}
