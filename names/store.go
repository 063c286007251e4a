// Package names is the name store's core: WeaveDNS entries (hostname,
// address, container ID, origin peer, version, tombstone) merged as a CRDT
// (WEAVE.md §2). It is a deterministic state machine with no goroutines,
// clocks or sockets. Local changes arrive through Add and Delete, peer
// messages through Step, the peers the router can reach through
// SetReachable, and time through Tick; messages to send, state to save and
// a new View collect in Ready until the caller acknowledges them with
// Advance. A Store is not safe for concurrent use.
//
// The rules:
//   - only the origin peer changes its entries (add, resurrect, tombstone),
//     and every change bumps the version; an entry is taken only if its
//     origin signed it (password mode) or, without signatures, sent it;
//     anti-entropy then asks an origin whose entries differ to compare
//     with us, rather than passing its entries on;
//   - on merge the higher version wins; at equal versions a tombstone wins,
//     then the greater hostname bytes (the same on every peer);
//   - an entry that claims our origin but disagrees with ours is answered
//     with ours at a higher version; one we never made is tombstoned. The
//     origin is the authority on its own entries;
//   - entries of a peer that the router cannot reach for PurgeTicks are
//     deleted outright; when it comes back they return by gossip;
//   - tombstones expire TombstoneTicks after they were made, as far as the
//     holder knows: each message carries a tombstone's age in
//     milliseconds, a duration, so no two hosts' clocks are ever compared.
//
// Changes are sent at once to every reachable peer. Every DigestTicks a
// summary (one hash of every origin's hash) goes to Fanout random peers; a
// peer whose summary differs answers with its digest (a hash per origin),
// and each side then sends the entries of the origins whose hashes differ
// (anti-entropy), in messages of at most MaxMsgBytes.
package names

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"

	"github.com/overlayd/overlayd/proto"
)

// DefaultDomain is Weave's domain.
const DefaultDomain = "weave.local."

// ExternID is the container ID of an entry added without a container
// (Weave's weave:extern).
const ExternID = "weave:extern"

// Config configures a Store. Zero values of the tick counts mean their
// defaults.
type Config struct {
	Self   proto.PeerName
	Domain string     // served domain, lower case with its trailing dot; "" is DefaultDomain
	Rand   *rand.Rand // anti-entropy partners; required

	TickMillis     int // 100: the length of a tick, to turn tombstone ages into seconds
	DigestTicks    int // 10: between digests to random peers
	Fanout         int // 2: peers a digest goes to
	PurgeTicks     int // 10: an unreachable origin's entries go after this long
	TombstoneTicks int // 18000 (30 min at 100 ms): a tombstone's lifetime
	MaxMsgBytes    int // 16384: entries are sent in messages of at most this size
	// MaxOriginEntries bounds the entries (tombstones too) held of one
	// origin, ours included: 65536 when zero.
	MaxOriginEntries int

	// Sign and Verify, set together, turn on signed entries (password
	// mode): ours are signed with Sign and sent as kind 4, an entry of any
	// origin is taken only if Verify says its origin signed it (false for
	// an origin whose key is not known yet: it comes again by
	// anti-entropy), and unsigned entries are refused.
	Sign   func(msg []byte) [proto.NameSigLen]byte
	Verify func(origin proto.PeerName, msg []byte, sig [proto.NameSigLen]byte) bool

	// TrustRelays, without signatures, takes an entry from any peer, as
	// Weave did, rather than only from its origin (a peer that is not
	// the origin cannot then replace or tombstone its names). Anti-entropy
	// passes on every origin's entries instead of asking the origins.
	TrustRelays bool

	Infof func(format string, a ...any) // optional; must not block
}

func (c *Config) validate() error {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&c.TickMillis, 100)
	def(&c.DigestTicks, 10)
	def(&c.Fanout, 2)
	def(&c.PurgeTicks, 10)
	def(&c.TombstoneTicks, 30*60*1000/c.TickMillis)
	def(&c.MaxMsgBytes, 16384)
	def(&c.MaxOriginEntries, 1<<16)
	if c.Domain == "" {
		c.Domain = DefaultDomain
	}
	d, err := CheckDomain(c.Domain)
	if err != nil {
		return err
	}
	c.Domain = d
	switch {
	case c.Self == 0:
		return errors.New("names: no peer name")
	case c.Rand == nil:
		return errors.New("names: no random source")
	case c.MaxMsgBytes < 1024:
		return fmt.Errorf("names: MaxMsgBytes %d is below 1024", c.MaxMsgBytes)
	case (c.Sign == nil) != (c.Verify == nil):
		return errors.New("names: Sign and Verify go together")
	}
	if c.Infof == nil {
		c.Infof = func(string, ...any) {}
	}
	return nil
}

