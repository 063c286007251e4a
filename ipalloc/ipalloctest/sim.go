// Package ipalloctest runs many allocator cores in one process over a
// simulated network: seeded, so a failing schedule replays exactly. The
// network loses, duplicates and reorders messages and can be partitioned;
// peers stop, restart from their saved state, and take over dead peers'
// space. Check verifies the invariants that must hold after every step.
package ipalloctest

import (
	"cmp"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"

	"github.com/overlayd/overlayd/internal/ipv4"
	"github.com/overlayd/overlayd/internal/simnet"
	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/ipalloc/ring"
	"github.com/overlayd/overlayd/proto"
)

// Name is the peer name of peer i.
func Name(i int) proto.PeerName { return proto.PeerName(0x0a0000000000 + i) }

// Sim is a simulated cluster. It is not safe for concurrent use.
type Sim struct {
	// Net carries the messages, a tick's worth a round: set its Loss,
	// Dup and Reorder to make it unreliable.
	Net      *simnet.Net[[]byte]
	Universe netip.Prefix
	rand     *rand.Rand
	peers    map[proto.PeerName]*Peer
	ticks    int64
	nextID   uint64
	answers  map[uint64]ipalloc.Done
	live     []*Peer                  // by name; nil when it must be recomputed
	parsed   map[*byte]*proto.IPAMMsg // this step's deliveries, decoded
	moved    bool                     // peers started, stopped or partitioned since the last step
	Log      []string                 // Warnf lines, for failure reports
	Sent     [8]int                   // deliveries by message kind
	// Adversary is a peer whose refused messages are counted in Refused
	// rather than failing the run: see Attack.
	Adversary proto.PeerName
	Refused   int
	// replays are rings the Adversary saw, sent again later.
	replays [][]byte
}

// Peer is one simulated overlayd.
type Peer struct {
	Name  proto.PeerName
	Node  *ipalloc.Node
	cfg   ipalloc.Config
	state []byte // last saved
	live  bool
	uid   uint64
	// Lost is every address the peer gave up (Ready.Lost), in order.
	Lost []ipalloc.Lost
}

// New makes an empty cluster over universe.
func New(seed uint64, universe netip.Prefix) *Sim {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	net := simnet.New[[]byte](r)
	net.Latency = 1
	return &Sim{Universe: universe, rand: r, Net: net, peers: map[proto.PeerName]*Peer{}, answers: map[uint64]ipalloc.Done{}}
}

// Rand is the simulation's random source, for schedules.
func (s *Sim) Rand() *rand.Rand { return s.rand }

// Ticks is the simulated time.
func (s *Sim) Ticks() int64 { return s.ticks }

// Add starts a new peer; cfg's Self, UID, Universe and Rand are filled in.
func (s *Sim) Add(name proto.PeerName, cfg ipalloc.Config) error {
	cfg.Self, cfg.Universe = name, s.Universe
	p := &Peer{Name: name, cfg: cfg}
	s.peers[name] = p
	return s.start(p)
}

func (s *Sim) start(p *Peer) error {
	p.uid = s.rand.Uint64()
	cfg := p.cfg
	cfg.UID = p.uid
	cfg.Rand = rand.New(rand.NewPCG(s.rand.Uint64(), s.rand.Uint64()))
	name := p.Name
	cfg.Warnf = func(f string, a ...any) {
		s.Log = append(s.Log, fmt.Sprintf("t=%d %v: ", s.ticks, name)+fmt.Sprintf(f, a...))
	}
	cfg.Infof = cfg.Warnf
	n, err := ipalloc.New(cfg, p.state)
	if err != nil {
		return err
	}
	p.Node, p.live = n, true
	s.drain(p)
	s.reachability()
	return nil
}

// Stop stops a peer; its saved state stays.
func (s *Sim) Stop(name proto.PeerName) {
	if p := s.peers[name]; p != nil && p.live {
		p.live = false
		p.Node = nil
		s.reachability()
	}
}

// Restart starts a stopped peer again from its saved state.
func (s *Sim) Restart(name proto.PeerName) error {
	p := s.peers[name]
	if p == nil || p.live {
		return fmt.Errorf("ipalloctest: %v is not stopped", name)
	}
	return s.start(p)
}

// UID is the peer's current incarnation: requests to an earlier one are
// lost with it.
func (p *Peer) UID() uint64 { return p.uid }

// Peer returns a peer, live or not.
func (s *Sim) Peer(name proto.PeerName) *Peer { return s.peers[name] }

// Live returns the live peers, by name.
func (s *Sim) Live() []*Peer {
	if s.live != nil {
		return s.live
	}
	out := []*Peer{}
	for _, p := range s.peers {
		if p.live {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b *Peer) int { return cmp.Compare(a.Name, b.Name) })
	s.live = out
	return out
}

