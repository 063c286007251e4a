// Package topology is the mesh's shared picture: every peer's entry (name,
// incarnation, version, the connections it reports, the prefixes it
// serves), spread by gossip between neighbours, with shortest-path routes
// and discovery derived from it.
//
// The entries form a CRDT: each peer alone writes its own entry and bumps
// its version on every change; a receiver keeps the higher (version, UID) of
// each name, so merges are idempotent and commutative. A restarted peer
// (new UID) that learns of its old incarnation's entry bumps its version
// past it.
//
// Dissemination, one round at a time (the shell runs a round per second):
//
//   - news: an entry that changed, ours or one learned, is sent to Fanout
//     random neighbours each round for Retransmit rounds (epidemic fan-out,
//     so a change reaches everyone in O(log N) rounds at O(N log N)
//     messages, whatever the number of connections);
//   - anti-entropy: each round one random neighbour gets a 13-byte hash of
//     everything we know; on a mismatch the two exchange digests (name,
//     UID, version per entry) and send each other what the other lacks. In
//     a steady mesh that hash is all the traffic there is.
//
// Peers that no live peer reports a connection to (not reachable from us
// over reported connections for two rounds) are removed.
//
// The package is pure and deterministic: no sockets, clocks, goroutines or
// globals; randomness comes from Config.Rand. Inputs arrive through
// SetLocal, Step and Tick; outputs collect in Ready until Advance. A Node is
// not safe for concurrent use.
package topology

import (
	"cmp"
	"crypto/ed25519"
	"errors"
	"fmt"
	"maps"
	"math/bits"
	"math/rand/v2"
	"net/netip"
	"slices"

	"github.com/overlayd/overlayd/proto"
)

// Config configures a Node.
type Config struct {
	Self     proto.PeerName
	UID      uint64
	Nickname string
	Port     uint16
	Rand     *rand.Rand // required

	// Fanout is how many neighbours get our news each round (3).
	Fanout int
	// Retransmit is how many rounds a news item is sent for; 0 means
	// 2 + log2 of the number of peers we know.
	Retransmit int
	// MaxPeers bounds the entries kept (10,000); entries of unknown peers
	// beyond it are refused.
	MaxPeers int

	// Signer turns on signed entries (password mode): ours are signed and
	// sent as kind 5; a received entry is taken only if it carries a valid
	// signature by the key its peer is known by (see Node.Prove), and
	// unsigned entries are refused. Nil: plaintext.
	Signer *Signer
}

// A Signer signs our own entry.
type Signer struct {
	Key  [proto.TopoKeyLen]byte // Ed25519 public key
	Sign func(msg []byte) [proto.TopoSigLen]byte
}

// Msg is a topology message for one neighbour.
type Msg struct {
	To  proto.PeerName
	Msg proto.TopoMsg
}

// Ready is the work produced since the last Advance.
type Ready struct {
	Msgs []Msg
	// Changed says the topology (and so routes) changed.
	Changed bool
	// Removed lists peers garbage-collected.
	Removed []proto.PeerName
}

// tomb is what we remember of a removed entry, for TombRounds.
type tomb struct {
	uid, version uint64
	until        int64
}

// TombRounds is how long a removed entry is remembered.
const TombRounds = 60

// Node holds one peer's view of the topology.
type Node struct {
	cfg   Config
	peers map[proto.PeerName]*proto.TopoPeer // values are never changed in place
	// news maps peers whose entry we still spread to the rounds left.
	news map[proto.PeerName]int
	// unreachable maps peers not reachable from us to the rounds they have
	// been so.
	unreachable map[proto.PeerName]int
	// removed remembers the entries we garbage-collected, so that a peer
	// that has not collected them yet cannot gossip them back to us: only a
	// newer entry (the peer is back) is taken.
	removed map[proto.PeerName]tomb
	round   int64
	// synced maps neighbours to the last round we answered their hash or
	// digest request: once a round each, so a neighbour cannot make us
	// send our whole state over and over.
	synced map[proto.PeerName]int64
	rd     Ready
	hash   uint64
	// keys are the signing keys peers are known by (signed mode): the key
	// of the entry we hold (or held, until its tomb expires), or the key a
	// neighbour proved in its handshake (proven), which wins. An entry
	// signed by another key is refused until the peer's entry and tomb are
	// gone: a peer whose key changes needs its old entries gone first.
	keys   map[proto.PeerName][proto.TopoKeyLen]byte
	proven map[proto.PeerName][proto.TopoKeyLen]byte
	// answered maps peers whose entry we sent back to a holder of it under
	// another key to the round we did: once a round each.
	answered map[proto.PeerName]int64
	// Rejected counts entries refused by Step.
	Rejected uint64
}