// key identifies an entry: Weave's (hostname, origin, container, address),
// with the hostname in lower case.
type key struct {
	name   string
	origin proto.PeerName
	id     string
	addr   netip.Addr
}

func keyOf(e *proto.NameEntry) key {
	return key{strings.ToLower(e.Hostname), e.Origin, e.ContainerID, e.Addr}
}

func (k key) compare(o key) int {
	return cmp.Or(strings.Compare(k.name, o.name), cmp.Compare(k.origin, o.origin),
		strings.Compare(k.id, o.id), k.addr.Compare(o.addr))
}

// record is an entry as held here.
type record struct {
	proto.NameEntry
	// died is the tick at which the tombstone was made, on our clock:
	// the tick of receipt minus the age the sender reported. Unused while
	// the entry is live.
	died int64
}

// origin holds the entries of one peer and the hash of all of them.
type origin struct {
	entries map[key]*record
	// hash is the sum of the entries' hashes, so that it changes in O(1)
	// and does not depend on order; two peers with the same entries of
	// this origin have the same hash.
	hash uint64
}

// Msg is a message to send: to one peer, or to every reachable peer when
// To is zero.
type Msg struct {
	To      proto.PeerName
	Payload []byte
}

// Ready is the work produced since the last Advance.
type Ready struct {
	Msgs []Msg
	// State is the encoded local entries when they changed (nil
	// otherwise); it should be saved so that a restart keeps them.
	State []byte
	// View is the new lookup view when the live entries changed.
	View *View
}

// Empty reports whether there is nothing to do.
func (r *Ready) Empty() bool { return len(r.Msgs) == 0 && r.State == nil && r.View == nil }

// Stats count what the store did.
type Stats struct {
	Rejected  uint64 // messages refused
	Unknown   uint64 // entries dropped because their origin was unreachable
	Corrected uint64 // entries of ours that a peer held wrongly, answered
	Purged    uint64 // entries deleted because their origin went away
	Expired   uint64 // tombstones dropped
	Overflow  uint64 // new entries dropped because their origin holds MaxOriginEntries
	Forged    uint64 // entries refused in signed mode: not signed by their origin (or its key is not known yet)
	NotOrigin uint64 // entries refused in plaintext mode: sent by another peer than their origin
}

// Store holds the entries. Make one with New.
type Store struct {
	cfg     Config
	tick    int64
	origins map[proto.PeerName]*origin
	reach   map[proto.PeerName]bool
	gone    map[proto.PeerName]int64 // unreachable origins we hold entries of: since when

	ready        Ready
	stateChanged bool
	viewChanged  bool
	view         *View
	stats        Stats
	asked        map[proto.PeerName]int64 // plaintext: when an origin may next be asked to compare digests
}

// New makes a Store with the local entries of a saved state, if any.
func New(cfg Config, state []byte) (*Store, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	s := &Store{cfg: cfg, origins: map[proto.PeerName]*origin{}, reach: map[proto.PeerName]bool{},
		gone: map[proto.PeerName]int64{}, asked: map[proto.PeerName]int64{}}
	if state != nil {
		es, err := DecodeState(state)
		if err != nil {
			return nil, err
		}
		for i := range es {
			e := es[i]
			if e.Origin != cfg.Self {
				return nil, fmt.Errorf("names: saved entry %s of another peer %v", e.Hostname, e.Origin)
			}
			if err := s.checkEntry(&e); err != nil {
				s.cfg.Infof("Dropping saved entry %s %v %s: %v", e.Hostname, e.Addr, e.ContainerID, err)
				continue
			}
			s.put(&record{NameEntry: e, died: -s.ageTicks(e.AgeMillis)})
		}
	}
	s.view = s.buildView()
	return s, nil
}

