// Package ipalloc is the allocator's protocol core: a deterministic state
// machine with no goroutines, clocks or sockets. Inputs arrive through
// Submit (local requests), Step (peer messages), SetReachable (the peers
// the router can reach) and Tick (time, in whole ticks); outputs collect
// in Ready until the caller acknowledges them with Advance.
//
// It is Weave's allocator (WEAVE.md §1): the range is a ring of tokens
// owned by peers (package ring), first divided by consensus among the
// initial peers (package paxos) when the first request needs it, or at
// start in seed mode; a peer that runs short asks the peer with the most
// free space, which donates the upper half of its biggest aligned free
// block. Departures from Weave: the donor is chosen by a sort, not a draw;
// merge conflicts are resolved by the ring's total order and reported,
// never turned into dropped connections; a peer that waits for consensus
// says so every WarnTicks.
package ipalloc

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"

	"github.com/overlayd/overlayd/ipalloc/paxos"
	"github.com/overlayd/overlayd/ipalloc/ring"
	"github.com/overlayd/overlayd/proto"
)

// Mode is how the ring is first made.
type Mode uint8

const (
	// Consensus: the initial peers agree by Paxos, when the first request
	// needs the ring.
	Consensus Mode = iota
	// Seed: every peer makes the ring for Config.Seeds at start.
	Seed
	// Observer: never votes; waits for a ring from a peer.
	Observer
)

// Config configures a Node.
type Config struct {
	Self          proto.PeerName
	UID           uint64       // process incarnation: a restarted process votes afresh
	Universe      netip.Prefix // the range every peer shares
	DefaultSubnet netip.Prefix // where addresses come from when a request names none; zero: Universe
	Mode          Mode
	Quorum        int              // Consensus: voters that must agree (⌊n/2⌋+1 of the initial peers)
	Seeds         []proto.PeerName // Seed: the peers to divide the range among
	Rand          *rand.Rand       // anti-entropy partners; required

	RetryTicks   int // 10: before a space request goes to the next donor
	ProposeTicks int // 50: between consensus rounds while waiting
	GossipTicks  int // 10: between ring digests to random peers
	WarnTicks    int // 300: waiting for consensus this long is logged, and again every WarnTicks
	SettleTicks  int // 20: space taken over by rmpeer is not used before this
	ClaimTries   int // 5: space requests for a claimed address before it fails
	MaxHoldTicks int // 600: rmpeer'd space waits at most this long for confirmations
	TickMillis   int // 100: the length of a tick, for log messages only

	Infof func(format string, a ...any) // optional; must not block
	Warnf func(format string, a ...any) // optional; must not block
}

func (c *Config) setDefaults() {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&c.RetryTicks, 10)
	def(&c.ProposeTicks, 50)
	def(&c.GossipTicks, 10)
	def(&c.WarnTicks, 300)
	def(&c.SettleTicks, 20)
	def(&c.ClaimTries, 5)
	def(&c.MaxHoldTicks, 600)
	def(&c.TickMillis, 100)
	def(&c.Quorum, 1)
	if !c.DefaultSubnet.IsValid() {
		c.DefaultSubnet = c.Universe
	}
	if c.Infof == nil {
		c.Infof = func(string, ...any) {}
	}
	if c.Warnf == nil {
		c.Warnf = func(string, ...any) {}
	}
}

func (c *Config) validate() error {
	if c.Self == 0 {
		return errors.New("ipalloc: config has no peer name")
	}
	if c.Rand == nil {
		return errors.New("ipalloc: config has no random source")
	}
	if err := ring.CheckRange(c.Universe); err != nil {
		return err
	}
	if !c.DefaultSubnet.Overlaps(c.Universe) || !c.DefaultSubnet.Addr().Is4() {
		return fmt.Errorf("IP address allocation default subnet %v does not overlap with allocation range %v", c.DefaultSubnet, c.Universe)
	}
	if c.Mode == Seed && len(c.Seeds) == 0 {
		return errors.New("seed mode requires peer name list")
	}
	return nil
}