// New makes a Node whose only entry is our own, version 1.
func New(cfg Config) (*Node, error) {
	if cfg.Self == 0 || cfg.UID == 0 || cfg.Rand == nil {
		return nil, errors.New("topology: config needs Self, UID and Rand")
	}
	if cfg.Fanout == 0 {
		cfg.Fanout = 3
	}
	if cfg.MaxPeers == 0 {
		cfg.MaxPeers = 10000
	}
	n := &Node{cfg: cfg, peers: map[proto.PeerName]*proto.TopoPeer{}, news: map[proto.PeerName]int{},
		unreachable: map[proto.PeerName]int{}, removed: map[proto.PeerName]tomb{}, synced: map[proto.PeerName]int64{},
		keys: map[proto.PeerName][proto.TopoKeyLen]byte{}, proven: map[proto.PeerName][proto.TopoKeyLen]byte{},
		answered: map[proto.PeerName]int64{}}
	if cfg.Signer != nil {
		n.proven[cfg.Self] = cfg.Signer.Key
	}
	if err := n.putSelf(&proto.TopoPeer{Name: cfg.Self, UID: cfg.UID, Version: 1, Port: cfg.Port, Nickname: cfg.Nickname}); err != nil {
		return nil, err
	}
	return n, nil
}

// putSelf signs our entry e (in signed mode) and stores it.
func (n *Node) putSelf(e *proto.TopoPeer) error {
	if s := n.cfg.Signer; s != nil {
		e.Key = s.Key
		msg, err := proto.TopoSigned(e)
		if err != nil {
			return fmt.Errorf("topology: signing our entry: %w", err)
		}
		e.Sig = s.Sign(msg)
	}
	n.put(e)
	return nil
}

// signed reports whether entries are signed (password mode).
func (n *Node) signed() bool { return n.cfg.Signer != nil }

// entriesKind is the kind our entries go in.
func (n *Node) entriesKind() proto.TopoKind {
	if n.signed() {
		return proto.TopoSignedEntries
	}
	return proto.TopoEntries
}

// entrySize is the encoded size of e in our entries messages.
func (n *Node) entrySize(e *proto.TopoPeer) int {
	if n.signed() {
		return proto.TopoSignedPeerSize(e)
	}
	return proto.TopoPeerSize(e)
}

// Prove records the signing keys our neighbours proved in their
// handshakes (signed mode), replacing those recorded before. An entry we
// hold of such a peer under another key is dropped: the neighbour sends
// its own.
func (n *Node) Prove(keys map[proto.PeerName][proto.TopoKeyLen]byte) {
	if !n.signed() {
		return
	}
	clear(n.proven)
	n.proven[n.cfg.Self] = n.cfg.Signer.Key
	for name, k := range keys {
		if name == n.cfg.Self {
			continue
		}
		n.proven[name] = k
		if e := n.peers[name]; e != nil && e.Key != k {
			n.hash ^= entryHash(e)
			delete(n.keys, name)
			delete(n.peers, name)
			delete(n.news, name)
			delete(n.unreachable, name)
			n.rd.Changed = true
		}
	}
}

// KeyOf is the signing key peer name is known by (signed mode).
func (n *Node) KeyOf(name proto.PeerName) ([proto.TopoKeyLen]byte, bool) {
	if k, ok := n.proven[name]; ok {
		return k, true
	}
	k, ok := n.keys[name]
	return k, ok
}

// ErrSignature refuses an entry in signed mode: unsigned, badly signed, or
// signed by another key than its peer is known by.
var ErrSignature = errors.New("topology: entry not signed by its peer")

