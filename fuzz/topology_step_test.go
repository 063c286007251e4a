package fuzz

import (
	"cmp"
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"github.com/overlayd/overlayd/peering/topology"
	"github.com/overlayd/overlayd/proto"
)

const (
	topoOpStep  = iota // from (1) | length (2) | payload: a message from topoPeers[from]
	topoOpTick         // n (1): 1 + n%4 gossip rounds
	topoOpLocal        // bits (1): SetLocal, see topoLocal
	topoOpCount
)

var (
	topoSelf    = proto.PeerName(0x12d2fe7ac1f2)
	topoSelfUID = uint64(0x5eed)
	// topoPeers send to the Node under test, with topoUIDs as the UIDs
	// their handshakes gave; they are its neighbours as topoLocal says.
	topoPeers = []proto.PeerName{0xaeafa6361837, 0xe6b190cdda76, 0x7e214a702f45}
	topoUIDs  = []uint64{20, 30, 40}
	// topoOther is a peer nobody connects to directly.
	topoOther    = proto.PeerName(0x0a0b0c0d0e0f)
	topoMaxPeers = 8
)

// topoLocal is what SetLocal gets for bits: a connection to topoPeers[i]
// if bit i is set, established if bit i+3 is too; bit 6 chooses the
// prefixes.
func topoLocal(bits byte) ([]proto.TopoConn, []netip.Prefix) {
	var conns []proto.TopoConn
	for i, p := range topoPeers {
		if bits&(1<<i) != 0 {
			conns = append(conns, proto.TopoConn{Peer: p, Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i + 1)}), 6783),
				Outbound: i%2 == 0, Established: bits&(8<<i) != 0})
		}
	}
	slices.SortFunc(conns, topoByPeer) // as SetLocal keeps them
	ps := []netip.Prefix{netip.MustParsePrefix("10.40.1.0/24")}
	if bits&0x40 != 0 {
		ps = append(ps, netip.MustParsePrefix("10.40.9.7/32"))
	}
	return conns, ps
}

func topoByPeer(a, b proto.TopoConn) int { return cmp.Compare(a.Peer, b.Peer) }

// topoOps builds FuzzTopologyStep inputs.
type topoOps []byte

func (o topoOps) step(from int, m *proto.TopoMsg) topoOps {
	p, err := proto.AppendTopoMsg(nil, m)
	if err != nil {
		panic(err)
	}
	o = append(o, topoOpStep, byte(from))
	o = binary.BigEndian.AppendUint16(o, uint16(len(p)))
	return append(o, p...)
}

func (o topoOps) op(op, arg byte) topoOps { return append(o, op, arg) }

func topoEntry(name proto.PeerName, uid, version uint64, prefix string, conns ...proto.PeerName) proto.TopoPeer {
	e := proto.TopoPeer{Name: name, UID: uid, Version: version, Port: 6783, Nickname: "n" + name.String()[:2]}
	for _, c := range conns {
		e.Conns = append(e.Conns, proto.TopoConn{Peer: c, Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(c)}), 6783),
			Established: true})
	}
	slices.SortFunc(e.Conns, topoByPeer)
	if prefix != "" {
		e.Prefixes = []netip.Prefix{netip.MustParsePrefix(prefix)}
	}
	return e
}

// topoStepSeeds are gossip histories: neighbours' entries and what they
// relay, anti-entropy, stale and forged copies, peers that go away and
// come back, and local changes.
func topoStepSeeds() []topoOps {
	a, b, c := topoPeers[0], topoPeers[1], topoPeers[2]
	entries := func(es ...proto.TopoPeer) *proto.TopoMsg { return &proto.TopoMsg{Kind: proto.TopoEntries, Entries: es} }
	return []topoOps{
		topoOps{}.op(topoOpLocal, 0x1b).
			step(0, entries(topoEntry(a, 20, 3, "10.40.2.0/24", topoSelf, topoOther), topoEntry(topoOther, 50, 7, "10.40.5.0/24", a))).
			step(1, entries(topoEntry(b, 30, 1, "", topoSelf))).
			step(0, &proto.TopoMsg{Kind: proto.TopoHash, Count: 2, Hash: 99}).
			step(0, &proto.TopoMsg{Kind: proto.TopoHash, Count: 2, Hash: 99}).
			step(1, &proto.TopoMsg{Kind: proto.TopoDigestRequest, Digest: []proto.TopoDigestItem{{Name: a, UID: 20, Version: 9}, {Name: topoSelf, UID: topoSelfUID, Version: 1}}}).
			op(topoOpTick, 0).
			step(1, &proto.TopoMsg{Kind: proto.TopoDigestReply, Digest: []proto.TopoDigestItem{{Name: topoOther, UID: 50, Version: 1}}}).
			// a loses topoOther, which is collected, and a stale copy
			// of it is not taken back; a new incarnation is.
			step(0, entries(topoEntry(a, 20, 4, "10.40.2.0/24", topoSelf))).
			op(topoOpTick, 2).
			step(1, entries(topoEntry(topoOther, 50, 7, "10.40.5.0/24", a))).
			step(0, entries(topoEntry(topoOther, 51, 1, "", a), topoEntry(a, 20, 5, "", topoSelf, topoOther))).
			op(topoOpLocal, 0x5b),
		topoOps{}.op(topoOpLocal, 0x3f).
			// Impersonation, an older incarnation of ourselves, a copy
			// of ourselves near the version limit, and an entry at it.
			step(0, entries(topoEntry(a, 666, 9, "", topoSelf))).
			step(1, entries(topoEntry(topoSelf, 1, 40, "10.40.66.0/24", b))).
			step(2, entries(topoEntry(topoSelf, 2, proto.MaxTopoVersion-40, "", c))).
			op(topoOpLocal, 0x07).
			step(2, entries(topoEntry(c, 40, proto.MaxTopoVersion-1, "", topoSelf))),
		func() topoOps {
			// More peers than MaxPeers, relayed by b.
			var es []proto.TopoPeer
			for i := range topoMaxPeers + 2 {
				es = append(es, topoEntry(proto.PeerName(0x010000000000+i), uint64(i+1), 1, "", b))
			}
			return topoOps{}.op(topoOpLocal, 0x12).step(1, entries(es...)).op(topoOpTick, 3).op(topoOpLocal, 0)
		}(),
	}
}

