// Package topotest is a deterministic simulator of a mesh of topology
// Nodes: virtual rounds, a virtual network that can drop, duplicate, delay
// and reorder messages and be partitioned, connections made by discovery up
// to a limit, peers that join, leave and restart. One seed replays one run.
package topotest

import (
	"crypto/ed25519"
	"encoding/binary"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"

	"github.com/overlayd/overlayd/internal/simnet"
	"github.com/overlayd/overlayd/peering/topology"
	"github.com/overlayd/overlayd/proto"
)

// Per-datagram overhead counted on top of topology payloads: IPv4 and UDP
// (28), our header and gossip fields for the "topology" channel (29), and
// the chunk header (8) on messages split into 1200-byte pieces.
const (
	datagramOverhead = 28 + 4 + 1 + len(proto.ChannelTopology) + 12
	chunkPayload     = 1200
	chunkHeader      = 8
)

// Sim is a simulated mesh. Configure the exported fields before the first
// Round.
type Sim struct {
	Drop      float64 // probability that a message is lost
	Dup       float64 // probability that a message is delivered twice
	MaxDelay  int     // messages arrive 0..MaxDelay rounds late (reordering them)
	ConnLimit int     // connections per peer; 0 = unlimited
	// Signed runs the nodes in signed mode (password mode), each peer with
	// an Ed25519 key of its own, kept across restarts.
	Signed bool
	// Adversary, in signed mode, is the peer (1-based; 0: none) that also
	// sends, every round, to each neighbour: the entries of others it
	// knows re-signed with its own key at a higher version announcing a
	// /32, the same with their signature kept (tampered), the same
	// unsigned, at the version limit, and replays of old entries. It
	// holds the password, so its messages arrive on real connections.
	Adversary int

	rand  *rand.Rand
	seed  uint64
	round int64
	peers map[proto.PeerName]*peer
	order []proto.PeerName // join order
	// net carries the messages, within the round they are sent (and up
	// to MaxDelay rounds later); its partitions cut connections too.
	net   *simnet.Net[proto.TopoMsg]
	trace []string
	// LastChange is the last round a connection came or went.
	LastChange int64
	// old are entries the adversary saw, replayed later.
	old []proto.TopoPeer
	// keyGen counts, by peer, the keys it lost (RestartNewKey).
	keyGen map[proto.PeerName]int
}

// keyOf is peer name's signing key of generation gen.
func keyOf(name proto.PeerName, gen int) ed25519.PrivateKey {
	seed := make([]byte, ed25519.SeedSize)
	binary.BigEndian.PutUint64(seed, uint64(name))
	binary.BigEndian.PutUint64(seed[8:], uint64(gen))
	return ed25519.NewKeyFromSeed(seed)
}

// signer is peer name's current signer: the same for every incarnation,
// until RestartNewKey.
func (s *Sim) signer(name proto.PeerName) *topology.Signer {
	priv := keyOf(name, s.keyGen[name])
	return &topology.Signer{Key: [proto.TopoKeyLen]byte(priv.Public().(ed25519.PublicKey)),
		Sign: func(m []byte) [proto.TopoSigLen]byte { return [proto.TopoSigLen]byte(ed25519.Sign(priv, m)) }}
}

// RestartNewKey restarts peer i as a new incarnation with a new signing
// key (its state directory lost), dialling target.
func (s *Sim) RestartNewKey(i int, target proto.PeerName) {
	s.Stop(i)
	s.keyGen[Name(i)]++
	s.Join(i, target)
}

type peer struct {
	name    proto.PeerName
	uid     uint64
	addr    netip.AddrPort
	node    *topology.Node
	up      bool
	conns   map[proto.PeerName]bool   // established, symmetric
	refused map[proto.PeerName]int64  // dial refused: not before this round
	target  proto.PeerName            // the one peer it was given at start
	sent    int                       // bytes sent this measurement window
	uids    map[proto.PeerName]uint64 // handshake UIDs of its neighbours
	out     map[proto.PeerName]bool   // connections it dialled
}

// New makes an empty simulation.
func New(seed uint64) *Sim {
	r := rand.New(rand.NewPCG(seed, seed^0x5eed))
	net := simnet.New[proto.TopoMsg](r)
	net.Reorder = true // delayed messages are shuffled in with the current ones
	return &Sim{rand: r, seed: seed, peers: map[proto.PeerName]*peer{}, net: net, keyGen: map[proto.PeerName]int{}}
}

