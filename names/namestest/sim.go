// Package namestest runs many name stores in one process over a simulated
// network, on one goroutine from one seed, so that a failing schedule
// replays exactly. The network loses, duplicates, delays and reorders
// messages and can be partitioned; peers stop, restart from their last
// saved state or without it. The simulator keeps a model of the entries
// each peer registered itself, and Check verifies after every step what
// must always hold: each View is consistent with itself (Lookup and
// Reverse agree with Entries), each peer's own live entries match the
// model and its own entries the saved state, no peer holds live entries
// of an origin it has not reached for PurgeTicks, and none drops a live
// entry of an origin it reaches without a tombstone.
// Messages must
// decode, re-encode to the same bytes, respect MaxMsgBytes and be
// accepted. Converged verifies, once the network is
// healed and quiet, that every live peer holds the same live entries and
// that those are exactly what each live origin holds itself.
package namestest

import (
	"cmp"
	"crypto/ed25519"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"

	"github.com/overlayd/overlayd/internal/simnet"
	"github.com/overlayd/overlayd/names"
	"github.com/overlayd/overlayd/proto"
)

// Name is the peer name of peer i.
func Name(i int) proto.PeerName { return proto.PeerName(0x0e0000000000 + i) }

// Counts sum up what the simulation did, so that a schedule that does
// nothing shows.
type Counts struct {
	Adds, Refused, Deletes, Deleted    int // Refused: Add or Delete calls that returned an error; Deleted: entries
	Partitions, Heals, Stops, Restarts int // Restarts: from saved state
	Fresh                              int // restarts without state
	Gone                               int // messages lost because sender or receiver went away
	Entries, Digests, Summaries        int // delivered, by kind
	Forgeries                          int // messages the Adversary's Attack sent
	AdversaryRefused                   int // of the Adversary's messages, those refused whole
}

// Key identifies an entry as the store does: Weave's (hostname, origin,
// container, address), with the hostname in lower case.
type Key struct {
	Name   string
	Origin proto.PeerName
	ID     string
	Addr   netip.Addr
}

// KeyOf is the key of an entry.
func KeyOf(e *proto.NameEntry) Key {
	return Key{strings.ToLower(e.Hostname), e.Origin, e.ContainerID, e.Addr}
}

func (k Key) compare(o Key) int {
	return cmp.Or(strings.Compare(k.Name, o.Name), cmp.Compare(k.Origin, o.Origin),
		strings.Compare(k.ID, o.ID), k.Addr.Compare(o.Addr))
}

func (k Key) String() string { return fmt.Sprintf("%s %v %s @%v", k.Name, k.Addr, k.ID, k.Origin) }

// Sim is a simulated cluster of name stores. It is not safe for
// concurrent use.
type Sim struct {
	// Net carries the messages, a round at a time: set its Loss, Dup,
	// Delay and Reorder to make it unreliable.
	Net    *simnet.Net[message]
	Counts Counts
	// Sniff, if set, sees every message delivered, before the receiver.
	Sniff func(from, to proto.PeerName, m *proto.NamesMsg)
	// Signed turns on password mode's signed entries: each peer signs
	// with an Ed25519 key of its own (the same across restarts), and every
	// store knows every peer's key, as the topology tells it. Set it
	// before adding peers.
	Signed bool
	// Adversary is a peer whose refused messages are counted rather than
	// failing the run: see Attack.
	Adversary proto.PeerName

	rand    *rand.Rand
	peers   map[proto.PeerName]*Peer
	names   []proto.PeerName // every peer ever added, sorted
	ticks   int64
	retire  names.Stats // stats of stores that were stopped
	broken  error       // the first violation seen during an operation
	trace   []string
	scratch scratch
}