// Domain is the served domain, lower case with its trailing dot.
func (s *Store) Domain() string { return s.cfg.Domain }

// Stats returns the counters.
func (s *Store) Stats() Stats { return s.stats }

// View is the current lookup view; it is immutable.
func (s *Store) View() *View {
	if s.viewChanged {
		s.view = s.buildView()
		s.viewChanged = false
		s.ready.View = s.view
	}
	return s.view
}

// Ready returns the work produced since the last Advance.
func (s *Store) Ready() Ready {
	if s.stateChanged && s.ready.State == nil {
		s.ready.State = s.EncodeState()
	}
	s.View()
	return s.ready
}

// Advance tells the store that the caller has acted on Ready.
func (s *Store) Advance() {
	s.ready = Ready{}
	s.stateChanged = false
}

// DomainError refuses a name outside the served domain; its text is
// Weave's.
type DomainError struct {
	FQDN, ID, Domain string
	Addr             netip.Addr
}

func (e *DomainError) Error() string {
	return fmt.Sprintf("Ignoring registration %s %v %s (not a subdomain of %s)", e.FQDN, e.Addr, e.ID, e.Domain)
}

// Add registers hostname for addr and container id (ExternID when empty)
// at this peer. A single-label hostname gets the domain; others must be
// below the domain. Adding a deleted entry resurrects it. It returns the
// entry as stored.
func (s *Store) Add(hostname string, addr netip.Addr, id string) (proto.NameEntry, error) {
	if id == "" {
		id = ExternID
	}
	if err := checkID(id); err != nil {
		return proto.NameEntry{}, err
	}
	if !addr.Is4() {
		return proto.NameEntry{}, fmt.Errorf("names: %v is not an IPv4 address", addr)
	}
	fqdn, err := s.FQDN(hostname)
	if errors.Is(err, ErrOutside) {
		return proto.NameEntry{}, &DomainError{FQDN: fqdn, Addr: addr, ID: id, Domain: s.cfg.Domain}
	}
	if err != nil {
		return proto.NameEntry{}, err
	}
	e := proto.NameEntry{Hostname: fqdn, Addr: addr, ContainerID: id, Origin: s.cfg.Self}
	k := keyOf(&e)
	r := s.get(k)
	if r == nil && s.full(s.cfg.Self) {
		return proto.NameEntry{}, fmt.Errorf("names: this peer holds %d entries, the most it may", s.cfg.MaxOriginEntries)
	}
	if r != nil {
		if !r.Tombstone && r.Hostname == fqdn {
			return r.NameEntry, nil
		}
		if r.Version >= proto.MaxNameVersion {
			return r.NameEntry, fmt.Errorf("names: %s has changed too often", fqdn)
		}
		e.Version = r.Version + 1
	}
	r = &record{NameEntry: e}
	s.put(r) // signs it, in password mode
	e = r.NameEntry
	s.broadcast([]proto.NameEntry{e})
	s.cfg.Infof("Registered %s %v %s", fqdn, addr, id)
	return e, nil
}

// Delete tombstones the live entries of this peer that match: hostname
// ("" for any; a single label gets the domain), address (invalid for any)
// and container id ("" for any). It returns the entries deleted.
func (s *Store) Delete(hostname string, addr netip.Addr, id string) ([]proto.NameEntry, error) {
	var lower string
	if hostname != "" {
		fqdn, err := s.FQDN(hostname)
		if err != nil {
			return nil, err
		}
		lower = strings.ToLower(fqdn)
	}
	o := s.origins[s.cfg.Self]
	if o == nil {
		return nil, nil
	}
	var out []proto.NameEntry
	for _, k := range sortedKeys(o.entries) {
		r := o.entries[k]
		if r.Tombstone || (lower != "" && k.name != lower) || (addr.IsValid() && k.addr != addr) || (id != "" && k.id != id) {
			continue
		}
		if r.Version >= proto.MaxNameVersion {
			continue
		}
		n := &record{NameEntry: r.NameEntry, died: s.tick}
		n.Version++
		n.Tombstone = true
		s.put(n)
		out = append(out, n.NameEntry)
		s.cfg.Infof("Deleted %s %v %s", n.Hostname, n.Addr, n.ContainerID)
	}
	s.broadcast(out)
	return out, nil
}