// checkSigned verifies e in signed mode. rekey says e is signed by a new
// key for its peer that we take in place of the one it was known by: a
// neighbour of ours, connected to it, vouches for the new key (it proved
// it in the handshake, see proto.TopoConn.Key), no entry we hold vouches
// for the old, and no neighbour of ours proved another. That is a peer that lost its keys
// and came back, whose old entry would otherwise never go while its name
// stays reachable.
func (n *Node) checkSigned(e *proto.TopoPeer) (rekey bool, err error) {
	msg, err := proto.TopoSigned(e)
	if err != nil || e.Key == ([proto.TopoKeyLen]byte{}) || !ed25519.Verify(e.Key[:], msg, e.Sig[:]) {
		return false, fmt.Errorf("%w: the signature of %v's entry does not verify", ErrSignature, e.Name)
	}
	k, ok := n.KeyOf(e.Name)
	if !ok || k == e.Key {
		return false, nil
	}
	if _, proven := n.proven[e.Name]; !proven && n.vouched(e.Name, e.Key, true) && !n.vouched(e.Name, k, false) {
		return true, nil
	}
	return false, fmt.Errorf("%w: %v's entry is signed by another key than the one it is known by (a key changes once the peer's old entry is gone, or once the peers connected to it vouch for the new one)", errOtherKey, e.Name)
}

// errOtherKey is an ErrSignature for an entry signed by another key than
// its peer is known by: the sender may hold an entry made under a key the
// peer gave up, and is answered with ours.
var errOtherKey = fmt.Errorf("%w", ErrSignature)

// vouched reports whether an entry we hold, other than name's own, reports
// a connection to name with key k. With anchored, only the entries of our
// neighbours count: their keys they proved to us in the handshake, so a
// member cannot vouch through an entry it made up for a name of its own.
func (n *Node) vouched(name proto.PeerName, k [proto.TopoKeyLen]byte, anchored bool) bool {
	for _, p := range n.peers {
		if p.Name == name || p.Name == n.cfg.Self {
			continue
		}
		if pk, ok := n.proven[p.Name]; anchored && (!ok || pk != p.Key) {
			continue
		}
		i, ok := slices.BinarySearchFunc(p.Conns, name, func(c proto.TopoConn, t proto.PeerName) int { return cmp.Compare(c.Peer, t) })
		if ok && p.Conns[i].Key == k {
			return true
		}
	}
	return false
}

// Ready returns the work produced since the last Advance.
func (n *Node) Ready() Ready { return n.rd }

// Advance tells the Node the caller has acted on Ready.
func (n *Node) Advance() { n.rd = Ready{} }

func (n *Node) self() *proto.TopoPeer { return n.peers[n.cfg.Self] }

// put stores e as the entry of its peer and marks it as news.
func (n *Node) put(e *proto.TopoPeer) {
	if old := n.peers[e.Name]; old != nil {
		n.hash ^= entryHash(old)
	}
	n.peers[e.Name] = e
	if n.signed() {
		n.keys[e.Name] = e.Key
	}
	n.hash ^= entryHash(e)
	n.news[e.Name] = n.retransmits()
	n.rd.Changed = true
}

func (n *Node) retransmits() int {
	if n.cfg.Retransmit > 0 {
		return n.cfg.Retransmit
	}
	return 2 + bits.Len(uint(len(n.peers)))
}

// SetLocal replaces our own connections and prefixes; the version is bumped
// if anything changed. conns need not be sorted.
func (n *Node) SetLocal(conns []proto.TopoConn, prefixes []netip.Prefix) {
	cs := slices.Clone(conns)
	slices.SortFunc(cs, func(a, b proto.TopoConn) int { return cmp.Compare(a.Peer, b.Peer) })
	cs = slices.CompactFunc(cs, func(a, b proto.TopoConn) bool { return a.Peer == b.Peer })
	cs = slices.DeleteFunc(cs, func(c proto.TopoConn) bool { return c.Peer == n.cfg.Self || c.Peer == 0 })
	ps := slices.Clone(prefixes)
	old := n.self()
	if slices.Equal(old.Conns, cs) && slices.Equal(old.Prefixes, ps) {
		return
	}
	before := n.Neighbours()
	e := *old
	if e.Version+1 >= proto.MaxTopoVersion {
		return // unreachable: merge keeps ours below half of it
	}
	e.Version++
	e.Conns, e.Prefixes = cs, ps
	if err := n.putSelf(&e); err != nil {
		return // an entry too large to encode: nothing sends it either
	}
	// Our neighbours hear of it at once (new ones need it to route to us);
	// the rest through news and anti-entropy. A new neighbour also gets our
	// hash, so that the two of us sync everything now, not by chance later.
	for _, nb := range n.Neighbours() {
		n.send(nb, proto.TopoMsg{Kind: n.entriesKind(), Entries: []proto.TopoPeer{e}})
		if _, known := slices.BinarySearch(before, nb); !known {
			n.send(nb, proto.TopoMsg{Kind: proto.TopoHash, Count: uint32(len(n.peers)), Hash: n.hash})
		}
	}
}

