package fuzz

import (
	"encoding/binary"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"

	"github.com/overlayd/overlayd/internal/ipv4"
	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/ipalloc/ring"
	"github.com/overlayd/overlayd/proto"
)

const (
	ipamOpStep    = iota // from (1) | length (2) | payload: a message from ipamFrom[from]
	ipamOpTick           // n (1): 1 + n%16 ticks
	ipamOpAlloc          // which (1): allocate for one of ipamIdents
	ipamOpRelease        // which (1): release one of ipamIdents
	ipamOpReach          // bits (1): which of ipamFrom are reachable
	ipamOpCount
)

var (
	// ipamSelf is the Node under test: ipamPeers[2], restored from
	// ipamState, so it has a ring, allocations and a hold from the start.
	ipamSelf = ipamPeers[2]
	// ipamOutsider owns no space and is never reachable unless the input
	// says so.
	ipamOutsider = proto.PeerName(0x0c0c0c0c0c0c)
	// ipamFrom are the names messages arrive under: the other two
	// peers, the outsider, and two that are refused (ourselves, none).
	ipamFrom   = []proto.PeerName{ipamPeers[0], ipamPeers[1], ipamOutsider, ipamSelf, 0}
	ipamIdents = []string{"a1b2c3", "weave:expose", "c2", "c3"}
)

func ipamStepCfg() ipalloc.Config {
	return ipalloc.Config{Self: ipamSelf, UID: 7, Universe: ipamRange, Quorum: 2, Rand: rand.New(rand.NewPCG(3, 4)),
		Warnf: func(string, ...any) {}, Infof: func(string, ...any) {}}
}

// ipamOps builds FuzzIpallocStep inputs.
type ipamOps []byte

func (o ipamOps) raw(from int, p []byte) ipamOps {
	o = append(o, ipamOpStep, byte(from))
	o = binary.BigEndian.AppendUint16(o, uint16(len(p)))
	return append(o, p...)
}

func (o ipamOps) step(from int, m *proto.IPAMMsg) ipamOps { return o.raw(from, encodeIPAM(m)) }

func (o ipamOps) op(op, arg byte) ipamOps { return append(o, op, arg) }

// ipamStepSeeds are exchanges a peer with a ring has: rings whole and
// partial, grants to it and takeovers of its space, space requests,
// anti-entropy, hold checks, consensus messages that come late, and
// messages under names that are refused.
func ipamStepSeeds() []ipamOps {
	start, _ := ipv4.Bounds(ipamRange)
	base := ipamRing()
	// peers[0] gives us 16 of its addresses.
	granted := base.Clone()
	if err := granted.Grant(start+16, uint64(start)+32, ipamPeers[0], ipamSelf); err != nil {
		panic(err)
	}
	grant := granted.Proto()
	grant.Entries = granted.Diff(base)
	// peers[1] takes over our held space, and peers[0] ours outside it.
	taken := base.Clone()
	taken.Transfer(ipamSelf, ipamPeers[1])
	all := ipamStepSeedsAll()
	hold := proto.IPAMMsg{Kind: proto.IPAMHoldCheck, Start: start + 192, Last: start + 255, Hash: base.HashSpan(start+192, uint64(start)+256)}
	ack := hold
	ack.Kind = proto.IPAMHoldAck
	return []ipamOps{
		ipamOps{}.op(ipamOpReach, 0x03).
			step(0, &proto.IPAMMsg{Kind: proto.IPAMRing, Ring: granted.Proto(), Reply: true}).
			op(ipamOpAlloc, 2).op(ipamOpAlloc, 3).
			step(1, &proto.IPAMMsg{Kind: proto.IPAMSpaceRequest, Start: start + 96, Last: start + 127}).
			step(0, &proto.IPAMMsg{Kind: proto.IPAMDigest, Hash: 1, Echo: true}).
			step(1, &proto.IPAMMsg{Kind: proto.IPAMDigest, Hash: granted.Hash(), Echo: true}).
			step(0, &hold).step(1, &ack).step(0, &ack).
			op(ipamOpTick, 15).op(ipamOpTick, 15).
			op(ipamOpRelease, 2),
		ipamOps{}.op(ipamOpReach, 0x01).
			step(0, &proto.IPAMMsg{Kind: proto.IPAMRing, Ring: grant, Partial: true}).
			step(1, &proto.IPAMMsg{Kind: proto.IPAMRing, Ring: taken.Proto()}).
			step(2, &proto.IPAMMsg{Kind: proto.IPAMRing, Ring: taken.Proto()}).
			step(0, &proto.IPAMMsg{Kind: proto.IPAMRingRequest}).
			step(0, &proto.IPAMMsg{Kind: proto.IPAMSpaceDenied, Start: start + 16, Last: start + 31}).
			op(ipamOpReach, 0x07).op(ipamOpAlloc, 0).op(ipamOpTick, 3),
		all,
	}
}

