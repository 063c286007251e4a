package topotest

import (
	"flag"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/overlayd/overlayd/proto"
)

var (
	seed = flag.Uint64("seed", 0, "run only this simulation seed")
	more = flag.Int("seeds", 0, "run this many seeds in each test instead of the default")
)

func seeds(n int) []uint64 {
	if *seed != 0 {
		return []uint64{*seed}
	}
	if *more > 0 {
		n = *more
	}
	s := make([]uint64, n)
	for i := range s {
		s[i] = uint64(i + 1)
	}
	return s
}

// grow joins peers 2..n, perRound per round, each given target(i) as its
// one --peer, then runs until converged; it returns the rounds from the last
// join to convergence.
func grow(t testing.TB, s *Sim, n, perRound int, target func(i int) int, limit int) int {
	t.Helper()
	s.Join(1, 0)
	for i := 2; i <= n; i++ {
		s.Join(i, Name(target(i)))
		if i%perRound == 0 {
			s.Step()
		}
	}
	last := s.Round()
	for s.Round()-last < int64(limit) {
		s.Step()
		if s.Converged() == nil {
			return int(s.Round() - last)
		}
	}
	t.Fatalf("seed %d: %d peers not converged %d rounds after the last join: %v\n%s\nreplay: go test ./peering/topology/topotest -run %s -seed %d",
		s.seed, n, limit, s.Converged(), strings.Join(s.Trace(), "\n"), t.Name(), s.seed)
	return 0
}

// Test200Join: 200 peers join through one bootstrap peer over a lossy,
// duplicating, reordering network; everyone learns everyone, and routes
// follow shortest paths.
func Test200Join(t *testing.T) {
	for _, sd := range seeds(1) { // about 5 s a seed, 25 s with -race
		start := time.Now()
		s := New(sd)
		s.Drop, s.Dup, s.MaxDelay = 0.05, 0.02, 1
		rounds := grow(t, s, 200, 20, func(int) int { return 1 }, 40)
		t.Logf("seed %d: converged %d rounds after the last join", sd, rounds)
		if s.Conns(1) != 199 {
			t.Errorf("bootstrap has %d connections: discovery should make a full mesh", s.Conns(1))
		}
		if el := time.Since(start); el > 60*time.Second {
			t.Errorf("seed %d took %v", sd, el)
		}
	}
}

// TestPartitionHeals: a converged mesh split in two forgets the other side,
// and after the heal (configured peers redialled, discovery re-meshing)
// converges again.
func TestPartitionHeals(t *testing.T) {
	for _, sd := range seeds(3) {
		s := New(sd)
		s.Drop = 0.02
		grow(t, s, 60, 10, func(i int) int { return 1 + (i-2)%3 }, 30)
		s.Partition(func(name proto.PeerName) int { return int(name) % 2 })
		for range 10 {
			s.Step()
		}
		s.Heal()
		var err error
		for range 30 {
			s.Step()
			if err = s.Converged(); err == nil {
				break
			}
		}
		if err != nil {
			t.Fatalf("seed %d: not converged 30 rounds after the heal: %v\nreplay: go test ./peering/topology/topotest -run %s -seed %d", sd, err, t.Name(), sd)
		}
	}
}

// TestDepartureAndRestart: a stopped peer vanishes from every view (no live
// peer reports a connection to it); restarted as a new incarnation it
// replaces the old one everywhere.
func TestDepartureAndRestart(t *testing.T) {
	for _, sd := range seeds(3) {
		s := New(sd)
		grow(t, s, 30, 10, func(int) int { return 1 }, 30)
		s.Stop(7)
		converge(t, s, 10, "after peer 7 stopped")
		s.Join(7, Name(1))
		converge(t, s, 15, "after peer 7 restarted")
	}
}

func converge(t *testing.T, s *Sim, limit int, what string) {
	t.Helper()
	var err error
	for range limit {
		s.Step()
		if err = s.Converged(); err == nil {
			return
		}
	}
	t.Fatalf("seed %d: not converged within %d rounds %s: %v\nreplay: go test ./peering/topology/topotest -run %s -seed %d",
		s.seed, limit, what, err, t.Name(), s.seed)
}