// newer reports whether a should replace b.
func newer(a, b *proto.TopoPeer) bool {
	return a.Version > b.Version || a.Version == b.Version && a.UID > b.UID
}

// ErrImpersonation is returned by Step when a neighbour sends an entry of
// its own name with another incarnation's UID than the one it handshook
// with.
var ErrImpersonation = errors.New("topology: neighbour sent its own entry with another UID")

// Step handles a message from neighbour from, whose handshake told us its
// UID. Entries that fail checks are refused and counted; the error reports
// the first of them, and the rest of the message is still used. Step keeps
// the slices of m's entries: the caller must not change them afterwards
// (entries are immutable once stored, and shared with the Msgs in Ready).
func (n *Node) Step(from proto.PeerName, fromUID uint64, m *proto.TopoMsg) error {
	n.Rejected += uint64(m.Skipped) // the decoder left them out
	if m.Kind == proto.TopoHash || m.Kind == proto.TopoDigestRequest {
		if last, ok := n.synced[from]; ok && last == n.round {
			return nil // answered this neighbour this round already
		}
		n.synced[from] = n.round
	}
	switch m.Kind {
	case proto.TopoHash:
		if m.Hash != n.hash || int(m.Count) != len(n.peers) {
			n.send(from, proto.TopoMsg{Kind: proto.TopoDigestRequest, Digest: n.digest()})
		}
	case proto.TopoDigestRequest, proto.TopoDigestReply:
		theirs := make(map[proto.PeerName]proto.TopoDigestItem, len(m.Digest))
		behind := false
		for _, d := range m.Digest {
			theirs[d.Name] = d
			if cur := n.peers[d.Name]; cur == nil || newer(&proto.TopoPeer{Version: d.Version, UID: d.UID}, cur) {
				behind = true
			}
		}
		var send []proto.TopoPeer
		for _, name := range n.names() {
			e := n.peers[name]
			if d, ok := theirs[name]; !ok || newer(e, &proto.TopoPeer{Version: d.Version, UID: d.UID}) {
				send = append(send, *e)
			}
		}
		n.sendEntries(from, send)
		if m.Kind == proto.TopoDigestRequest && behind {
			n.send(from, proto.TopoMsg{Kind: proto.TopoDigestReply, Digest: n.digest()})
		}
	case proto.TopoEntries:
		if n.signed() {
			n.Rejected += uint64(len(m.Entries))
			return fmt.Errorf("%w: %d unsigned entries from %v in password mode", ErrSignature, len(m.Entries), from)
		}
		return n.merge(from, fromUID, m.Entries)
	case proto.TopoSignedEntries:
		return n.merge(from, fromUID, m.Entries)
	default:
		return fmt.Errorf("topology: unknown message kind %d", m.Kind)
	}
	return nil
}