// FuzzTopologyStep feeds a plaintext topology Node messages from a few
// neighbours, gossip rounds and local changes. It never panics, and after
// every input:
//   - a Step takes no entry back and replaces none by an older one, and
//     takes a neighbour's own entry only with the UID of its handshake;
//   - our own entry is ours: our name, UID, port and nickname, the
//     connections and prefixes of the last SetLocal, a version that only
//     grows;
//   - a removed entry's copies are not taken back while its tomb lasts;
//   - no entry is at or over proto.MaxTopoVersion (receivers skip those);
//   - at most MaxPeers entries are kept;
//   - a refusal is counted in Rejected;
//   - hashes and digest requests of a neighbour are answered once a round;
//   - messages go to our neighbours or back to the sender, encode, decode
//     to themselves, and entries messages fit MaxEntriesBytes;
//   - routes start at a neighbour; candidates are known peers we have no
//     connection to.
func FuzzTopologyStep(f *testing.F) {
	for _, o := range topoStepSeeds() {
		f.Add([]byte(o))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := topology.New(topology.Config{Self: topoSelf, UID: topoSelfUID, Nickname: "self", Port: 6783,
			Rand: rand.New(rand.NewPCG(1, 2)), MaxPeers: topoMaxPeers})
		if err != nil {
			t.Fatal(err)
		}
		type tomb struct {
			uid, version uint64
			until        int
		}
		var (
			round   int
			synced  = map[proto.PeerName]int{} // the round each neighbour's hash or digest request was answered
			tombs   = map[proto.PeerName]tomb{}
			conns   []proto.TopoConn // our own entry's, as SetLocal should store them
			prefixs []netip.Prefix
		)
		self := *n.Peer(topoSelf)
		for len(b) >= 2 {
			op, arg := b[0]%topoOpCount, b[1]
			b = b[2:]
			before := map[proto.PeerName]*proto.TopoPeer{}
			for _, e := range n.Peers() {
				before[e.Name] = e
			}
			rejected := n.Rejected
			from := proto.PeerName(0)
			switch op {
			case topoOpStep:
				if len(b) < 2 {
					return
				}
				k := min(int(binary.BigEndian.Uint16(b)), len(b)-2)
				m, err := proto.ParseTopoMsg(b[2 : 2+k])
				b = b[2+k:]
				if err != nil {
					continue
				}
				i := int(arg) % len(topoPeers)
				from = topoPeers[i]
				err = n.Step(from, topoUIDs[i], &m)
				if err != nil && (m.Kind == proto.TopoEntries || m.Kind == proto.TopoSignedEntries) && n.Rejected == rejected {
					t.Fatalf("refused (%v) without counting it", err)
				}
				if n.Rejected < rejected+uint64(m.Skipped) {
					t.Fatalf("Rejected went from %d to %d, %d entries skipped", rejected, n.Rejected, m.Skipped)
				}
				if m.Kind == proto.TopoHash || m.Kind == proto.TopoDigestRequest {
					if last, ok := synced[from]; ok && last == round && len(n.Ready().Msgs) > 0 {
						t.Fatalf("answered %v a second time in round %d", from, round)
					} else if !ok || last != round {
						synced[from] = round
					}
				}
				for name, old := range before {
					e := n.Peer(name)
					switch {
					case e == nil:
						t.Fatalf("a message took %v's entry away", name)
					case e != old && (old.Version > e.Version || old.Version == e.Version && old.UID >= e.UID):
						t.Fatalf("%v's entry went back from version %d (UID %d) to %d (UID %d)", name, old.Version, old.UID, e.Version, e.UID)
					}
				}
				if e := n.Peer(from); e != nil && e != before[from] && e.UID != topoUIDs[i] {
					t.Fatalf("took %v's own entry with UID %d; it handshook with %d", from, e.UID, topoUIDs[i])
				}
				for _, e := range n.Peers() {
					if tb, ok := tombs[e.Name]; ok && before[e.Name] == nil {
						if e.UID == tb.uid && e.Version <= tb.version {
							t.Fatalf("took back a copy of removed %v (UID %d, version %d)", e.Name, e.UID, e.Version)
						}
						delete(tombs, e.Name)
					}
				}
			case topoOpTick:
				for range 1 + arg%4 {
					n.Tick()
					round++
					for name, tb := range tombs {
						if round > tb.until {
							delete(tombs, name)
						}
					}
					for _, name := range n.Ready().Removed {
						if n.Peer(name) != nil || name == topoSelf {
							t.Fatalf("removed %v, still held", name)
						}
						old := before[name]
						if old == nil {
							t.Fatalf("removed %v, which it did not hold", name)
						}
						if len(tombs) < topoMaxPeers {
							tombs[name] = tomb{uid: old.UID, version: old.Version, until: round + topology.TombRounds}
						}
						delete(before, name)
					}
					checkTopoMsgs(t, n, 0)
					n.Advance()
				}
			case topoOpLocal:
				cs, ps := topoLocal(arg)
				n.SetLocal(cs, ps)
				conns, prefixs = cs, ps
			}

			// Our own entry.
			me := n.Peer(topoSelf)
			if me == nil || me.UID != topoSelfUID || me.Port != self.Port || me.Nickname != self.Nickname || me.Version < self.Version {
				t.Fatalf("our entry %+v, was %+v", me, self)
			}
			if !reflect.DeepEqual(me.Conns, conns) && (len(me.Conns) > 0 || len(conns) > 0) {
				t.Fatalf("our connections %+v, set %+v", me.Conns, conns)
			}
			if !slices.Equal(me.Prefixes, prefixs) {
				t.Fatalf("our prefixes %v, set %v", me.Prefixes, prefixs)
			}
			self = *me
			if n.Len() > topoMaxPeers {
				t.Fatalf("%d entries, MaxPeers %d", n.Len(), topoMaxPeers)
			}
			for _, e := range n.Peers() {
				if e.Version >= proto.MaxTopoVersion {
					t.Fatalf("holds %v's entry at version %d, which no receiver takes", e.Name, e.Version)
				}
			}
			if n.Rejected < rejected {
				t.Fatalf("Rejected went down from %d to %d", rejected, n.Rejected)
			}
			nbs := n.Neighbours()
			for dest, hop := range n.Routes() {
				if dest == topoSelf || !slices.Contains(nbs, hop) || n.Routes()[hop] != hop {
					t.Fatalf("route to %v via %v; neighbours %v", dest, hop, nbs)
				}
			}
			for _, c := range n.Candidates() {
				if c.Name == topoSelf || n.Peer(c.Name) == nil || slices.ContainsFunc(me.Conns, func(x proto.TopoConn) bool { return x.Peer == c.Name }) {
					t.Fatalf("candidate %+v; our connections %+v", c, me.Conns)
				}
			}
			checkTopoMsgs(t, n, from)
			n.Advance()
		}
	})
}