// SetReachable tells the store which peers the router can reach now.
// Entries of origins missing from the list go after PurgeTicks.
func (s *Store) SetReachable(peers []proto.PeerName) {
	clear(s.reach)
	for _, p := range peers {
		s.reach[p] = true
	}
	for name := range s.gone {
		if s.reach[name] {
			delete(s.gone, name)
		}
	}
	for name := range s.asked {
		if !s.reach[name] {
			delete(s.asked, name)
		}
	}
	for name := range s.origins {
		if name != s.cfg.Self && !s.reach[name] {
			if _, ok := s.gone[name]; !ok {
				s.gone[name] = s.tick
			}
		}
	}
}

// Tick advances time by one tick: unreachable origins are purged, old
// tombstones expire, and every DigestTicks digests go out.
func (s *Store) Tick() {
	s.tick++
	for _, name := range slices.Sorted(maps.Keys(s.gone)) {
		if s.tick-s.gone[name] >= int64(s.cfg.PurgeTicks) {
			s.purge(name)
		}
	}
	if s.tick%int64(s.cfg.DigestTicks) == 0 {
		s.expire()
		s.gossip()
	}
}

// purge deletes every entry of a peer that went away.
func (s *Store) purge(name proto.PeerName) {
	delete(s.gone, name)
	o := s.origins[name]
	if o == nil {
		return
	}
	live := 0
	for _, r := range o.entries {
		if !r.Tombstone {
			live++
		}
	}
	s.stats.Purged += uint64(len(o.entries))
	delete(s.origins, name)
	s.viewChanged = true
	s.cfg.Infof("peer %v gone: %d names removed", name, live)
}

// expire drops tombstones older than TombstoneTicks.
func (s *Store) expire() {
	for name, o := range s.origins {
		for k, r := range o.entries {
			if r.Tombstone && s.tick-r.died >= int64(s.cfg.TombstoneTicks) {
				s.remove(o, k)
				s.stats.Expired++
				if name == s.cfg.Self {
					s.stateChanged = true
				}
			}
		}
		if len(o.entries) == 0 {
			delete(s.origins, name)
			delete(s.gone, name)
		}
	}
}

// gossip sends our summary to Fanout random reachable peers: 9 bytes,
// whatever the number of names; only a peer whose summary differs
// answers, with its digest.
func (s *Store) gossip() {
	peers := slices.Sorted(maps.Keys(s.reach))
	peers = slices.DeleteFunc(peers, func(p proto.PeerName) bool { return p == s.cfg.Self })
	if len(peers) == 0 {
		return
	}
	m := &proto.NamesMsg{Kind: proto.NamesSummary, Hash: s.summary()}
	for range min(s.cfg.Fanout, len(peers)) {
		i := s.cfg.Rand.IntN(len(peers))
		s.send(peers[i], m)
		peers = slices.Delete(peers, i, i+1)
	}
}

// summary combines the hashes of the origins we may speak for (those of
// digest): equal summaries mean, but for a 2^-64 chance, equal entries.
func (s *Store) summary() uint64 {
	var sum uint64
	for name, o := range s.origins {
		if s.known(name) {
			sum += mix(uint64(name)*0x9e3779b97f4a7c15 ^ o.hash)
		}
	}
	return sum
}

// digest is the hash of each origin we hold entries of (and may speak
// for: ourselves and reachable peers).
func (s *Store) digest(echo bool) *proto.NamesMsg {
	m := &proto.NamesMsg{Kind: proto.NamesDigest, Echo: echo}
	for _, name := range slices.Sorted(maps.Keys(s.origins)) {
		if s.known(name) {
			m.Digests = append(m.Digests, proto.NameDigest{Origin: name, Hash: s.origins[name].hash})
		}
	}
	return m
}

func (s *Store) known(name proto.PeerName) bool {
	return name == s.cfg.Self || s.reach[name]
}