// Partition splits the network into groups; f gives each peer's group.
func (s *Sim) Partition(f func(proto.PeerName) int) {
	s.Net.Partition(slices.Sorted(maps.Keys(s.peers)), f)
	s.reachability()
}

// Heal joins the network again.
func (s *Sim) Heal() {
	s.Net.Heal()
	s.reachability()
}

func (s *Sim) reaches(a, b proto.PeerName) bool {
	pa, pb := s.peers[a], s.peers[b]
	return pa != nil && pb != nil && pa.live && pb.live && s.Net.Reaches(a, b)
}

// reachability tells every live peer whom it reaches.
// It runs at the start of the next step, once for all changes made
// between steps.
func (s *Sim) reachability() {
	s.live = nil
	s.moved = true
}

func (s *Sim) tellReachability() {
	if !s.moved {
		return
	}
	s.moved = false
	groups := map[int][]proto.PeerName{}
	for _, p := range s.Live() {
		g := s.Net.Group(p.Name)
		groups[g] = append(groups[g], p.Name)
	}
	for _, p := range s.Live() {
		p.Node.SetReachable(groups[s.Net.Group(p.Name)]) // it leaves itself out
		s.drain(p)
	}
}

// Submit hands a request to a peer and returns its ID.
func (s *Sim) Submit(name proto.PeerName, r ipalloc.Request) uint64 {
	s.nextID++
	r.ID = s.nextID
	if p := s.peers[name]; p != nil && p.live {
		p.Node.Submit(r)
		s.drain(p)
	}
	return r.ID
}

// Answer returns the answer to a request, if there is one yet.
func (s *Sim) Answer(id uint64) (ipalloc.Done, bool) {
	d, ok := s.answers[id]
	return d, ok
}

// drain carries out a peer's Ready: saves state, queues messages, records
// answers.
func (s *Sim) drain(p *Peer) {
	for range 100 {
		rd := p.Node.Ready()
		if rd.Empty() {
			return
		}
		if rd.State != nil {
			p.state = rd.State
		}
		for _, m := range rd.Msgs {
			b := m.Payload
			if m.To != 0 {
				s.Net.Send(p.Name, m.To, b)
				continue
			}
			for _, q := range s.Live() {
				if q != p && s.reaches(p.Name, q.Name) {
					s.Net.Send(p.Name, q.Name, b)
				}
			}
		}
		for _, d := range rd.Done {
			s.answers[d.ID] = d
		}
		p.Lost = append(p.Lost, rd.Lost...)
		p.Node.Advance()
	}
	panic(fmt.Sprintf("ipalloctest: %v never runs out of work", p.Name))
}

// Step advances one tick: delivers what was sent (subject to the network),
// then ticks every live peer.
func (s *Sim) Step() error {
	s.tellReachability()
	s.ticks++
	s.Net.Advance()
	s.parsed = map[*byte]*proto.IPAMMsg{}
	for _, d := range s.Net.Due() {
		if !s.reaches(d.From, d.To) {
			continue
		}
		if err := s.deliver(d); err != nil {
			return err
		}
	}
	for _, p := range s.Live() {
		p.Node.Tick()
		s.drain(p)
	}
	return nil
}

func (s *Sim) deliver(d simnet.Delivery[[]byte]) error {
	p := s.peers[d.To]
	s.Sent[d.Msg[0]&7]++
	// A broadcast is decoded once for all its receivers (Step reads,
	// never keeps or changes, a message).
	m := s.parsed[&d.Msg[0]]
	if m == nil {
		pm, err := proto.ParseIPAMMsg(d.Msg)
		if err != nil {
			return fmt.Errorf("%v sent %v an undecodable message: %w", d.From, d.To, err)
		}
		m = &pm
		s.parsed[&d.Msg[0]] = m
	}
	if err := p.Node.Step(d.From, m); err != nil {
		if d.From != s.Adversary || s.Adversary == 0 {
			return fmt.Errorf("%v refused a message from %v: %w", d.To, d.From, err)
		}
		s.Refused++
	}
	s.drain(p)
	return nil
}