// Name is the peer name of the i-th peer (1-based).
func Name(i int) proto.PeerName { return proto.PeerName(0x020000000000 + i) }

// Round is the current round.
func (s *Sim) Round() int64 { return s.round }

// Join starts peer i, which will dial target (0: nobody) at its first round.
func (s *Sim) Join(i int, target proto.PeerName) {
	name := Name(i)
	uid := s.rand.Uint64() | 1
	cfg := topology.Config{Self: name, UID: uid, Nickname: fmt.Sprintf("p%d", i), Port: 6783, Rand: rand.New(rand.NewPCG(s.seed, uid))}
	if s.Signed {
		cfg.Signer = s.signer(name)
	}
	node, err := topology.New(cfg)
	if err != nil {
		panic(err) // cannot happen: the config is complete
	}
	p := &peer{name: name, uid: uid, node: node, up: true, target: target,
		addr:  netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 6783),
		conns: map[proto.PeerName]bool{}, refused: map[proto.PeerName]int64{}, uids: map[proto.PeerName]uint64{},
		out: map[proto.PeerName]bool{}}
	if s.peers[name] == nil {
		s.order = append(s.order, name)
	}
	s.peers[name] = p
}

// Stop takes peer i down (its state is lost; Join again restarts it as a
// new incarnation).
func (s *Sim) Stop(i int) {
	p := s.peers[Name(i)]
	p.up = false
	for other := range p.conns {
		s.disconnect(p.name, other)
	}
}

// Partition splits the peers into groups by f; Heal undoes it.
func (s *Sim) Partition(f func(proto.PeerName) int) {
	s.net.Partition(s.order, f)
	for _, name := range s.order {
		p := s.peers[name]
		for other := range p.conns {
			if !s.reachable(name, other) {
				s.disconnect(name, other)
			}
		}
	}
}

// Heal removes the partition.
func (s *Sim) Heal() { s.net.Heal() }

func (s *Sim) reachable(a, b proto.PeerName) bool { return s.net.Reaches(a, b) }

func (s *Sim) connect(a, b proto.PeerName) {
	pa, pb := s.peers[a], s.peers[b]
	pa.conns[b], pb.conns[a] = true, true
	pa.uids[b], pb.uids[a] = pb.uid, pa.uid
	pa.out[b] = true
	delete(pb.out, a)
	s.LastChange = s.round
}

func (s *Sim) disconnect(a, b proto.PeerName) {
	pa, pb := s.peers[a], s.peers[b]
	delete(pa.conns, b)
	delete(pb.conns, a)
	s.LastChange = s.round
}

// Step runs one round: every live peer publishes its connections, redials
// its target if it lost it, gossips and dials the peers it discovered; then
// messages are delivered, and their answers, until the network is quiet.
func (s *Sim) Step() {
	s.round++
	s.net.Advance()
	s.net.Loss, s.net.Dup, s.net.MaxDelay = s.Drop, s.Dup, s.MaxDelay
	// Connections made last round are reported now.
	for _, name := range s.order {
		p := s.peers[name]
		if !p.up {
			continue
		}
		if p.target != 0 {
			s.dial(p, p.target, true) // a configured peer, kept and retried
		}
		if s.Signed {
			keys := map[proto.PeerName][proto.TopoKeyLen]byte{}
			for other := range p.conns {
				keys[other] = s.signer(other).Key // proven in the handshake
			}
			p.node.Prove(keys)
		}
		p.node.SetLocal(s.conns(p), nil)
	}
	for _, name := range s.order {
		p := s.peers[name]
		if !p.up {
			continue
		}
		p.node.Tick()
		s.collect(p)
		if s.ConnLimit > 0 && len(p.conns) >= s.ConnLimit/2 {
			continue // no room for discovery: spare the work
		}
		for _, c := range topology.Discover(p.node.Candidates(), len(p.conns), p.node.Len(), s.ConnLimit, s.rand) {
			s.dial(p, c.Name, false)
		}
	}
	if a := s.peers[Name(s.Adversary)]; s.Signed && a != nil && a.up {
		s.attack(a)
	}
	s.deliver()
}