// Op is what a Request asks for.
type Op uint8

const (
	OpAlloc   Op = iota + 1 // an address for Ident in Subnet (zero: the default subnet)
	OpClaim                 // Addr for Ident
	OpRelease               // Ident's addresses (only Addr, if valid)
	OpPrime                 // just the ring (Weave's `weave prime`)
	OpRmPeer                // take over Peer's space
)

// Request is a local request. ID tags the answer in Ready.Done; 0 means
// nobody waits for one.
type Request struct {
	ID     uint64
	Op     Op
	Ident  string
	Subnet netip.Prefix
	Addr   netip.Prefix
	Peer   proto.PeerName
}

// Done answers a request.
type Done struct {
	ID    uint64
	Addr  netip.Prefix // OpAlloc, OpClaim
	Taken uint64       // OpRmPeer: addresses taken over
	Err   error
}

// Msg is a message to a peer; To == 0 means every reachable peer.
// Payload is an encoded proto.IPAMMsg, shared between messages: read only.
type Msg struct {
	To      proto.PeerName
	Kind    proto.IPAMKind
	Payload []byte
}

// Ready is the work produced since the last Advance. State must be durable
// before Msgs are sent (a message may give space away that a restarted
// Node must not forget) and before Done is answered.
type Ready struct {
	State  []byte      // encoded durable state; nil if unchanged
	Msgs   []Msg       // in order
	Done   []Done      // finished requests to answer
	Owners []ring.Span // the whole ring; nil unless ownership changed
	// Manual lists the addresses outside the range held here; valid when
	// ManualChanged.
	Manual        []netip.Prefix
	ManualChanged bool
	// Lost lists the addresses given up since the last Advance: a merge
	// gave their space to another peer, which would not hand them back.
	// Whatever used them here must stop (they are no longer held).
	Lost []Lost
}

// Lost is an address given up after a merge conflict: two peers thought
// they owned its space (a partition and rmpeer on one side of it), and the
// ring gave it to Owner. Held says Owner has it allocated too (refused our
// claim); otherwise Owner did not answer, and may have.
type Lost struct {
	Ident string
	Addr  netip.Prefix
	Owner proto.PeerName
	Held  bool
	At    int64 // the tick
}

// maxLostKept bounds the Lost addresses Status remembers.
const maxLostKept = 64

// Empty reports whether there is nothing to do.
func (rd *Ready) Empty() bool {
	return rd.State == nil && len(rd.Msgs) == 0 && len(rd.Done) == 0 && rd.Owners == nil && !rd.ManualChanged && len(rd.Lost) == 0
}

// Stats counts what the core resolved on its own.
type Stats struct {
	Conflicts  uint64 // our allocations in space a merge gave to another peer
	Duplicates uint64 // of those, addresses the other peer had allocated too
	Donations  uint64 // space given to peers
	// AtLimit counts received ring entries at the version limit, which
	// no honest peer reaches: never merged.
	AtLimit uint64
	// NotOwner counts received ring entries that moved space the sender
	// may not move (see Node.mayChange): skipped.
	NotOwner uint64
}

// hold is space taken over by rmpeer, kept unused until Until and until
// every peer that must confirm it (see confirmers) has said that its ring
// equals ours there, so that a peer that ran rmpeer for the same dead peer
// at the same time settles with us on one owner. After MaxHoldTicks
// without every confirmation the space is used (inUse) but the hold stays
// until they come: until then another peer's concurrent takeover of it
// may still win by the ring's order (see retake).
type hold struct {
	Start uint32
	End   uint64
	Until int64
	inUse bool
	acked map[proto.PeerName]bool
}

// takeover records space we took over from peer From by rmpeer: From may
// win it back (see retake), for rmpeer may have been run for a peer that
// was only cut off. Kept across restarts, the last maxTakeovers of them.
type takeover struct {
	Start uint32
	End   uint64
	From  proto.PeerName
}

// maxTakeovers bounds the takeovers kept.
const maxTakeovers = 256