// Peer is one simulated overlayd's name store.
type Peer struct {
	Name  proto.PeerName
	Store *names.Store // nil while stopped
	cfg   names.Config
	state []byte      // last State from Ready
	view  *names.View // last View from Ready (or from New)
	live  bool
	inc   int   // incarnation: messages to or from an earlier one are lost
	ticks int64 // ticks of the current store
	// own is the model: the live entries this peer registered and has not
	// deleted, by key, with the hostname as last added.
	own    map[Key]string
	ownGen int // bumped when own changes
	// unreach is when (in the store's ticks) each other peer was last
	// told to be unreachable; absent while reachable.
	unreach map[proto.PeerName]int64

	// What Check last verified, so that it verifies a View once: the
	// view, the state and model it was checked with, and the origins of
	// its live entries (for the purge check, which depends on time).
	checked      *names.View
	checkedState []byte
	checkedGen   int
	origins      []proto.PeerName
	checkedLive  map[Key]bool
	expired      uint64 // Stats().Expired then
	// decoded is the saved state decodedFrom, decoded.
	decoded     []proto.NameEntry
	decodedFrom []byte
	// wasUnreach holds the peers it was told it cannot reach since Check
	// last looked at it.
	wasUnreach map[proto.PeerName]bool
}

// message is a message as the network carries it: with the incarnations
// of its sender and receiver, so that one for an earlier one is lost.
type message struct {
	fromInc, toInc int
	payload        []byte
}

// traceMax bounds the trace kept for failure reports.
const traceMax = 4000

// New makes an empty simulation.
func New(seed uint64) *Sim {
	r := rand.New(rand.NewPCG(seed, seed^0x6e616d6573))
	net := simnet.New[message](r)
	net.Latency = 1
	return &Sim{rand: r, Net: net, peers: map[proto.PeerName]*Peer{}}
}

// Rand is the simulation's random source, for schedules.
func (s *Sim) Rand() *rand.Rand { return s.rand }

// Ticks is the simulated time.
func (s *Sim) Ticks() int64 { return s.ticks }

// Tracef adds a line to the trace.
func (s *Sim) Tracef(format string, a ...any) {
	if len(s.trace) >= traceMax {
		s.trace = append(s.trace[:0], s.trace[traceMax/2:]...)
	}
	s.trace = append(s.trace, fmt.Sprintf("t=%d ", s.ticks)+fmt.Sprintf(format, a...))
}

// Trace is the end of the trace: operations, and what the stores logged.
func (s *Sim) Trace(lines int) string {
	return strings.Join(s.trace[max(0, len(s.trace)-lines):], "\n")
}

// AddPeer starts a new peer with no saved state; cfg's Self and Rand are
// filled in.
func (s *Sim) AddPeer(name proto.PeerName, cfg names.Config) error {
	if s.peers[name] != nil {
		return fmt.Errorf("namestest: %v added twice", name)
	}
	cfg.Self = name
	p := &Peer{Name: name, cfg: cfg}
	s.peers[name] = p
	s.names = append(s.names, name)
	slices.Sort(s.names)
	s.Tracef("add peer %v", name)
	return s.start(p)
}

func (s *Sim) start(p *Peer) error {
	cfg := p.cfg
	cfg.Rand = rand.New(rand.NewPCG(s.rand.Uint64(), s.rand.Uint64()))
	name := p.Name
	cfg.Infof = func(f string, a ...any) { s.Tracef("%v: "+f, append([]any{name}, a...)...) }
	if s.Signed {
		priv := signingKey(name)
		cfg.Sign = func(m []byte) [proto.NameSigLen]byte { return [proto.NameSigLen]byte(ed25519.Sign(priv, m)) }
		cfg.Verify = func(origin proto.PeerName, m []byte, sig [proto.NameSigLen]byte) bool {
			return ed25519.Verify(signingKey(origin).Public().(ed25519.PublicKey), m, sig[:])
		}
	}
	st, err := names.New(cfg, p.state)
	if err != nil {
		return fmt.Errorf("namestest: starting %v: %w", p.Name, err)
	}
	p.Store, p.live, p.ticks = st, true, 0
	p.inc++
	p.checked, p.checkedLive, p.expired = nil, nil, 0
	p.view = st.View()
	p.unreach = map[proto.PeerName]int64{}
	p.wasUnreach = map[proto.PeerName]bool{}
	if p.own == nil {
		p.own = map[Key]string{}
	}
	s.drain(p)
	s.tellReachability()
	return nil
}

// Stop stops a peer; its saved state stays.
func (s *Sim) Stop(name proto.PeerName) {
	p := s.peers[name]
	if p == nil || !p.live {
		return
	}
	s.retireStats(p)
	p.live, p.Store, p.view = false, nil, nil
	s.Counts.Stops++
	s.Tracef("stop %v", name)
	s.tellReachability()
}