// Step handles a message from a peer. On error the message was refused and
// the store is unchanged.
func (s *Store) Step(from proto.PeerName, m *proto.NamesMsg) error {
	switch m.Kind {
	case proto.NamesEntries, proto.NamesSignedEntries:
		if s.signed() {
			if m.Kind == proto.NamesEntries {
				s.stats.Rejected++
				s.stats.Forged += uint64(len(m.Entries))
				return fmt.Errorf("%w: %d from %v", ErrUnsigned, len(m.Entries), from)
			}
			m.Entries = s.verified(m.Entries)
		} else if !s.cfg.TrustRelays {
			m.Entries = s.fromOrigin(from, m.Entries)
		}
		for i := range m.Entries {
			e := &m.Entries[i]
			if err := checkName(e.Hostname); err != nil {
				s.stats.Rejected++
				return err
			}
			if err := checkID(e.ContainerID); err != nil {
				s.stats.Rejected++
				return err
			}
		}
		// Names outside our domain are kept like any other: a peer may
		// serve another domain, and leaving them out would make our
		// digests differ from its forever. They are never looked up.
		var answer []proto.NameEntry
		for i := range m.Entries {
			if e, ok := s.merge(&m.Entries[i]); ok {
				answer = append(answer, e)
			}
		}
		s.broadcast(answer)
		return nil
	case proto.NamesDigest:
		s.stepDigest(from, m)
		return nil
	case proto.NamesSummary:
		if m.Hash != s.summary() {
			s.send(from, s.digest(true))
		}
		return nil
	}
	s.stats.Rejected++
	return fmt.Errorf("names: message kind %d", m.Kind)
}

// merge takes in one entry from a peer. For our own entries it may return
// an entry to broadcast: ours, asserted over a wrong copy.
func (s *Store) merge(e *proto.NameEntry) (proto.NameEntry, bool) {
	if !s.known(e.Origin) {
		s.stats.Unknown++
		return proto.NameEntry{}, false
	}
	died := s.tick - s.ageTicks(e.AgeMillis)
	in := *e
	in.AgeMillis = 0 // held as died
	e = &in
	k := keyOf(e)
	r := s.get(k)
	if e.Origin == s.cfg.Self {
		switch {
		case e.Version >= proto.MaxNameVersion-1:
			// No version of ours can answer it: a peer made it up.
			s.stats.Rejected++
			s.cfg.Infof("names: ignoring a copy of our entry %s at version %d", e.Hostname, e.Version)
			return proto.NameEntry{}, false
		case r == nil && s.full(s.cfg.Self):
			s.stats.Overflow++
			return proto.NameEntry{}, false
		case r == nil && e.Tombstone:
			if s.tick-died < int64(s.cfg.TombstoneTicks) {
				s.put(&record{NameEntry: *e, died: died})
			}
			return proto.NameEntry{}, false
		case r == nil:
			// Made by an earlier run of ours and since forgotten.
			n := &record{NameEntry: *e, died: s.tick}
			n.Version++
			n.Tombstone = true
			s.put(n)
			s.stats.Corrected++
			return s.outgoing(n), true
		case e.Version > r.Version || (e.Version == r.Version && (e.Tombstone != r.Tombstone || e.Hostname != r.Hostname)):
			n := *r
			n.Version = e.Version + 1
			s.put(&n)
			s.stats.Corrected++
			return s.outgoing(&n), true
		}
		return proto.NameEntry{}, false
	}
	if r != nil && r.Tombstone && e.Tombstone && r.Version == e.Version && r.Hostname == e.Hostname {
		// The same tombstone again: the oldest report of its death
		// stands, so that every holder expires it at about the same time.
		r.died = min(r.died, died)
		return proto.NameEntry{}, false
	}
	if r != nil && !newer(e, &r.NameEntry) {
		return proto.NameEntry{}, false
	}
	if r == nil && e.Tombstone && s.tick-died >= int64(s.cfg.TombstoneTicks) {
		return proto.NameEntry{}, false
	}
	if r == nil && s.full(e.Origin) {
		s.stats.Overflow++
		return proto.NameEntry{}, false
	}
	s.put(&record{NameEntry: *e, died: died})
	return proto.NameEntry{}, false
}

// newer reports whether a wins over b: by version, then a tombstone over
// a live entry, then by hostname bytes.
func newer(a, b *proto.NameEntry) bool {
	if a.Version != b.Version {
		return a.Version > b.Version
	}
	if a.Tombstone != b.Tombstone {
		return a.Tombstone
	}
	return a.Hostname > b.Hostname
}