// pending is a request waiting for the ring or for space.
type pending struct {
	req     Request
	owner   proto.PeerName // OpClaim: the peer asked for the address
	tries   int            // OpClaim: space requests sent
	nextAt  int64          // OpClaim: tick of the next one
	denials int            // OpClaim: refusals by the owner
	logged  bool
}

// wantKey is a range a waiting allocation needs space in.
type wantKey struct {
	start uint32
	end   uint64
}

// spaceWant is the state of the space requests for one range.
type spaceWant struct {
	donor  proto.PeerName // asked now; 0: nobody
	sentAt int64
	since  int64 // tick the allocation started waiting for space
	denied map[proto.PeerName]bool
}

// A Node is not safe for concurrent use: exactly one goroutine owns it.
type Node struct {
	cfg   Config
	ring  *ring.Ring
	paxos *paxos.Node // nil unless a Consensus voter

	ticks        int64
	awaiting     bool  // consensus started, no ring yet
	awaitingFrom int64 // tick it started
	nextPropose  int64
	nextWarn     int64
	// nextRingRequest is when a peer without a ring may next ask for one
	// in answer to a digest.
	nextRingRequest int64
	nextExchange    int64 // when a digest that differs may next be answered with our ring
	nextAuthorAsk   int64 // when the peers that may make refused changes may next be asked for their rings
	nextReassert    int64 // when a takeover of our space may next be answered

	owned  map[string][]netip.Prefix // ident → addresses with their prefix length
	holder map[uint32]string         // in-range address → ident
	used   used                      // the keys of holder, sorted
	manual map[netip.Addr]string     // out-of-range address → ident
	holds  []hold
	taken  []takeover

	pend       []*pending
	retrying   bool                   // retry is running
	retryAgain bool                   // and must run again
	wants      map[wantKey]*spaceWant // by the range asked for
	reach      map[proto.PeerName]bool
	// nicks are the last nicknames the router told of peers that own
	// space or are reachable; saved with the ring, so that status still
	// names a peer that is gone (Weave's NAME(nick) - unreachable!).
	nicks map[proto.PeerName]string

	enc struct { // the ring encoded, for its hash
		hash         uint64
		plain, reply []byte
	}

	rd     Ready
	dirty  bool // state to save
	owners bool // ownership changed since the last Advance
	stats  Stats
	lost   []Lost // the last maxLostKept given up, for Status
}

// New makes a Node. state, if not nil, is what an earlier Node saved
// (Ready.State): a state from another peer name or range is discarded with
// a log line; a corrupt one is an error.
func New(cfg Config, state []byte) (*Node, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	r, err := ring.New(cfg.Universe)
	if err != nil {
		return nil, err
	}
	n := &Node{cfg: cfg, ring: r, owned: map[string][]netip.Prefix{}, holder: map[uint32]string{}, wants: map[wantKey]*spaceWant{},
		manual: map[netip.Addr]string{}, reach: map[proto.PeerName]bool{}, nicks: map[proto.PeerName]string{}}
	if cfg.Mode == Consensus {
		n.paxos = paxos.New(proto.PaxosNode{Name: cfg.Self, UID: cfg.UID}, cfg.Quorum)
	}
	restored := false
	if state != nil {
		st, err := ParseState(state)
		if err != nil {
			return nil, err
		}
		switch {
		case st.Self != cfg.Self:
			cfg.Warnf("Deleting persisted data for peername %v", st.Self)
		case st.Ring.Range != cfg.Universe:
			cfg.Warnf("Deleting persisted data for IPAM range %v; our range is %v", st.Ring.Range, cfg.Universe)
		default:
			if err := n.restore(st); err != nil {
				return nil, err
			}
			restored = true
		}
	}
	switch {
	case restored && !n.ring.Empty():
		cfg.Infof("Initialising with persisted data")
		if cfg.Mode == Seed {
			cfg.Infof("Found persisted IPAM data, ignoring supplied IPAM seed")
		}
	case cfg.Mode == Seed:
		cfg.Infof("Initialising with supplied IPAM seed")
		n.ring.ClaimForPeers(cfg.Seeds)
		n.reportFree()
	case cfg.Mode == Observer:
		cfg.Infof("Initialising as observer - awaiting IPAM data from another peer")
	default:
		cfg.Infof("Initialising via deferred consensus")
	}
	n.dirty = n.dirty || !restored && !n.ring.Empty()
	n.owners = !n.ring.Empty()
	if len(n.manual) > 0 {
		n.rd.Manual, n.rd.ManualChanged = n.manualList(), true
	}
	return n, nil
}