// Attack has the Adversary, a live peer on the network, send every other
// live peer: its ring with every range made its own at the version limit
// (proto.MaxRingVersion, which no honest peer reaches), and a ring it
// recorded earlier, replayed; and every peer that holds a ring already:
// its ring with every range made its own one version up, and its ring
// with a token of its own in the middle of every range (a peer without a
// ring takes the first one it gets whole: it has nothing to judge a change
// against, see the README).
func (s *Sim) Attack() error {
	a := s.peers[s.Adversary]
	if a == nil || !a.live || a.Node.Ring().Empty() {
		return nil
	}
	pr := a.Node.Ring().Proto()
	if len(s.replays) < 50 {
		b, err := proto.AppendIPAMMsg(nil, &proto.IPAMMsg{Kind: proto.IPAMRing, Ring: pr})
		if err != nil {
			return err
		}
		s.replays = append(s.replays, b)
	}
	forge := func(f func(es []proto.RingEntry, sizes []uint64) []proto.RingEntry) ([]byte, error) {
		m := a.Node.Ring().Proto()
		_, sizes := a.Node.Ring().Entries()
		m.Entries = f(m.Entries, sizes)
		return proto.AppendIPAMMsg(nil, &proto.IPAMMsg{Kind: proto.IPAMRing, Ring: m})
	}
	atLimit, err := forge(func(es []proto.RingEntry, _ []uint64) []proto.RingEntry {
		for i := range es {
			es[i].Peer, es[i].Version = a.Name, proto.MaxRingVersion
		}
		return es
	})
	if err != nil {
		return err
	}
	bumped, err := forge(func(es []proto.RingEntry, _ []uint64) []proto.RingEntry {
		for i := range es {
			es[i].Peer, es[i].Version = a.Name, es[i].Version+1
		}
		return es
	})
	if err != nil {
		return err
	}
	split, err := forge(func(es []proto.RingEntry, sizes []uint64) []proto.RingEntry {
		var out []proto.RingEntry
		for i, e := range es {
			out = append(out, e)
			if sizes[i] > 1 && len(out) < proto.MaxRingEntries-1 {
				mid := e.Token + uint32(sizes[i]/2)
				out = append(out, proto.RingEntry{Token: mid, Peer: a.Name})
			}
		}
		return out
	})
	if err != nil {
		return err
	}
	for _, q := range s.Live() {
		if q == a || !s.reaches(a.Name, q.Name) {
			continue
		}
		s.Net.Send(a.Name, q.Name, atLimit)
		s.Net.Send(a.Name, q.Name, s.replays[s.rand.IntN(len(s.replays))])
		if !q.Node.Ring().Empty() {
			s.Net.Send(a.Name, q.Name, bumped)
			s.Net.Send(a.Name, q.Name, split)
		}
	}
	return nil
}

// Run steps n ticks, stopping at the first error.
func (s *Sim) Run(n int) error {
	for range n {
		if err := s.Step(); err != nil {
			return err
		}
	}
	return nil
}

// Check verifies what must hold at every step: each peer's own
// invariants; no address allocated on two live peers; no space that two
// live peers both believe they own and may allocate from.
func (s *Sim) Check() error {
	seen := map[netip.Addr]proto.PeerName{}
	var owned []ring.Span
	for _, p := range s.Live() {
		if err := p.Node.Check(); err != nil {
			return fmt.Errorf("%v: %w", p.Name, err)
		}
		for a := range p.Node.Allocations() {
			if other, ok := seen[a]; ok {
				return fmt.Errorf("%v allocated on both %v and %v", a, other, p.Name)
			}
			seen[a] = p.Name
		}
		owned = append(owned, p.Node.Usable()...)
	}
	slices.SortFunc(owned, func(a, b ring.Span) int { return cmp.Compare(a.Start, b.Start) })
	for i := 1; i < len(owned); i++ {
		if uint64(owned[i].Start) < owned[i-1].End {
			return fmt.Errorf("%v and %v both own %v", owned[i-1].Peer, owned[i].Peer, ipv4.Addr(owned[i].Start))
		}
	}
	return nil
}

// Converged reports whether every live peer holds the same ring.
func (s *Sim) Converged() error {
	live := s.Live()
	for _, p := range live[1:] {
		if !p.Node.Ring().Equal(live[0].Node.Ring()) {
			a, _ := live[0].Node.Ring().Entries()
			b, _ := p.Node.Ring().Entries()
			var diff []string
			for _, e := range a {
				if !slices.Contains(b, e) && len(diff) < 6 {
					diff = append(diff, fmt.Sprintf("%v has %v@%d v%d", live[0].Name, ipv4.Addr(e.Token), e.Peer, e.Version))
				}
			}
			for _, e := range b {
				if !slices.Contains(a, e) && len(diff) < 12 {
					diff = append(diff, fmt.Sprintf("%v has %v@%d v%d", p.Name, ipv4.Addr(e.Token), e.Peer, e.Version))
				}
			}
			return fmt.Errorf("%v and %v hold different rings: %s", live[0].Name, p.Name, strings.Join(diff, "; "))
		}
	}
	return nil
}