func (s *Sim) retireStats(p *Peer) {
	st := p.Store.Stats()
	s.retire.Rejected += st.Rejected
	s.retire.Unknown += st.Unknown
	s.retire.Corrected += st.Corrected
	s.retire.Purged += st.Purged
	s.retire.Expired += st.Expired
	s.retire.Overflow += st.Overflow
	s.retire.Forged += st.Forged
}

// signingKey is peer name's Ed25519 key in signed mode.
func signingKey(name proto.PeerName) ed25519.PrivateKey {
	seed := make([]byte, ed25519.SeedSize)
	binary.BigEndian.PutUint64(seed, uint64(name))
	return ed25519.NewKeyFromSeed(seed)
}

// Attack has the Adversary, a live peer that holds the password but
// misbehaves, send every other live peer, for every live entry of the
// others it holds: a tombstone at a higher version signed with its own
// key, the same tombstone with the live entry's signature (tampered), the
// same unsigned, and the name pointed at another address under the
// origin's name, signed with its own key.
func (s *Sim) Attack() {
	a := s.peers[s.Adversary]
	if a == nil || !a.live {
		return
	}
	own := signingKey(a.Name)
	sign := func(e proto.NameEntry) proto.NameEntry {
		msg, err := proto.NameSigned(&e)
		if err == nil {
			e.Sig = [proto.NameSigLen]byte(ed25519.Sign(own, msg))
		}
		return e
	}
	var signed, unsigned []proto.NameEntry
	live := a.LiveEntries()
	for _, k := range slices.SortedFunc(maps.Keys(live), Key.compare) {
		e := live[k]
		if e.Origin == a.Name || e.Version+2 >= proto.MaxNameVersion {
			continue
		}
		tomb := e
		tomb.Version++
		tomb.Tombstone = true
		tampered := tomb // e's signature
		moved := e
		moved.Version++
		moved.Addr = netip.AddrFrom4([4]byte{192, 0, 2, byte(s.rand.IntN(256))})
		signed = append(signed, sign(tomb), tampered, sign(moved))
		tomb.Sig = [proto.NameSigLen]byte{}
		unsigned = append(unsigned, tomb)
	}
	for _, m := range []proto.NamesMsg{{Kind: proto.NamesSignedEntries, Entries: signed}, {Kind: proto.NamesEntries, Entries: unsigned}} {
		if len(m.Entries) == 0 || len(m.Entries) > proto.MaxNameEntries {
			continue
		}
		b, err := proto.AppendNamesMsg(nil, &m)
		if err != nil {
			s.fail("the adversary's message does not encode: %v", err)
			return
		}
		for _, q := range s.Live() {
			if q != a && s.Reaches(a.Name, q.Name) {
				s.Net.Send(a.Name, q.Name, message{a.inc, q.inc, b})
				s.Counts.Forgeries++
			}
		}
	}
}

// Restart starts a stopped peer again from its last saved state.
func (s *Sim) Restart(name proto.PeerName) error {
	p := s.peers[name]
	if p == nil || p.live {
		return fmt.Errorf("namestest: %v is not stopped", name)
	}
	s.Counts.Restarts++
	s.Tracef("restart %v from %d bytes of state", name, len(p.state))
	return s.start(p)
}

// RestartFresh starts a stopped peer again without its saved state, as
// after losing its disk: it has forgotten every entry it made.
func (s *Sim) RestartFresh(name proto.PeerName) error {
	p := s.peers[name]
	if p == nil || p.live {
		return fmt.Errorf("namestest: %v is not stopped", name)
	}
	p.state = nil
	clear(p.own)
	p.ownGen++
	s.Counts.Fresh++
	s.Tracef("restart %v without state", name)
	return s.start(p)
}

// Peer returns a peer, live or not.
func (s *Sim) Peer(name proto.PeerName) *Peer { return s.peers[name] }

// Live reports whether the peer runs.
func (p *Peer) Live() bool { return p.live }

// Live returns the live peers, by name.
func (s *Sim) Live() []*Peer {
	var out []*Peer
	for _, name := range s.names {
		if p := s.peers[name]; p.live {
			out = append(out, p)
		}
	}
	return out
}