// attack sends the adversary's forgeries to each of its neighbours, each
// through the wire format (so that what the decoder skips is skipped).
func (s *Sim) attack(a *peer) {
	sign := s.signer(a.name)
	var forged []proto.TopoMsg
	for _, e := range a.node.Peers() {
		if e.Name == a.name {
			continue
		}
		if len(s.old) < 1000 && s.rand.IntN(4) == 0 {
			s.old = append(s.old, *e)
		}
		f := *e
		f.Version += 1000
		f.Prefixes = []netip.Prefix{netip.PrefixFrom(a.addr.Addr(), 32)}
		tampered := f // e's key and signature, other content
		unsigned := f
		f.Key = sign.Key
		msg, _ := proto.TopoSigned(&f)
		f.Sig = sign.Sign(msg)
		limit := f
		limit.Version = proto.MaxTopoVersion
		forged = append(forged, proto.TopoMsg{Kind: proto.TopoSignedEntries, Entries: []proto.TopoPeer{f, tampered, limit}},
			proto.TopoMsg{Kind: proto.TopoEntries, Entries: []proto.TopoPeer{unsigned}})
	}
	if len(s.old) > 0 {
		forged = append(forged, proto.TopoMsg{Kind: proto.TopoSignedEntries, Entries: []proto.TopoPeer{s.old[s.rand.IntN(len(s.old))]}})
	}
	for _, m := range forged {
		b, err := proto.AppendTopoMsg(nil, &m)
		if err != nil {
			panic(err) // the entries came from a node: they encode
		}
		wire, err := proto.ParseTopoMsg(b)
		if err != nil {
			panic(err)
		}
		for _, nb := range slices.Sorted(maps.Keys(a.conns)) {
			if s.reachable(a.name, nb) {
				s.net.Send(a.name, nb, wire)
			}
		}
	}
}

// Honest reports nil when no live peer holds an entry of an honest peer
// other than one that peer signed itself, or announcing a prefix (honest
// peers announce none here): the adversary forged nothing that stuck.
func (s *Sim) Honest() error {
	for _, name := range s.order {
		p := s.peers[name]
		if !p.up || name == Name(s.Adversary) {
			continue
		}
		for _, e := range p.node.Peers() {
			if e.Name == Name(s.Adversary) {
				continue
			}
			msg, err := proto.TopoSigned(e)
			if e.Key != s.signer(e.Name).Key || err != nil || !ed25519.Verify(e.Key[:], msg, e.Sig[:]) || len(e.Prefixes) > 0 {
				return fmt.Errorf("%v holds a forged entry of %v: %s, prefixes %v", name, e.Name, describe(e), e.Prefixes)
			}
		}
	}
	return nil
}

// Rejected is the number of entries the live peers refused.
func (s *Sim) Rejected() uint64 {
	var n uint64
	for _, p := range s.peers {
		if p.up {
			n += p.node.Rejected
		}
	}
	return n
}

// conns is what p reports: its connections, with the address it knows the
// other end by.
func (s *Sim) conns(p *peer) []proto.TopoConn {
	cs := make([]proto.TopoConn, 0, len(p.conns))
	for other := range p.conns {
		c := proto.TopoConn{Peer: other, Addr: s.peers[other].addr, Outbound: p.out[other], Established: true}
		if s.Signed {
			c.Key = s.signer(other).Key // proven in the handshake
		}
		cs = append(cs, c)
	}
	return cs
}

// dial connects p to other if both are up, can reach each other and have
// room (topology.Admit); a refusal is not retried for 5 rounds.
func (s *Sim) dial(p *peer, other proto.PeerName, configured bool) {
	q := s.peers[other]
	if q == nil || !q.up || p.conns[other] || other == p.name || s.round < p.refused[other] {
		return
	}
	if !s.reachable(p.name, other) || s.ConnLimit > 0 && len(p.conns) >= s.ConnLimit ||
		!topology.Admit(len(q.conns), s.ConnLimit, configured) {
		p.refused[other] = s.round + 5
		return
	}
	s.connect(p.name, other)
}

// collect takes p's outgoing messages, counts their bytes, and queues them
// through the network.
func (s *Sim) collect(p *peer) {
	rd := p.node.Ready()
	p.node.Advance()
	for _, m := range rd.Msgs {
		size := proto.TopoMsgSize(&m.Msg)
		datagrams := 1
		if size > chunkPayload {
			datagrams = (size + chunkPayload - 1) / chunkPayload
			size += datagrams * chunkHeader
		}
		p.sent += size + datagrams*datagramOverhead
		if !p.conns[m.To] || !s.reachable(p.name, m.To) {
			continue // the connection went away meanwhile
		}
		s.net.Send(p.name, m.To, m.Msg)
	}
}