func (n *Node) merge(from proto.PeerName, fromUID uint64, entries []proto.TopoPeer) error {
	var first error
	var ours []proto.TopoPeer // answers to copies under a key given up
	defer func() {
		if len(ours) > 0 {
			n.sendEntries(from, ours)
		}
	}()
	for i := range entries {
		e := &entries[i]
		rekey := false
		if n.signed() {
			var err error
			if rekey, err = n.checkSigned(e); err != nil {
				n.Rejected++
				if first == nil {
					first = err
				}
				// The sender holds this peer under another key than we
				// do: answer with our entry, so that anti-entropy (which
				// compares versions, not keys) cannot leave it stuck on
				// an entry made under a key given up.
				last, done := n.answered[e.Name]
				if cur := n.peers[e.Name]; errors.Is(err, errOtherKey) && cur != nil && (!done || last != n.round) {
					n.answered[e.Name] = n.round // once a round: no amplifier
					ours = append(ours, *cur)
				}
				continue
			}
		}
		switch {
		case e.Name == from && e.UID != fromUID:
			n.Rejected++
			if first == nil {
				first = fmt.Errorf("%w: %v sent UID %d, handshook as %d", ErrImpersonation, from, e.UID, fromUID)
			}
			continue
		case e.Name == n.cfg.Self:
			if self := n.self(); e.UID != n.cfg.UID && e.Version >= self.Version || e.UID == n.cfg.UID && e.Version > self.Version {
				// An older incarnation of us (or a copy newer than ours):
				// bump past it so that ours wins everywhere, unless it is
				// past half the versions there are, which no incarnation
				// of ours reaches (2^61 changes): a forged copy must not
				// push ours to where nobody takes it, or leave it no room
				// to change.
				if e.Version >= proto.MaxTopoVersion/2 {
					n.Rejected++
					if first == nil {
						first = fmt.Errorf("topology: a copy of our own entry at version %d, which no version of ours can pass: made up", e.Version)
					}
					continue
				}
				mine := *self
				mine.Version = e.Version + 1
				if err := n.putSelf(&mine); err != nil && first == nil {
					first = err
				}
			}
			continue
		}
		cur := n.peers[e.Name]
		if cur != nil && !newer(e, cur) && !rekey {
			continue // (an entry under a key given up goes whatever its version)
		}
		if t, ok := n.removed[e.Name]; ok && e.UID == t.uid && e.Version <= t.version {
			continue // a copy of what we removed, from a peer that has not yet
		}
		if cur == nil && len(n.peers) >= n.cfg.MaxPeers {
			n.Rejected++
			if first == nil {
				first = fmt.Errorf("topology: more than %d peers; entry of %v refused", n.cfg.MaxPeers, e.Name)
			}
			continue
		}
		c := *e // the slices are taken over, never changed: see Step
		delete(n.removed, e.Name)
		n.put(&c)
	}
	return first
}

func (n *Node) send(to proto.PeerName, m proto.TopoMsg) {
	n.rd.Msgs = append(n.rd.Msgs, Msg{To: to, Msg: m})
}

// MaxEntriesBytes bounds one entries message: more entries go in more
// messages, each merged on its own, so that one lost chunk costs little and
// no message nears the receiver's reassembly limit.
const MaxEntriesBytes = 48 << 10

// sendEntries sends es to a neighbour in messages of at most
// MaxEntriesBytes (a single larger entry goes alone).
func (n *Node) sendEntries(to proto.PeerName, es []proto.TopoPeer) {
	for len(es) > 0 {
		k, size := 0, 3
		for k < len(es) && (k == 0 || size+n.entrySize(&es[k]) <= MaxEntriesBytes) {
			size += n.entrySize(&es[k])
			k++
		}
		n.send(to, proto.TopoMsg{Kind: n.entriesKind(), Entries: es[:k:k]})
		es = es[k:]
	}
}

func (n *Node) names() []proto.PeerName { return slices.Sorted(maps.Keys(n.peers)) }

func (n *Node) digest() []proto.TopoDigestItem {
	d := make([]proto.TopoDigestItem, 0, len(n.peers))
	for _, name := range n.names() {
		e := n.peers[name]
		d = append(d, proto.TopoDigestItem{Name: e.Name, UID: e.UID, Version: e.Version})
	}
	return d
}

// Neighbours are the peers our own entry reports an established connection
// to, in name order.
func (n *Node) Neighbours() []proto.PeerName {
	var ns []proto.PeerName
	for _, c := range n.self().Conns {
		if c.Established {
			ns = append(ns, c.Peer)
		}
	}
	return ns
}