// Partition splits the network into groups; f gives each peer's group.
func (s *Sim) Partition(f func(proto.PeerName) int) {
	s.Net.Partition(s.names, f)
	s.Counts.Partitions++
	groups := map[proto.PeerName]int{}
	for _, name := range s.names {
		groups[name] = s.Net.Group(name)
	}
	s.Tracef("partition %v", groups)
	s.tellReachability()
}

// Heal joins the network again.
func (s *Sim) Heal() {
	if !s.Net.Partitioned() {
		return
	}
	s.Net.Heal()
	s.Counts.Heals++
	s.Tracef("heal")
	s.tellReachability()
}

// Partitioned reports whether the network is split.
func (s *Sim) Partitioned() bool { return s.Net.Partitioned() }

// Reaches reports whether a and b are both live and on the same side.
func (s *Sim) Reaches(a, b proto.PeerName) bool {
	pa, pb := s.peers[a], s.peers[b]
	return pa != nil && pb != nil && pa.live && pb.live && s.Net.Reaches(a, b)
}

// tellReachability tells every live peer whom it reaches (itself
// included: the store must ignore it).
func (s *Sim) tellReachability() {
	for _, p := range s.Live() {
		var reach []proto.PeerName
		for _, q := range s.Live() {
			if s.Reaches(p.Name, q.Name) {
				reach = append(reach, q.Name)
			}
		}
		p.Store.SetReachable(reach)
		for _, name := range s.names {
			_, was := p.unreach[name]
			switch {
			case name == p.Name || slices.Contains(reach, name):
				delete(p.unreach, name)
			case !was:
				p.unreach[name] = p.ticks
				p.wasUnreach[name] = true
			}
		}
		s.drain(p)
	}
}

// fail records the first violation seen during an operation.
func (s *Sim) fail(format string, a ...any) {
	err := fmt.Errorf("t=%d "+format, append([]any{s.ticks}, a...)...)
	s.Tracef("FAIL %v", err)
	if s.broken == nil {
		s.broken = err
	}
}

// FQDN is the simulator's own idea of the name a hostname is stored
// under: a single label gets the domain, others their trailing dot.
func FQDN(hostname, domain string) string {
	switch {
	case !strings.Contains(hostname, "."):
		return hostname + "." + domain
	case !strings.HasSuffix(hostname, "."):
		return hostname + "."
	}
	return hostname
}

// Add registers a name at a live peer and updates the model. A refused
// Add must leave the store unchanged.
func (s *Sim) Add(name proto.PeerName, hostname string, addr netip.Addr, id string) (proto.NameEntry, error) {
	p := s.peers[name]
	if p == nil || !p.live {
		return proto.NameEntry{}, fmt.Errorf("namestest: %v is not live", name)
	}
	e, err := p.Store.Add(hostname, addr, id)
	s.Tracef("%v: add %q %v %q: %v", name, hostname, addr, id, err)
	if err != nil {
		s.Counts.Refused++
		if rd := p.Store.Ready(); !rd.Empty() {
			s.fail("%v: refused Add(%q) left work in Ready", name, hostname)
		}
		return e, err
	}
	s.Counts.Adds++
	want := FQDN(hostname, p.Store.Domain())
	if id == "" {
		id = names.ExternID
	}
	k := KeyOf(&e)
	switch {
	case e.Origin != name || e.Tombstone || e.Addr != addr || e.ContainerID != id:
		s.fail("%v: Add(%q, %v, %q) returned %+v", name, hostname, addr, id, e)
	case e.Hostname != want:
		s.fail("%v: Add(%q) stored %q, want %q", name, hostname, e.Hostname, want)
	}
	p.own[k] = e.Hostname
	p.ownGen++
	s.drain(p)
	return e, nil
}

