package paxos

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/overlayd/overlayd/proto"
)

func node(name proto.PeerName, uid uint64, quorum int) *Node {
	return New(proto.PaxosNode{Name: name, UID: uid}, quorum)
}

// send delivers from's state to to, which thinks about it.
func send(from, to *Node) {
	if to.Update(from.State()) {
		to.Think()
	}
}

func TestSingleNode(t *testing.T) {
	n := node(0x0a0000000007, 1, 1)
	if _, ok := n.Consensus(); ok {
		t.Fatal("consensus before any proposal")
	}
	if n.Quorum() != 1 || n.Known() != 1 {
		t.Fatalf("quorum %d known %d", n.Quorum(), n.Known())
	}
	n.Propose()
	if !n.Think() {
		t.Fatal("Think after Propose changed nothing")
	}
	v, ok := n.Consensus()
	if !ok || !slices.Equal(v, []proto.PeerName{0x0a0000000007}) {
		t.Fatalf("consensus %v, %v; want [self]", v, ok)
	}
	if n.Think() {
		t.Fatal("Think again changed something")
	}
	// A quorum below 1 is 1.
	z := node(0x0a0000000001, 1, 0)
	z.Propose()
	z.Think()
	if _, ok := z.Consensus(); !ok || z.Quorum() != 1 {
		t.Fatal("quorum 0 did not behave as 1")
	}
}

func TestTwoNodesNeedEachOther(t *testing.T) {
	a, b := node(0x0a0000000002, 1, 2), node(0x0a0000000001, 2, 2)
	a.Propose()
	a.Think()
	if _, ok := a.Consensus(); ok {
		t.Fatal("consensus alone with quorum 2")
	}
	for range 4 {
		send(a, b)
		send(b, a)
	}
	va, oka := a.Consensus()
	vb, okb := b.Consensus()
	want := []proto.PeerName{0x0a0000000001, 0x0a0000000002}
	if !oka || !okb || !slices.Equal(va, want) || !slices.Equal(vb, want) {
		t.Fatalf("a: %v %v, b: %v %v; want %v on both", va, oka, vb, okb, want)
	}
}

// TestRandomRuns gossips whole states between three voters (quorum 2) in
// random order, losing messages, with voters proposing again at random
// while undecided. Everyone decides, on one value, sorted, and no voter
// ever changes its mind.
func TestRandomRuns(t *testing.T) {
	names := []proto.PeerName{0x0a00000000c3, 0x0a00000000a1, 0x0a00000000b2}
	for seed := range uint64(500) {
		rng := rand.New(rand.NewPCG(seed, 99))
		nodes := make([]*Node, len(names))
		for i, name := range names {
			nodes[i] = node(name, rng.Uint64(), 2)
		}
		decided := make([][]proto.PeerName, len(nodes))
		var steps int
		for steps = 0; steps < 2000; steps++ {
			done := true
			for i, n := range nodes {
				v, ok := n.Consensus()
				if !ok {
					done = false
					continue
				}
				if decided[i] != nil && !slices.Equal(decided[i], v) {
					t.Fatalf("seed %d: %v changed its decision from %v to %v", seed, names[i], decided[i], v)
				}
				decided[i] = v
			}
			if done {
				break
			}
			i := rng.IntN(len(nodes))
			switch r := rng.IntN(20); {
			case r == 0 || steps == 0:
				// Undecided voters time out and propose again.
				if _, ok := nodes[i].Consensus(); !ok {
					nodes[i].Propose()
					nodes[i].Think()
				}
			case r < 8: // lost
			default:
				j := (i + 1 + rng.IntN(len(nodes)-1)) % len(nodes)
				send(nodes[i], nodes[j])
			}
		}
		if steps == 2000 {
			t.Fatalf("seed %d: no consensus everywhere after %d steps: %v", seed, steps, decided)
		}
		for i, v := range decided {
			if !slices.Equal(v, decided[0]) {
				t.Fatalf("seed %d: %v decided %v, %v decided %v", seed, names[0], decided[0], names[i], v)
			}
			if !slices.IsSorted(v) || len(slices.Compact(slices.Clone(v))) != len(v) {
				t.Fatalf("seed %d: value %v not sorted and distinct", seed, v)
			}
			if len(v) < 2 {
				t.Fatalf("seed %d: value %v has fewer names than the quorum", seed, v)
			}
		}
	}
}