func (n *Node) restore(st *State) error {
	r, err := ring.FromProto(&st.Ring, n.cfg.Universe)
	if err != nil {
		return fmt.Errorf("ipalloc: stored ring: %w", err)
	}
	n.ring = r
	for _, o := range st.Owned {
		if len(o.Ident) > MaxIdentLen || o.Ident == "" {
			return fmt.Errorf("ipalloc: stored ID %q", o.Ident)
		}
		n.record(o.Ident, o.Addr)
	}
	for _, h := range st.Holds {
		n.addHold(h.Start, h.End, h.InUse)
	}
	for _, t := range st.Takeovers {
		n.taken = append(n.taken, takeover{Start: t.Start, End: t.End, From: t.Peer})
	}
	for _, k := range st.Nicknames {
		n.nicks[k.Peer] = k.Nickname
	}
	// Allocations in space the ring says is not ours would be duplicates:
	// ask for them back like after a merge conflict.
	n.checkConflicts(0)
	return nil
}

// Stats returns the counters.
func (n *Node) Stats() Stats { return n.stats }

// Ready returns the work to do; the same value until Advance.
func (n *Node) Ready() Ready {
	if n.dirty && n.rd.State == nil {
		n.rd.State = n.marshal()
	}
	if n.owners && n.rd.Owners == nil {
		n.rd.Owners = n.ring.Spans()
	}
	return n.rd
}

// Advance acknowledges that the last Ready was carried out.
func (n *Node) Advance() {
	if n.rd.State != nil {
		n.dirty = false
	}
	if n.rd.Owners != nil {
		n.owners = false
	}
	n.rd = Ready{}
}

// lose gives up an address whose re-claim failed (see checkConflicts).
func (n *Node) lose(l Lost) {
	l.At = n.ticks
	n.rd.Lost = append(n.rd.Lost, l)
	if len(n.lost) == maxLostKept {
		n.lost = slices.Delete(n.lost, 0, 1)
	}
	n.lost = append(n.lost, l)
}

func (n *Node) send(to proto.PeerName, m proto.IPAMMsg) {
	b, err := proto.AppendIPAMMsg(nil, &m)
	if err != nil {
		n.cfg.Warnf("cannot encode an IPAM message: %v", err)
		return
	}
	n.rd.Msgs = append(n.rd.Msgs, Msg{To: to, Kind: m.Kind, Payload: b})
}

// sendRing sends our ring, encoded once per version of it.
func (n *Node) sendRing(to proto.PeerName, reply bool) {
	h := n.ring.Hash()
	if n.enc.hash != h || n.enc.plain == nil {
		m := n.ringMsg()
		b, err := proto.AppendIPAMMsg(nil, &m)
		if err != nil {
			n.cfg.Warnf("cannot encode the ring: %v", err)
			return
		}
		r := slices.Clone(b)
		r[1] = 1 // the Reply flag
		n.enc.hash, n.enc.plain, n.enc.reply = h, b, r
	}
	b := n.enc.plain
	if reply {
		b = n.enc.reply
	}
	n.rd.Msgs = append(n.rd.Msgs, Msg{To: to, Kind: proto.IPAMRing, Payload: b})
}

func (n *Node) done(d Done) {
	if d.ID != 0 {
		n.rd.Done = append(n.rd.Done, d)
	}
}

func (n *Node) ringMsg() proto.IPAMMsg {
	return proto.IPAMMsg{Kind: proto.IPAMRing, Ring: n.ring.Proto()}
}