// Delete deletes a peer's entries and checks that exactly those the model
// expects went.
func (s *Sim) Delete(name proto.PeerName, hostname string, addr netip.Addr, id string) ([]proto.NameEntry, error) {
	p := s.peers[name]
	if p == nil || !p.live {
		return nil, fmt.Errorf("namestest: %v is not live", name)
	}
	es, err := p.Store.Delete(hostname, addr, id)
	s.Tracef("%v: delete %q %v %q: %d deleted, %v", name, hostname, addr, id, len(es), err)
	if err != nil {
		s.Counts.Refused++
		if rd := p.Store.Ready(); !rd.Empty() || len(es) > 0 {
			s.fail("%v: refused Delete(%q) changed something", name, hostname)
		}
		return es, err
	}
	s.Counts.Deletes++
	s.Counts.Deleted += len(es)
	lower := ""
	if hostname != "" {
		lower = strings.ToLower(FQDN(hostname, p.Store.Domain()))
	}
	want := map[Key]bool{}
	for k := range p.own {
		if (lower == "" || k.Name == lower) && (!addr.IsValid() || k.Addr == addr) && (id == "" || k.ID == id) {
			want[k] = true
		}
	}
	for _, e := range es {
		k := KeyOf(&e)
		if !want[k] || !e.Tombstone || e.Origin != name {
			s.fail("%v: Delete(%q, %v, %q) deleted %+v, which the model did not expect", name, hostname, addr, id, e)
		}
		delete(want, k)
		delete(p.own, k)
		p.ownGen++
	}
	for k := range want {
		s.fail("%v: Delete(%q, %v, %q) left %v", name, hostname, addr, id, k)
	}
	s.drain(p)
	return es, nil
}

// drain carries out a peer's Ready: keeps State and View, queues Msgs.
func (s *Sim) drain(p *Peer) {
	rd := p.Store.Ready()
	if rd.Empty() {
		return
	}
	if rd.State != nil {
		p.state = rd.State
	}
	if rd.View != nil {
		p.view = rd.View
	}
	limit := p.cfg.MaxMsgBytes
	if limit <= 0 {
		limit = 16384
	}
	for _, m := range rd.Msgs {
		if m.To == p.Name {
			s.fail("%v sent a message to itself", p.Name)
			continue
		}
		if len(m.Payload) > limit && (m.Payload[0] == byte(proto.NamesEntries) || m.Payload[0] == byte(proto.NamesSignedEntries)) &&
			int(m.Payload[1])<<8|int(m.Payload[2]) > 1 {
			s.fail("%v sent %d bytes, above MaxMsgBytes %d", p.Name, len(m.Payload), limit)
		}
		for _, q := range s.Live() {
			if q != p && (m.To == q.Name || m.To == 0 && s.Reaches(p.Name, q.Name)) {
				s.Net.Send(p.Name, q.Name, message{p.inc, q.inc, m.Payload})
			}
		}
	}
	p.Store.Advance()
	if rd := p.Store.Ready(); !rd.Empty() {
		s.fail("%v: Ready not empty after Advance", p.Name)
	}
}

// Deliver delivers, once, every message queued: subject to the network,
// and only while sender and receiver are the incarnations they were and
// reach each other. What the receivers send in turn waits for the next
// round.
func (s *Sim) Deliver() error {
	s.Net.Advance()
	for _, d := range s.Net.Due() {
		from, to := s.peers[d.From], s.peers[d.To]
		if !s.Reaches(d.From, d.To) || from.inc != d.Msg.fromInc || to.inc != d.Msg.toInc {
			s.Counts.Gone++
			continue
		}
		if err := s.deliver(d); err != nil {
			return err
		}
	}
	return s.broken
}

func (s *Sim) deliver(d simnet.Delivery[message]) error {
	p := s.peers[d.To]
	m, err := proto.ParseNamesMsg(d.Msg.payload)
	if err != nil {
		return fmt.Errorf("t=%d %v sent %v an undecodable message: %w", s.ticks, d.From, d.To, err)
	}
	if b, err := proto.AppendNamesMsg(nil, &m); err != nil || string(b) != string(d.Msg.payload) {
		return fmt.Errorf("t=%d %v sent %v a message that does not re-encode to itself (%v)", s.ticks, d.From, d.To, err)
	}
	switch m.Kind {
	case proto.NamesEntries, proto.NamesSignedEntries:
		s.Counts.Entries++
	case proto.NamesDigest:
		s.Counts.Digests++
	case proto.NamesSummary:
		s.Counts.Summaries++
	}
	if s.Sniff != nil {
		s.Sniff(d.From, d.To, &m)
	}
	if err := p.Store.Step(d.From, &m); err != nil {
		if d.From == s.Adversary && s.Adversary != 0 {
			s.Counts.AdversaryRefused++
			s.drain(p)
			return nil
		}
		return fmt.Errorf("t=%d %v refused a message from %v: %w", s.ticks, d.To, d.From, err)
	}
	s.drain(p)
	return nil
}