// checkTopoMsgs checks n's messages: to a neighbour or to from, and
// encoded within the limits.
func checkTopoMsgs(t *testing.T, n *topology.Node, from proto.PeerName) {
	t.Helper()
	nbs := n.Neighbours()
	for _, m := range n.Ready().Msgs {
		if m.To != from && !slices.Contains(nbs, m.To) {
			t.Fatalf("message to %v, not a neighbour (%v)", m.To, nbs)
		}
		enc, err := proto.AppendTopoMsg(nil, &m.Msg)
		if err != nil {
			t.Fatalf("cannot encode %+v: %v", m.Msg, err)
		}
		again, err := proto.ParseTopoMsg(enc)
		if err != nil || again.Skipped != 0 || !reflect.DeepEqual(topoNorm(again), topoNorm(m.Msg)) {
			t.Fatalf("sent %+v, which decodes to %+v, %v", m.Msg, again, err)
		}
		if len(m.Msg.Entries) > 1 && len(enc) > topology.MaxEntriesBytes {
			t.Fatalf("entries message of %d bytes", len(enc))
		}
	}
}

// topoNorm makes empty slices nil, so that a message and its decoded
// copy compare equal.
func topoNorm(m proto.TopoMsg) proto.TopoMsg {
	if len(m.Digest) == 0 {
		m.Digest = nil
	}
	if len(m.Entries) == 0 {
		m.Entries = nil
	}
	m.Entries = slices.Clone(m.Entries)
	for i := range m.Entries {
		e := &m.Entries[i]
		if len(e.Conns) == 0 {
			e.Conns = nil
		}
		if len(e.Prefixes) == 0 {
			e.Prefixes = nil
		}
	}
	return m
}