// ipamStepSeedsAll sends every message of ipamSeeds from each name.
func ipamStepSeedsAll() ipamOps {
	o := ipamOps{}.op(ipamOpReach, 0x03)
	for i, b := range ipamRingSeeds() {
		o = o.raw(i%len(ipamFrom), b)
	}
	p := proto.ProposalID{Round: 3, Proposer: proto.PaxosNode{Name: ipamPeers[0], UID: 9}}
	for i, m := range []proto.IPAMMsg{
		{Kind: proto.IPAMPaxos, Paxos: []proto.PaxosClaims{{Node: proto.PaxosNode{Name: ipamPeers[0], UID: 9}, Promise: p, Accepted: p, Origin: p, Value: ipamPeers}}},
		{Kind: proto.IPAMRingRequest},
		{Kind: proto.IPAMSpaceRequest, Start: 0xac101000, Last: 0xac1010ff},
		{Kind: proto.IPAMSpaceDenied, Start: 7, Last: 7},
		{Kind: proto.IPAMHoldAck, Start: 1, Last: 1, Hash: 8},
	} {
		o = o.step(i%len(ipamFrom), &m)
	}
	return o.raw(0, []byte{1, 4, 0, 0}).raw(1, nil)
}

// FuzzIpallocStep feeds an allocator Node that has a ring, allocations and
// held space messages from its peers, under their names and others, with
// local requests, ticks and changes of who is reachable. It never panics,
// and after every input the Node passes Check, and:
//   - a message Step refuses leaves the Node as it was;
//   - a Step moves none of a reachable third peer's space nor changes its
//     ring entries (the sender may grant it more), and moves our own
//     space, outside the held part, only to the sender (a donation);
//   - every message it sends decodes, and goes to a peer or to all;
//   - the state it saves decodes, and a Node restored from it holds the
//     same ring and addresses and passes Check.
func FuzzIpallocStep(f *testing.F) {
	for _, o := range ipamStepSeeds() {
		f.Add([]byte(o))
	}
	state := ipamState()
	f.Fuzz(func(t *testing.T, b []byte) {
		cfg := ipamStepCfg()
		n, err := ipalloc.New(cfg, state)
		if err != nil {
			t.Fatal(err)
		}
		start, _ := ipv4.Bounds(ipamRange)
		held := func(a uint32) bool { return a >= start+192 }
		reach := map[proto.PeerName]bool{}
		ipamCheckReady(t, n, cfg)
		n.Advance()
		for len(b) >= 2 {
			op, arg := b[0]%ipamOpCount, b[1]
			b = b[2:]
			switch op {
			case ipamOpStep:
				if len(b) < 2 {
					return
				}
				k := min(int(binary.BigEndian.Uint16(b)), len(b)-2)
				m, err := proto.ParseIPAMMsg(b[2 : 2+k])
				b = b[2+k:]
				if err != nil {
					continue
				}
				from := ipamFrom[int(arg)%len(ipamFrom)]
				r0, allocs, st := n.Ring(), n.Allocations(), n.Status()
				if err := n.Step(from, &m); err != nil {
					st1 := n.Status()
					st.Stats, st1.Stats = ipalloc.Stats{}, ipalloc.Stats{} // refusals are counted
					rd := n.Ready()
					if !n.Ring().Equal(r0) || !reflect.DeepEqual(n.Allocations(), allocs) || !reflect.DeepEqual(st1, st) || !rd.Empty() {
						t.Fatalf("refused %v from %v (%v), and changed the Node", m.Kind, from, err)
					}
					continue
				}
				r1 := n.Ring()
				for a := start; uint64(a) < uint64(start)+256; a++ {
					was, is := r0.Owner(a), r1.Owner(a)
					switch {
					case was == is:
					case was == ipamSelf && is != from && !held(a):
						t.Fatalf("a %v from %v gave our %v to %v", m.Kind, from, ipv4.Addr(a), is)
					case was != ipamSelf && was != from && reach[was]:
						t.Fatalf("a %v from %v gave %v's %v to %v, which it reaches", m.Kind, from, was, ipv4.Addr(a), is)
					}
				}
				for p := range reach {
					// New entries of p are grants to it; its own stay.
					now := ipamEntriesOf(r1, p)
					for _, e := range ipamEntriesOf(r0, p) {
						if p != from && !slices.Contains(now, e) {
							t.Fatalf("a %v from %v changed the entries of %v, which it reaches:\n%+v\n%+v", m.Kind, from, p,
								ipamEntriesOf(r0, p), now)
						}
					}
				}
			case ipamOpTick:
				for range 1 + arg%16 {
					n.Tick()
				}
			case ipamOpAlloc:
				n.Submit(ipalloc.Request{ID: uint64(arg) + 1, Op: ipalloc.OpAlloc, Ident: ipamIdents[int(arg)%len(ipamIdents)]})
			case ipamOpRelease:
				n.Submit(ipalloc.Request{ID: uint64(arg) + 1, Op: ipalloc.OpRelease, Ident: ipamIdents[int(arg)%len(ipamIdents)]})
			case ipamOpReach:
				var ps []proto.PeerName
				clear(reach)
				for i, p := range ipamFrom {
					if arg&(1<<i) != 0 {
						ps = append(ps, p)
						if p != ipamSelf && p != 0 {
							reach[p] = true
						}
					}
				}
				n.SetReachable(ps)
			}
			if err := n.Check(); err != nil {
				t.Fatalf("after op %d: %v", op, err)
			}
			ipamCheckReady(t, n, cfg)
			n.Advance()
		}
	})
}