// Queued is the number of messages waiting for delivery.
func (s *Sim) Queued() int { return s.Net.Len() }

// Flush delivers rounds until nothing is queued.
func (s *Sim) Flush() error {
	for range 200 {
		if s.Net.Len() == 0 {
			return s.broken
		}
		if err := s.Deliver(); err != nil {
			return err
		}
	}
	return fmt.Errorf("t=%d namestest: still %d messages queued after 200 rounds", s.ticks, s.Net.Len())
}

// Tick ticks every live peer once.
func (s *Sim) Tick() error {
	s.ticks++
	for _, p := range s.Live() {
		p.Store.Tick()
		p.ticks++
		s.drain(p)
	}
	return s.broken
}

// Step delivers one round and then ticks every live peer.
func (s *Sim) Step() error {
	if err := s.Deliver(); err != nil {
		return err
	}
	return s.Tick()
}

// Settle runs n ticks, each followed by delivery until quiet.
func (s *Sim) Settle(n int) error {
	for range n {
		if err := s.Tick(); err != nil {
			return err
		}
		if err := s.Flush(); err != nil {
			return err
		}
	}
	return nil
}

// Stats sums the stores' counters, of stopped incarnations too.
func (s *Sim) Stats() names.Stats {
	t := s.retire
	for _, p := range s.Live() {
		st := p.Store.Stats()
		t.Rejected += st.Rejected
		t.Unknown += st.Unknown
		t.Corrected += st.Corrected
		t.Purged += st.Purged
		t.Expired += st.Expired
		t.Overflow += st.Overflow
		t.Forged += st.Forged
		t.NotOrigin += st.NotOrigin
	}
	return t
}

// LiveEntries are the live entries of a peer's current View, by key.
func (p *Peer) LiveEntries() map[Key]proto.NameEntry {
	out := map[Key]proto.NameEntry{}
	if p.Store == nil {
		return out
	}
	for _, e := range p.Store.View().Entries() {
		if !e.Tombstone {
			out[KeyOf(&e)] = e
		}
	}
	return out
}

// Own is the model of a peer's own live entries: key and hostname.
func (p *Peer) Own() map[Key]string { return maps.Clone(p.own) }

// Check verifies what must hold after every step, on every live peer.
func (s *Sim) Check() error {
	if s.broken != nil {
		return s.broken
	}
	for _, p := range s.Live() {
		if err := s.checkPeer(p); err != nil {
			return fmt.Errorf("t=%d %v: %w", s.ticks, p.Name, err)
		}
	}
	return nil
}

func (s *Sim) checkPeer(p *Peer) error {
	v := p.Store.View()
	if v != p.view {
		return errors.New("the View changed without appearing in Ready")
	}
	if v != p.checked || !sameBytes(p.state, p.checkedState) || p.ownGen != p.checkedGen {
		sc := &s.scratch
		if err := s.checkView(p, v, sc); err != nil {
			return err
		}
		// A live entry goes by a tombstone (which may come and expire
		// between two looks), or when its origin has been out of reach
		// for PurgeTicks; never silently while its origin is reached.
		expired := p.Store.Stats().Expired
		var gone []Key
		for k := range p.checkedLive {
			if _, ok := sc.held[k]; !ok && k.Origin != p.Name && !p.unreachable(k.Origin) && !p.wasUnreach[k.Origin] {
				gone = append(gone, k)
			}
		}
		if uint64(len(gone)) > expired-p.expired {
			slices.SortFunc(gone, Key.compare)
			return fmt.Errorf("dropped %d live entries of origins it reaches (%v first), though only %d tombstones expired",
				len(gone), gone[0], expired-p.expired)
		}
		p.expired = expired
		p.checked, p.checkedState, p.checkedGen = v, p.state, p.ownGen
		if p.checkedLive == nil {
			p.checkedLive = map[Key]bool{}
		}
		clear(p.checkedLive)
		p.origins = p.origins[:0]
		for k, live := range sc.held {
			if live {
				p.checkedLive[k] = true
				if !slices.Contains(p.origins, k.Origin) {
					p.origins = append(p.origins, k.Origin)
				}
			}
		}
	}
	clear(p.wasUnreach)
	for _, o := range p.origins {
		if since, ok := p.unreach[o]; ok && p.ticks-since >= int64(purgeTicks(p.cfg)) {
			return fmt.Errorf("holds live entries of %v, which it has not reached for %d ticks", o, p.ticks-since)
		}
	}
	return nil
}