// TestRestartedNodeCountsOnce: a restarted process (same name, new UID)
// is a new voter, but one peer cannot make a quorum of two on its own.
func TestRestartedNodeCountsOnce(t *testing.T) {
	const a, b = proto.PeerName(0x0a0000000001), proto.PeerName(0x0a0000000002)
	old, restarted := node(a, 1, 2), node(a, 2, 2)
	old.Propose()
	old.Think()
	for range 5 {
		send(old, restarted)
		send(restarted, old)
		restarted.Propose()
		restarted.Think()
		send(restarted, old)
		send(old, restarted)
	}
	for _, n := range []*Node{old, restarted} {
		if n.Known() != 2 {
			t.Fatalf("known %d, want 2 (two incarnations)", n.Known())
		}
		if v, ok := n.Consensus(); ok {
			t.Fatalf("two incarnations of one peer decided %v with quorum 2", v)
		}
		if s := n.State(); slices.ContainsFunc(s, func(c proto.PaxosClaims) bool { return c.Accepted.Round > 0 }) {
			t.Fatalf("two incarnations of one peer accepted a proposal: %+v", s)
		}
	}
	// Claims that two incarnations accepted one value still count once.
	acc := proto.ProposalID{Round: 1, Proposer: proto.PaxosNode{Name: a, UID: 1}}
	fake := []proto.PaxosClaims{
		{Node: proto.PaxosNode{Name: a, UID: 1}, Promise: acc, Accepted: acc, Origin: acc, Value: []proto.PeerName{b, a}},
		{Node: proto.PaxosNode{Name: a, UID: 2}, Promise: acc, Accepted: acc, Origin: acc, Value: []proto.PeerName{b, a}},
	}
	obs := node(b, 9, 2)
	obs.Update(fake)
	if v, ok := obs.Consensus(); ok {
		t.Fatalf("one peer's two incarnations made a quorum: %v", v)
	}
	// With b itself, there is a quorum.
	obs.Think()
	if v, ok := obs.Consensus(); !ok || !slices.Equal(v, []proto.PeerName{a, b}) {
		t.Fatalf("after b accepts: %v, %v; want [a b]", v, ok)
	}
	// And a restarted voter joins a live one to decide.
	c1 := node(b, 3, 2)
	c1.Propose()
	c1.Think()
	for range 3 {
		send(c1, restarted)
		send(restarted, c1)
	}
	vr, okr := restarted.Consensus()
	vc, okc := c1.Consensus()
	if !okr || !okc || !slices.Equal(vr, vc) {
		t.Fatalf("restarted %v %v, other %v %v", vr, okr, vc, okc)
	}
}

func TestUpdate(t *testing.T) {
	a, b := node(0x0a0000000001, 1, 2), node(0x0a0000000002, 1, 2)
	a.Propose()
	a.Think()
	st := a.State()
	if !b.Update(st) {
		t.Fatal("new state reported unchanged")
	}
	if b.Update(st) {
		t.Fatal("same state reported changed")
	}
	if b.Update([]proto.PaxosClaims{{Node: proto.PaxosNode{Name: 0, UID: 5}}}) || b.Known() != 2 {
		t.Fatal("a voter with no name was taken")
	}
	// Older claims do not replace newer ones.
	older := a.State()
	a.Propose()
	a.Think()
	b.Update(a.State())
	if b.Update(older) {
		t.Fatal("older claims reported as a change")
	}
	// State is a copy.
	s1 := b.State()
	for i := range s1 {
		s1[i].Value = append(s1[i].Value, 0x0a00000000ff)
		s1[i].Promise.Round = 99
	}
	if s2 := b.State(); fmt.Sprint(s2) == fmt.Sprint(s1) {
		t.Fatal("State aliases the node's claims")
	}
}

// TestDecisionsAcrossBallots replays a schedule in which counting
// acceptances by origin, as Weave does, would add those of two ballots into
// one decision while a later ballot decides another value (y {x,y}, x
// {x,y,z}: rings with different seeds, which never merge). Counting per
// ballot, every voter decides the same value.
func TestDecisionsAcrossBallots(t *testing.T) {
	const xn, yn, zn = proto.PeerName(0x0a0000000001), proto.PeerName(0x0a0000000002), proto.PeerName(0x0a0000000003)
	x, y, z := node(xn, 1, 2), node(yn, 1, 2), node(zn, 1, 2)
	// Ballot (1,x): y promises; x accepts its own value {x,y}.
	x.Propose()
	x.Think()
	send(x, y)
	send(y, x)
	// Ballot (1,z) > (1,x): y promises; z accepts {x,y,z}. y does not hear it.
	z.Propose()
	z.Think()
	send(z, y)
	send(y, z)
	// Ballot (2,y): x promises, carrying its acceptance (1,x) {x,y}; y
	// accepts that value.
	y.Propose()
	y.Think()
	send(y, x)
	send(x, y)
	// Ballot (2,z): x promises (it never heard y accept); z takes the
	// highest acceptance it sees, its own (1,z) {x,y,z}; x accepts it.
	z.Propose()
	z.Think()
	send(z, x)
	send(x, z)
	send(z, x)
	vy, oky := y.Consensus()
	vx, okx := x.Consensus()
	t.Logf("y: %v %v; x: %v %v", vy, oky, vx, okx)
	if oky && okx && !slices.Equal(vx, vy) {
		t.Fatalf("two decisions: y decided %v, x decided %v", vy, vx)
	}
}