// BenchmarkScale grows meshes of 100, 300 and 1,000 peers, each peer given
// one random earlier peer, with the default connection limit of 200, and
// reports the rounds to convergence after the last join and the
// steady-state gossip per peer (one round per second, as overlayd runs
// them):
//
//	go test ./peering/topology/topotest -run '^$' -bench Scale -benchtime 1x
func BenchmarkScale(b *testing.B) {
	for _, n := range []int{100, 300, 1000} {
		b.Run(fmt.Sprintf("peers=%d", n), func(b *testing.B) {
			for range b.N {
				s := New(42)
				s.ConnLimit = 200
				rounds := grow(b, s, n, 50, func(i int) int { return 1 + int(uint64(i)*2654435761%uint64(i-1)) }, 60)
				for range 30 { // news still being retransmitted dies out
					s.Step()
				}
				s.ResetBytes()
				for range 30 {
					s.Step()
				}
				if err := s.Converged(); err != nil {
					b.Fatalf("diverged in steady state: %v", err)
				}
				b.ReportMetric(float64(rounds), "rounds-after-last-join")
				b.ReportMetric(s.BytesPerPeer()/30, "steady-B/s/peer")
			}
		})
	}
}

// TestAdversary: in signed mode (password mode), once the mesh has formed,
// a member that misbehaves sends forged, tampered, unsigned, version-limit
// and replayed entries of the others to every neighbour, every round,
// through a stop and a restart, over a lossy network. No honest peer takes
// any of them (every entry of an honest peer anywhere is the one it
// signed, announcing nothing), the mesh converges with routes on shortest
// paths as without it, and the refusals are counted. (A peer that nobody
// has heard of yet is not protected: the first key seen for a name is
// taken, so a member can claim a name before its owner's entry arrives;
// see the README.)
func TestAdversary(t *testing.T) {
	for _, sd := range seeds(1) { // about 3 s a seed, 15 s with -race
		s := New(sd)
		s.Signed = true
		s.Drop, s.Dup, s.MaxDelay = 0.05, 0.02, 1
		grow(t, s, 20, 5, func(i int) int { return 1 + (i-2)%3 }, 40)
		s.Adversary = 3
		check := func(what string) {
			t.Helper()
			if err := s.Honest(); err != nil {
				t.Fatalf("seed %d %s: %v\nreplay: go test ./peering/topology/topotest -run %s -seed %d", sd, what, err, t.Name(), sd)
			}
		}
		check("after the joins")
		s.Stop(7)
		converge(t, s, 10, "after peer 7 stopped")
		check("after peer 7 stopped")
		s.Join(7, Name(3)) // back through the adversary
		converge(t, s, 15, "after peer 7 restarted")
		for range 5 {
			s.Step()
			check("while discovery still meshes peer 7 in")
		}
		// Discovery may still be adding peer 7's connections: the mesh
		// converges again, under attack.
		converge(t, s, 20, "under attack")
		check("converged under attack")
		if s.Rejected() == 0 {
			t.Errorf("seed %d: no entry refused: the adversary did not reach anyone", sd)
		}
		t.Logf("seed %d: %d entries refused", sd, s.Rejected())
	}
}

// TestKeyChange: in signed mode, with few connections per peer (so most
// peers are not each other's neighbours and learn of one another only
// through others), a peer that comes back with new keys (its state lost)
// is taken everywhere under its new key: the peers connected to it vouch
// for the new key, and none for the old. Without that its old entry would
// stay wherever its name stays reachable.
func TestKeyChange(t *testing.T) {
	for _, sd := range seeds(1) { // about 6 s a seed, 15 s with -race
		s := New(sd)
		s.Signed, s.ConnLimit = true, 24
		grow(t, s, 30, 5, func(i int) int { return 1 + (i-2)%3 }, 40)
		s.RestartNewKey(7, Name(1))
		converge(t, s, 20, "after peer 7 came back with new keys")
		if err := s.Honest(); err != nil {
			t.Fatalf("seed %d: %v", sd, err)
		}
	}
}