// ipamEntriesOf lists p's ring entries.
func ipamEntriesOf(r *ring.Ring, p proto.PeerName) []proto.RingEntry {
	es, _ := r.Entries()
	return slices.DeleteFunc(es, func(e proto.RingEntry) bool { return e.Peer != p })
}

// ipamCheckReady checks what n has to do: messages that decode, to a peer
// or to all, and a saved state that restores it.
func ipamCheckReady(t *testing.T, n *ipalloc.Node, cfg ipalloc.Config) {
	t.Helper()
	rd := n.Ready()
	for _, m := range rd.Msgs {
		pm, err := proto.ParseIPAMMsg(m.Payload)
		if err != nil || pm.Kind != m.Kind {
			t.Fatalf("sent a %v that decodes as %v: %v", m.Kind, pm.Kind, err)
		}
		if m.To == ipamSelf {
			t.Fatalf("sent a %v to ourselves", m.Kind)
		}
	}
	if rd.State == nil {
		return
	}
	st, err := ipalloc.ParseState(rd.State)
	if err != nil || st.Self != ipamSelf {
		t.Fatalf("saved a state that does not decode: %v", err)
	}
	cfg.Rand = rand.New(rand.NewPCG(5, 6))
	again, err := ipalloc.New(cfg, rd.State)
	if err != nil {
		t.Fatalf("cannot restart from the saved state: %v", err)
	}
	if err := again.Check(); err != nil {
		t.Fatalf("restarted from the saved state: %v", err)
	}
	if !again.Ring().Equal(n.Ring()) || !reflect.DeepEqual(again.Allocations(), n.Allocations()) {
		t.Fatalf("restarted with another ring or other addresses:\n%+v\n%+v", again.Status(), n.Status())
	}
}