// Tick runs one gossip round: news to Fanout random neighbours, our hash to
// one, and garbage collection.
func (n *Node) Tick() {
	n.collect()
	nb := n.Neighbours()
	if len(nb) == 0 {
		return
	}
	if len(n.news) > 0 {
		var entries []proto.TopoPeer
		for _, name := range n.names() {
			if left, ok := n.news[name]; ok {
				entries = append(entries, *n.peers[name])
				if left <= 1 {
					delete(n.news, name)
				} else {
					n.news[name] = left - 1
				}
			}
		}
		for _, to := range n.pick(nb, n.cfg.Fanout) {
			n.sendEntries(to, entries)
		}
	}
	to := nb[n.cfg.Rand.IntN(len(nb))]
	n.send(to, proto.TopoMsg{Kind: proto.TopoHash, Count: uint32(len(n.peers)), Hash: n.hash})
}

// pick chooses k of ns at random (all if k >= len(ns)).
func (n *Node) pick(ns []proto.PeerName, k int) []proto.PeerName {
	if k >= len(ns) {
		return ns
	}
	c := slices.Clone(ns)
	n.cfg.Rand.Shuffle(len(c), func(i, j int) { c[i], c[j] = c[j], c[i] })
	return c[:k]
}

// collect removes peers that have not been reachable from us over reported
// connections for two rounds.
func (n *Node) collect() {
	n.round++
	for name, last := range n.synced {
		if last < n.round-1 {
			delete(n.synced, name)
		}
	}
	for name, last := range n.answered {
		if last < n.round {
			delete(n.answered, name)
		}
	}
	for name, t := range n.removed {
		if n.round > t.until {
			delete(n.removed, name)
			if n.peers[name] == nil {
				delete(n.keys, name)
			}
		}
	}
	reach := map[proto.PeerName]bool{n.cfg.Self: true}
	queue := []proto.PeerName{n.cfg.Self}
	for len(queue) > 0 {
		p := n.peers[queue[0]]
		queue = queue[1:]
		if p == nil {
			continue
		}
		for _, c := range p.Conns {
			if !reach[c.Peer] {
				reach[c.Peer] = true
				queue = append(queue, c.Peer)
			}
		}
	}
	for _, name := range n.names() {
		if reach[name] {
			delete(n.unreachable, name)
			continue
		}
		n.unreachable[name]++
		if n.unreachable[name] >= 2 {
			if len(n.removed) < n.cfg.MaxPeers {
				n.removed[name] = tomb{uid: n.peers[name].UID, version: n.peers[name].Version, until: n.round + TombRounds}
			} else {
				delete(n.keys, name) // no tomb to keep it with
			}
			n.hash ^= entryHash(n.peers[name])
			delete(n.peers, name)
			delete(n.news, name)
			delete(n.unreachable, name)
			// Its key is kept as long as the tomb: the peer back with the
			// same key is taken at once, a new key only once the tomb
			// expires (or a neighbour proves it), so that nobody can claim
			// the name with a key of its own while the peer restarts.
			n.rd.Removed = append(n.rd.Removed, name)
			n.rd.Changed = true
		}
	}
}

// Peers returns every entry in name order. The entries are shared and must
// not be modified.
func (n *Node) Peers() []*proto.TopoPeer {
	out := make([]*proto.TopoPeer, 0, len(n.peers))
	for _, name := range n.names() {
		out = append(out, n.peers[name])
	}
	return out
}

// Peer returns the entry of name, or nil. Shared: do not modify.
func (n *Node) Peer(name proto.PeerName) *proto.TopoPeer { return n.peers[name] }

// Len is the number of peers known, ourselves included.
func (n *Node) Len() int { return len(n.peers) }

// Hash is the summary other peers compare with theirs.
func (n *Node) Hash() uint64 { return n.hash }

// Routes maps every peer reachable over symmetric established connections
// (both ends report it established) to the neighbour through which the
// shortest path to it starts. Breadth-first, neighbours in name order, so
// every peer computes the same paths.
func (n *Node) Routes() map[proto.PeerName]proto.PeerName {
	return Routes(n.peers, n.cfg.Self)
}