// deliver hands out this round's messages, then the answers they cause,
// until nothing is due this round.
func (s *Sim) deliver() {
	for range 50 {
		batch := s.net.Due()
		if len(batch) == 0 {
			return
		}
		for _, d := range batch {
			q := s.peers[d.To]
			if q == nil || !q.up || !q.conns[d.From] {
				continue
			}
			if err := q.node.Step(d.From, q.uids[d.From], &d.Msg); err != nil {
				s.trace = append(s.trace, fmt.Sprintf("round %d: %v <- %v: %v", s.round, d.To, d.From, err))
			}
			s.collect(q)
		}
	}
}

// Converged reports nil when every live peer knows exactly the live peers,
// each at its current version, and routes along shortest paths.
func (s *Sim) Converged() error {
	var live []*peer
	for _, name := range s.order {
		if s.peers[name].up {
			live = append(live, s.peers[name])
		}
	}
	want := map[proto.PeerName]*proto.TopoPeer{}
	for _, p := range live {
		want[p.name] = p.node.Peer(p.name)
	}
	for _, p := range live {
		if p.node.Hash() != live[0].node.Hash() {
			return fmt.Errorf("%v and %v see different topologies", p.name, live[0].name)
		}
	}
	for _, p := range live[:1] { // all hashes are equal: checking one view checks all
		if p.node.Len() != len(want) {
			return fmt.Errorf("%v knows %d peers, %d are live", p.name, p.node.Len(), len(want))
		}
		for name, w := range want {
			got := p.node.Peer(name)
			if got == nil || got.UID != w.UID || got.Version != w.Version {
				return fmt.Errorf("%v has %v at %v, live one is at v%d", p.name, name, describe(got), w.Version)
			}
		}
	}
	return s.checkRoutes(live)
}

func describe(e *proto.TopoPeer) string {
	if e == nil {
		return "nothing"
	}
	return fmt.Sprintf("uid %x v%d", e.UID, e.Version)
}

// checkRoutes checks, in the real connection graph, that every next hop is
// a neighbour one step closer to the destination.
func (s *Sim) checkRoutes(live []*peer) error {
	dist := map[proto.PeerName]map[proto.PeerName]int{}
	bfs := func(from proto.PeerName) map[proto.PeerName]int {
		d := map[proto.PeerName]int{from: 0}
		queue := []proto.PeerName{from}
		for len(queue) > 0 {
			x := queue[0]
			queue = queue[1:]
			for y := range s.peers[x].conns {
				if _, ok := d[y]; !ok {
					d[y] = d[x] + 1
					queue = append(queue, y)
				}
			}
		}
		return d
	}
	for _, p := range live {
		routes := p.node.Routes()
		for _, q := range live {
			if q == p {
				continue
			}
			if dist[q.name] == nil {
				dist[q.name] = bfs(q.name)
			}
			dq := dist[q.name]
			d, reachable := dq[p.name]
			hop, ok := routes[q.name]
			switch {
			case !reachable && ok:
				return fmt.Errorf("%v routes to unreachable %v", p.name, q.name)
			case reachable && !ok:
				return fmt.Errorf("%v has no route to %v (%d hops away)", p.name, q.name, d)
			case reachable && (!p.conns[hop] || dq[hop] != d-1):
				return fmt.Errorf("%v routes to %v via %v, not on a shortest path", p.name, q.name, hop)
			}
		}
	}
	return nil
}

// BytesPerPeer is the mean of what live peers sent since the last
// ResetBytes.
func (s *Sim) BytesPerPeer() float64 {
	total, n := 0, 0
	for _, name := range s.order {
		if p := s.peers[name]; p.up {
			total += p.sent
			n++
		}
	}
	if n == 0 {
		return 0
	}
	return float64(total) / float64(n)
}

// ResetBytes starts a new measurement window.
func (s *Sim) ResetBytes() {
	for _, p := range s.peers {
		p.sent = 0
	}
}

// Trace is the list of rejected messages, for failure reports.
func (s *Sim) Trace() []string { return slices.Clone(s.trace) }

// Conns is the number of connections of peer i.
func (s *Sim) Conns(i int) int { return len(s.peers[Name(i)].conns) }