// unreachable reports whether the peer was told it cannot reach name.
func (p *Peer) unreachable(name proto.PeerName) bool {
	_, ok := p.unreach[name]
	return ok
}

// sameBytes reports whether a and b are the same slice.
func sameBytes(a, b []byte) bool {
	return len(a) == len(b) && (len(a) == 0 || &a[0] == &b[0])
}

// scratch holds the maps checkView fills, kept from one call to the next
// so that checking does not dominate the simulation.
type scratch struct {
	held    map[Key]bool                // every entry: live or not
	byName  map[string][]netip.Addr     // lower-case names of live entries: distinct addresses
	reverse map[netip.Addr]reverseEntry // every address
	own     map[Key]proto.NameEntry     // our live entries
	ownAll  map[Key]proto.NameEntry     // ours, tombstones too, without ages
}

type reverseEntry struct {
	hostname string // of the first live entry, in entry order
	live     bool
}

func (sc *scratch) reset() {
	if sc.held == nil {
		*sc = scratch{held: map[Key]bool{}, byName: map[string][]netip.Addr{},
			reverse: map[netip.Addr]reverseEntry{}, own: map[Key]proto.NameEntry{}, ownAll: map[Key]proto.NameEntry{}}
	}
	clear(sc.held)
	clear(sc.byName)
	clear(sc.reverse)
	clear(sc.own)
	clear(sc.ownAll)
}

// checkView checks a View against itself, and the peer's own entries
// against the model and the saved state. It leaves its findings in sc.
func (s *Sim) checkView(p *Peer, v *names.View, sc *scratch) error {
	if v.Domain() != p.Store.Domain() {
		return fmt.Errorf("view domain %q, store domain %q", v.Domain(), p.Store.Domain())
	}
	sc.reset()
	es := p.Store.Entries() // tombstones too
	if ves := v.Entries(); !slices.EqualFunc(ves, slices.DeleteFunc(slices.Clone(es), func(e proto.NameEntry) bool { return e.Tombstone }),
		func(a, b proto.NameEntry) bool { return a == b }) {
		return fmt.Errorf("the View lists %d entries, not the %d live ones held", len(ves), len(es))
	}
	all, local := 0, 0
	var prev Key
	for i := range es {
		e := &es[i]
		k := KeyOf(e)
		if i > 0 && prev.compare(k) >= 0 {
			return fmt.Errorf("entries out of order or repeated: %v then %v", prev, k)
		}
		prev = k
		if s.peers[e.Origin] == nil {
			return fmt.Errorf("entry %v of a peer that never existed", k)
		}
		if !strings.HasSuffix(k.Name, "."+v.Domain()) {
			return fmt.Errorf("entry %v outside the domain", k)
		}
		if e.AgeMillis != 0 && !e.Tombstone {
			return fmt.Errorf("live entry %v with an age", k)
		}
		sc.held[k] = !e.Tombstone
		if e.Origin == p.Name {
			o := *e
			o.AgeMillis = 0
			sc.ownAll[k] = o
		}
		r := sc.reverse[e.Addr]
		if e.Tombstone {
			sc.reverse[e.Addr] = r
			if _, ok := sc.byName[k.Name]; !ok {
				sc.byName[k.Name] = nil
			}
			continue
		}
		all++
		if e.Origin == p.Name {
			local++
			sc.own[k] = *e
		}
		if as := sc.byName[k.Name]; !slices.Contains(as, e.Addr) {
			sc.byName[k.Name] = append(as, e.Addr)
		}
		if !r.live {
			sc.reverse[e.Addr] = reverseEntry{e.Hostname, true}
		}
	}
	if a, l := v.Live(); a != all || l != local {
		return fmt.Errorf("Live() = %d, %d; entries have %d, %d", a, l, all, local)
	}
	for name, want := range sc.byName {
		for _, q := range []string{name, strings.ToUpper(name)} {
			if got := v.Lookup(q); !sameAddrs(got, want) {
				return fmt.Errorf("Lookup(%q) = %v, entries have %v", q, got, want)
			}
		}
	}
	for a, want := range sc.reverse {
		if h, ok := v.Reverse(a); ok != want.live || h != want.hostname {
			return fmt.Errorf("Reverse(%v) = %q, %v; entries have %q, %v", a, h, ok, want.hostname, want.live)
		}
	}
	if got := v.Lookup("never-registered." + v.Domain()); got != nil {
		return fmt.Errorf("Lookup of a name never registered = %v", got)
	}
	// The origin is the authority: its own live entries are what it
	// registered.
	for k, h := range p.own {
		if e, ok := sc.own[k]; !ok || e.Hostname != h {
			return fmt.Errorf("registered %v as %q; its view has %+v", k, h, e)
		}
	}
	for k := range sc.own {
		if _, ok := p.own[k]; !ok {
			return fmt.Errorf("holds %v live, which it did not register or deleted", k)
		}
	}
	if p.state == nil {
		if len(sc.ownAll) > 0 {
			return errors.New("has entries of its own but saved no state")
		}
		return nil
	}
	if !sameBytes(p.state, p.decodedFrom) {
		saved, err := names.DecodeState(p.state)
		if err != nil {
			return fmt.Errorf("saved state: %w", err)
		}
		p.decoded, p.decodedFrom = saved, p.state
	}
	// The entries held, tombstones too: our own are the saved state (ages aside, which grow, and signatures, made again at
	// load).
	for _, e := range p.decoded {
		if e.Origin != p.Name {
			return fmt.Errorf("saved state holds %v of another peer", KeyOf(&e))
		}
		e.AgeMillis = 0
		o, ok := sc.ownAll[KeyOf(&e)]
		o.Sig = [proto.NameSigLen]byte{}
		if !ok || o != e {
			return fmt.Errorf("saved state holds %+v, its view %+v", e, o)
		}
	}
	if len(p.decoded) != len(sc.ownAll) {
		return fmt.Errorf("saved state holds %d entries, its view %d of ours", len(p.decoded), len(sc.ownAll))
	}
	return nil
}