// stepDigest sends back the entries of every origin whose hash differs,
// and our digest if asked and anything differs.
func (s *Store) stepDigest(from proto.PeerName, m *proto.NamesMsg) {
	theirs := make(map[proto.PeerName]uint64, len(m.Digests))
	for _, d := range m.Digests {
		theirs[d.Origin] = d.Hash
	}
	differ := false
	for _, d := range m.Digests {
		if !s.known(d.Origin) {
			continue
		}
		var ours uint64
		if o := s.origins[d.Origin]; o != nil {
			ours = o.hash
		}
		if ours != d.Hash {
			differ = true
		}
	}
	var send []proto.NameEntry
	var ask []proto.PeerName
	askOrigin := func(o proto.PeerName) {
		if len(ask) < maxAskOrigins && s.tick >= s.asked[o] {
			s.asked[o] = s.tick + int64(s.cfg.DigestTicks)
			ask = append(ask, o)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(s.origins)) {
		o := s.origins[name]
		if !s.known(name) || o.hash == theirs[name] {
			continue
		}
		differ = true
		if !s.signed() && !s.cfg.TrustRelays && name != s.cfg.Self && name != from {
			// Only the origin's own copy will be taken (and a peer's
			// own entries it corrects): ask the origin to compare.
			askOrigin(name)
			continue
		}
		for _, k := range sortedKeys(o.entries) {
			send = append(send, s.outgoing(o.entries[k]))
		}
	}
	if !s.signed() && !s.cfg.TrustRelays {
		// Origins the sender has entries of and we have none: ask them
		// too, or a newcomer would learn them only when they change.
		for _, d := range m.Digests {
			if s.origins[d.Origin] == nil && d.Hash != 0 && s.known(d.Origin) && d.Origin != s.cfg.Self && d.Origin != from {
				askOrigin(d.Origin)
			}
		}
	}
	s.sendEntries(from, send)
	if m.Echo && differ {
		s.send(from, s.digest(false))
	}
	if len(ask) > 0 {
		d := s.digest(true)
		for _, o := range ask {
			s.send(o, d)
		}
	}
}

// maxAskOrigins bounds the origins asked for their entries after one
// digest, in plaintext mode.
const maxAskOrigins = 3

// ageTicks turns a tombstone's age into ticks, rounded up, so that a
// tombstone passed from peer to peer never grows younger: a peer that has
// expired it must not be given it back as new. Ages are whole ticks on the
// wire, so with the same tick length nothing is rounded at all.
func (s *Store) ageTicks(ms uint32) int64 {
	t := int64(s.cfg.TickMillis)
	return (int64(ms) + t - 1) / t
}

// outgoing is a record as sent: with the age of its tombstone.
func (s *Store) outgoing(r *record) proto.NameEntry {
	e := r.NameEntry
	e.AgeMillis = 0
	if e.Tombstone {
		ms := (s.tick - r.died) * int64(s.cfg.TickMillis)
		e.AgeMillis = uint32(min(max(ms, 0), proto.MaxNameAgeMillis))
	}
	return e
}

// broadcast sends changed entries, as outgoing made them, to every
// reachable peer.
func (s *Store) broadcast(es []proto.NameEntry) {
	s.sendEntries(0, es)
}

// sendEntries splits entries into messages of at most MaxMsgBytes.
func (s *Store) sendEntries(to proto.PeerName, es []proto.NameEntry) {
	kind := proto.NamesEntries
	if s.signed() {
		kind = proto.NamesSignedEntries
	}
	for len(es) > 0 {
		size, n := 3, 0
		for n < len(es) && n < proto.MaxNameEntries {
			l := proto.NameEntrySize(&es[n], kind)
			if n > 0 && size+l > s.cfg.MaxMsgBytes {
				break
			}
			size += l
			n++
		}
		s.send(to, &proto.NamesMsg{Kind: kind, Entries: es[:n]})
		es = es[n:]
	}
}

func (s *Store) send(to proto.PeerName, m *proto.NamesMsg) {
	b, err := proto.AppendNamesMsg(nil, m)
	if err != nil {
		// Our own entries were checked when they came in.
		s.cfg.Infof("names: not sending a message: %v", err)
		return
	}
	s.ready.Msgs = append(s.ready.Msgs, Msg{To: to, Payload: b})
}

// full reports whether origin holds MaxOriginEntries entries.
func (s *Store) full(origin proto.PeerName) bool {
	o := s.origins[origin]
	return o != nil && len(o.entries) >= s.cfg.MaxOriginEntries
}

func (s *Store) get(k key) *record {
	if o := s.origins[k.origin]; o != nil {
		return o.entries[k]
	}
	return nil
}

// put stores r in place of the entry with its key.
func (s *Store) put(r *record) {
	k := keyOf(&r.NameEntry)
	o := s.origins[k.origin]
	if o == nil {
		o = &origin{entries: map[key]*record{}}
		s.origins[k.origin] = o
	}
	old := o.entries[k]
	if old != nil {
		o.hash -= entryHash(&old.NameEntry)
	}
	if k.origin == s.cfg.Self && s.signed() {
		if msg, err := proto.NameSigned(&r.NameEntry); err == nil { // our entries were checked
			r.Sig = s.cfg.Sign(msg)
		}
	}
	o.entries[k] = r
	o.hash += entryHash(&r.NameEntry)
	if !r.Tombstone || old != nil && !old.Tombstone {
		s.viewChanged = true // (the View holds only live entries)
	}
	if k.origin == s.cfg.Self {
		s.stateChanged = true
	}
}

// signed reports whether entries are signed (password mode).
func (s *Store) signed() bool { return s.cfg.Sign != nil }

// ErrUnsigned refuses unsigned entries in signed mode.
var ErrUnsigned = errors.New("names: unsigned entries in password mode")

// verified keeps the entries of es that their origins signed, counting
// the others; es is reused.
func (s *Store) verified(es []proto.NameEntry) []proto.NameEntry {
	out := es[:0]
	for i := range es {
		if es[i].Origin == s.cfg.Self {
			// A copy of one of ours (perhaps from an earlier run with other
			// keys): merge only ever answers it with an entry of ours,
			// signed now, so that stale copies get tombstoned.
			out = append(out, es[i])
			continue
		}
		msg, err := proto.NameSigned(&es[i])
		if err != nil || !s.cfg.Verify(es[i].Origin, msg, es[i].Sig) {
			s.stats.Forged++
			continue
		}
		out = append(out, es[i])
	}
	return out
}

// fromOrigin keeps the entries of es that their origin sent (or that
// claim to be ours: merge only ever answers those with ours), counting
// the others; es is reused. Without signatures, the sender is the only
// proof of origin there is.
func (s *Store) fromOrigin(from proto.PeerName, es []proto.NameEntry) []proto.NameEntry {
	out := es[:0]
	for i := range es {
		if o := es[i].Origin; o != from && o != s.cfg.Self {
			s.stats.NotOrigin++
			continue
		}
		out = append(out, es[i])
	}
	return out
}

func (s *Store) remove(o *origin, k key) {
	r := o.entries[k]
	o.hash -= entryHash(&r.NameEntry)
	delete(o.entries, k)
	s.viewChanged = s.viewChanged || !r.Tombstone
}

// entryHash mixes everything a merge compares (FNV-1a, then a finaliser so
// that sums of hashes do not cancel out easily).
func entryHash(e *proto.NameEntry) uint64 {
	const prime = 1099511628211
	h := uint64(14695981039346656037)
	add := func(b byte) { h = (h ^ uint64(b)) * prime }
	for i := range len(e.Hostname) {
		add(e.Hostname[i])
	}
	add(0)
	for i := range len(e.ContainerID) {
		add(e.ContainerID[i])
	}
	add(0)
	for _, b := range e.Addr.As4() {
		add(b)
	}
	for i := range 6 {
		add(byte(e.Origin >> (8 * i)))
	}
	for i := range 4 {
		add(byte(e.Version >> (8 * i)))
	}
	if e.Tombstone {
		add(1)
	}
	return mix(h)
}

// mix is MurmurHash3's finaliser, so that sums of hashes do not cancel
// out easily.
func mix(h uint64) uint64 {
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}

func sortedKeys(m map[key]*record) []key {
	return slices.SortedFunc(maps.Keys(m), key.compare)
}