// ringChanged publishes a changed ring: saved and routes updated.
func (n *Node) ringChanged() { n.dirty, n.owners = true, true }

// broadcastSince publishes a change we made and sends every peer what
// changed since before: a few entries, not the whole ring.
func (n *Node) broadcastSince(before *ring.Ring) {
	n.ringChanged()
	delta := n.ring.Proto()
	delta.Entries = n.ring.Diff(before)
	n.send(0, proto.IPAMMsg{Kind: proto.IPAMRing, Ring: delta, Partial: true})
}

// SetReachable tells the Node which peers the router reaches now. Peers
// new to the set get our ring (or our consensus state), as Weave sends its
// whole state down a new connection.
func (n *Node) SetReachable(peers []proto.PeerName) {
	next := make(map[proto.PeerName]bool, len(peers))
	var fresh []proto.PeerName
	for _, p := range peers {
		if p == n.cfg.Self || next[p] {
			continue
		}
		next[p] = true
		if !n.reach[p] {
			fresh = append(fresh, p)
		}
	}
	n.reach = next
	if len(n.nicks) > 0 {
		owners := n.spaceOwners()
		for p := range n.nicks {
			if !next[p] && !owners[p] {
				delete(n.nicks, p)
			}
		}
	}
	// A few of the new peers hear from us at once; anti-entropy reaches
	// the rest (after a partition heals, every peer is new to half the
	// others: telling all would be a storm).
	slices.Sort(fresh)
	n.cfg.Rand.Shuffle(len(fresh), func(i, j int) { fresh[i], fresh[j] = fresh[j], fresh[i] })
	for _, p := range fresh[:min(len(fresh), 3)] {
		switch {
		case !n.ring.Empty():
			n.send(p, proto.IPAMMsg{Kind: proto.IPAMDigest, Hash: n.ring.Hash()})
		case n.awaiting && n.paxos != nil:
			n.send(p, proto.IPAMMsg{Kind: proto.IPAMPaxos, Paxos: n.paxos.State()})
		case n.awaiting:
			n.send(p, proto.IPAMMsg{Kind: proto.IPAMRingRequest})
		}
	}
	n.retry()
}

// SetNickname tells the Node the nickname of a peer the router reaches.
// It is kept while the peer is reachable or owns space, and saved with the
// ring. An empty or over-long nickname is ignored.
func (n *Node) SetNickname(p proto.PeerName, nick string) {
	if nick == "" || len(nick) > proto.MaxNicknameLen || n.nicks[p] == nick || p != n.cfg.Self && !n.reach[p] {
		return
	}
	n.nicks[p] = nick
	n.dirty = n.dirty || n.spaceOwners()[p]
}

// spaceOwners is the set of peers the ring gives space.
func (n *Node) spaceOwners() map[proto.PeerName]bool {
	entries, sizes := n.ring.Entries()
	out := make(map[proto.PeerName]bool)
	for i, e := range entries {
		if sizes[i] > 0 {
			out[e.Peer] = true
		}
	}
	return out
}

// Tick advances time by one tick.
func (n *Node) Tick() {
	n.ticks++
	if n.awaiting && n.ring.Empty() {
		if n.ticks >= n.nextPropose {
			n.propose()
		}
		if n.ticks >= n.nextWarn {
			n.nextWarn = n.ticks + int64(n.cfg.WarnTicks)
			n.warnWaiting()
		}
	}
	if !n.ring.Empty() && n.ticks%int64(n.cfg.GossipTicks) == 0 {
		n.gossipDigest()
	}
	n.settleHolds()
	for _, w := range n.wants {
		if w.donor != 0 && n.ticks-w.sentAt >= int64(n.cfg.RetryTicks) {
			w.denied[w.donor] = true // no answer counts as no
			w.donor = 0
		}
	}
	n.retry()
}

// reachable returns the reachable peers, sorted.
func (n *Node) reachable() []proto.PeerName { return slices.Sorted(maps.Keys(n.reach)) }