// purgeTicks is the PurgeTicks a store runs with.
func purgeTicks(cfg names.Config) int {
	if cfg.PurgeTicks <= 0 {
		return 10
	}
	return cfg.PurgeTicks
}

// sameAddrs reports whether got holds the addresses want holds (distinct),
// each once.
func sameAddrs(got, want []netip.Addr) bool {
	if len(got) != len(want) {
		return false
	}
	for i, a := range got {
		if !slices.Contains(want, a) || slices.Contains(got[:i], a) {
			return false
		}
	}
	return true
}

// Converged verifies that every live peer holds the same live entries,
// at the same versions, and that they are exactly the union of what each
// live origin holds live itself: nothing of a stopped peer, nothing an
// origin deleted or forgot.
func (s *Sim) Converged() error {
	live := s.Live()
	if len(live) == 0 {
		return nil
	}
	want := map[Key]proto.NameEntry{}
	for _, p := range live {
		for k, e := range p.LiveEntries() {
			if k.Origin == p.Name {
				want[k] = e
			}
		}
	}
	for _, p := range live {
		got := p.LiveEntries()
		var diffs []string
		for _, k := range slices.SortedFunc(maps.Keys(got), Key.compare) {
			w, ok := want[k]
			switch o := s.peers[k.Origin]; {
			case !o.live:
				diffs = append(diffs, fmt.Sprintf("holds %v (v%d) of stopped %v", k, got[k].Version, k.Origin))
			case !ok:
				diffs = append(diffs, fmt.Sprintf("holds %v (v%d), which its origin does not", k, got[k].Version))
			case w != got[k]:
				diffs = append(diffs, fmt.Sprintf("holds %+v, its origin %+v", got[k], w))
			}
		}
		for _, k := range slices.SortedFunc(maps.Keys(want), Key.compare) {
			if _, ok := got[k]; !ok {
				diffs = append(diffs, fmt.Sprintf("lacks %v (v%d)", k, want[k].Version))
			}
		}
		if len(diffs) > 0 {
			if len(diffs) > 8 {
				diffs = append(diffs[:8], fmt.Sprintf("and %d more", len(diffs)-8))
			}
			return fmt.Errorf("t=%d %v has not converged:\n\t%s", s.ticks, p.Name, strings.Join(diffs, "\n\t"))
		}
	}
	return nil
}