// Routes computes next hops from self over the given entries; see
// Node.Routes.
func Routes(peers map[proto.PeerName]*proto.TopoPeer, self proto.PeerName) map[proto.PeerName]proto.PeerName {
	next := map[proto.PeerName]proto.PeerName{}
	seen := map[proto.PeerName]bool{self: true}
	type hop struct{ peer, first proto.PeerName }
	queue := []hop{{self, 0}}
	for len(queue) > 0 {
		h := queue[0]
		queue = queue[1:]
		p := peers[h.peer]
		if p == nil {
			continue
		}
		for _, c := range p.Conns { // sorted by name
			if !c.Established || seen[c.Peer] || !reports(peers[c.Peer], h.peer) {
				continue
			}
			seen[c.Peer] = true
			first := h.first
			if h.peer == self {
				first = c.Peer
			}
			next[c.Peer] = first
			queue = append(queue, hop{c.Peer, first})
		}
	}
	return next
}

// reports says whether p reports an established connection to other.
func reports(p *proto.TopoPeer, other proto.PeerName) bool {
	if p == nil {
		return false
	}
	i, ok := slices.BinarySearchFunc(p.Conns, other, func(c proto.TopoConn, name proto.PeerName) int { return cmp.Compare(c.Peer, name) })
	return ok && p.Conns[i].Established
}

// entryHash mixes an entry's identity and version into 64 bits; the node's
// hash is the XOR of all of them, so it is independent of order and cheap to
// update.
func entryHash(e *proto.TopoPeer) uint64 {
	x := uint64(e.Name)*0x9e3779b97f4a7c15 ^ e.UID*0xc2b2ae3d27d4eb4f ^ e.Version*0x165667b19e3779f9
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

// Candidates lists peers worth dialling for discovery: known peers we have
// no connection to, each with an address taken from a connection some peer
// reports to it (an outbound one's address as is, an inbound one's host
// with the peer's own port), in name order.
func (n *Node) Candidates() []Candidate {
	mine := map[proto.PeerName]bool{}
	for _, c := range n.self().Conns {
		mine[c.Peer] = true
	}
	addrs := map[proto.PeerName]netip.AddrPort{}
	for _, name := range n.names() {
		p := n.peers[name]
		for _, c := range p.Conns {
			if c.Peer == n.cfg.Self || mine[c.Peer] || !c.Addr.IsValid() {
				continue
			}
			if _, ok := addrs[c.Peer]; ok {
				continue
			}
			ap := c.Addr
			if !c.Outbound {
				target := n.peers[c.Peer]
				if target == nil || target.Port == 0 {
					continue
				}
				ap = netip.AddrPortFrom(c.Addr.Addr(), target.Port)
			}
			addrs[c.Peer] = ap
		}
	}
	var out []Candidate
	for _, name := range n.names() {
		if ap, ok := addrs[name]; ok && n.peers[name] != nil {
			out = append(out, Candidate{Name: name, Addr: ap})
		}
	}
	return out
}

// Candidate is a peer discovery may dial.
type Candidate struct {
	Name proto.PeerName
	Addr netip.AddrPort
}

// Discover chooses the candidates to dial now, in random order (so that
// peers do not all crowd the same few). With peers known (ourselves
// included) and a limit, we dial while our connections stay under half of
// the limit, which keeps the other half for peers that dial us, configured
// ones first among them: a full mesh where it fits in that half. A mesh too
// big for it gets a random graph of degree 8 + 4·log2(peers) instead, whose
// diameter stays small while connections, entries and gossip stay small
// too. A limit of 0 means no limit: a full mesh.
func Discover(cands []Candidate, conns, peers, limit int, r *rand.Rand) []Candidate {
	c := slices.Clone(cands)
	r.Shuffle(len(c), func(i, j int) { c[i], c[j] = c[j], c[i] })
	if limit <= 0 {
		return c
	}
	want := limit / 2
	if peers-1 > want {
		want = min(want, 8+4*bits.Len(uint(peers)))
	}
	room := want - conns
	if room <= 0 {
		return nil
	}
	return c[:min(room, len(c))]
}

// Admit says whether a peer with conns connections accepts one more: a peer
// dialled because it was configured is taken up to limit, a discovered one
// only while a tenth of the limit stays free for configured peers. A limit
// of 0 means no limit.
func Admit(conns, limit int, configured bool) bool {
	switch {
	case limit <= 0:
		return true
	case configured:
		return conns < limit
	}
	return conns < limit-limit/10
}
