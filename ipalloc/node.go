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
	"cmp"
	"errors"
	"fmt"
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
}

// Empty reports whether there is nothing to do.
func (rd *Ready) Empty() bool {
	return rd.State == nil && len(rd.Msgs) == 0 && len(rd.Done) == 0 && rd.Owners == nil && !rd.ManualChanged
}

// Stats counts what the core resolved on its own.
type Stats struct {
	Conflicts  uint64 // our allocations in space a merge gave to another peer
	Duplicates uint64 // of those, addresses the other peer had allocated too
	Donations  uint64 // space given to peers
}

// hold is space taken over by rmpeer, kept unused until Until and until
// every reachable peer has confirmed that its ring equals ours (so that a
// peer that ran rmpeer for the same dead peer at the same time has settled
// with us on one owner).
type hold struct {
	Start uint32
	End   uint64
	Until int64
	acked map[proto.PeerName]bool
}

// pending is a request waiting for the ring or for space.
type pending struct {
	req    Request
	owner  proto.PeerName // OpClaim: the peer asked for the address
	tries  int            // OpClaim: space requests sent
	nextAt int64          // OpClaim: tick of the next one
	logged bool
}

// spaceWant is the outstanding request for space.
type spaceWant struct {
	start  uint32
	end    uint64
	donor  proto.PeerName
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

	owned  map[string][]netip.Prefix // ident → addresses with their prefix length
	holder map[uint32]string         // in-range address → ident
	used   used                      // the keys of holder, sorted
	manual map[netip.Addr]string     // out-of-range address → ident
	holds  []hold

	pend  []*pending
	want  *spaceWant
	reach map[proto.PeerName]bool

	enc struct { // the ring encoded, for its hash
		hash         uint64
		plain, reply []byte
	}

	rd     Ready
	dirty  bool // state to save
	owners bool // ownership changed since the last Advance
	stats  Stats
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
	n := &Node{cfg: cfg, ring: r, owned: map[string][]netip.Prefix{}, holder: map[uint32]string{},
		manual: map[netip.Addr]string{}, reach: map[proto.PeerName]bool{}}
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
		n.addHold(h.Start, h.End)
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
	if n.want != nil && n.ticks-n.want.sentAt >= int64(n.cfg.RetryTicks) {
		n.want.denied[n.want.donor] = true // no answer counts as no
		n.want.donor = 0
	}
	n.retry()
}

func (n *Node) warnWaiting() {
	waited := (n.ticks - n.awaitingFrom) * int64(n.cfg.TickMillis) / 1000
	if n.paxos == nil {
		n.cfg.Warnf("IPAM has waited %ds for a ring as an observer: no voting peer has answered; start a peer without --ipalloc-init=observer, or check that the peers are connected", waited)
		return
	}
	n.cfg.Warnf("IPAM has waited %ds for consensus (quorum: %d, known: %d): start the other initial peers and connect them (--peer), or set --init-peer-count to the number of initial peers", waited, n.paxos.Quorum(), n.paxos.Known())
}

// gossipDigest sends the hash of our ring to a few random reachable
// peers; one whose ring differs sends its ring back.
func (n *Node) gossipDigest() {
	peers := n.reachable()
	if len(peers) == 0 {
		return
	}
	h := n.ring.Hash()
	for range min(3, len(peers)) {
		i := n.cfg.Rand.IntN(len(peers))
		n.send(peers[i], proto.IPAMMsg{Kind: proto.IPAMDigest, Hash: h})
		peers[i] = peers[len(peers)-1]
		peers = peers[:len(peers)-1]
	}
}

// reachable returns the reachable peers, sorted.
func (n *Node) reachable() []proto.PeerName {
	out := make([]proto.PeerName, 0, len(n.reach))
	for p := range n.reach {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// establish starts consensus (or, for an observer, asks for a ring).
func (n *Node) establish() {
	if !n.ring.Empty() || n.awaiting {
		return
	}
	n.awaiting, n.awaitingFrom = true, n.ticks
	n.nextWarn = n.ticks + int64(n.cfg.WarnTicks)
	n.propose()
}

func (n *Node) propose() {
	n.nextPropose = n.ticks + int64(n.cfg.ProposeTicks)
	if n.paxos == nil {
		n.send(0, proto.IPAMMsg{Kind: proto.IPAMRingRequest})
		return
	}
	n.paxos.Propose()
	n.paxos.Think()
	n.send(0, proto.IPAMMsg{Kind: proto.IPAMPaxos, Paxos: n.paxos.State()})
	n.decide()
}

// decide makes the ring once consensus is reached.
func (n *Node) decide() {
	v, ok := n.paxos.Consensus()
	if !ok || !n.ring.Empty() {
		return
	}
	n.ring.ClaimForPeers(v)
	n.awaiting = false
	n.cfg.Infof("IPAM consensus reached among %v", v)
	n.reportFree()
	n.ringChanged()
	n.sendRing(0, false)
	n.retry()
}

// Submit takes a local request; its answer comes in Ready.Done, now or
// once the ring or space it needs arrives.
func (n *Node) Submit(r Request) {
	if len(r.Ident) > MaxIdentLen {
		n.done(Done{ID: r.ID, Err: fmt.Errorf("ipalloc: ID of %d bytes is over the %d-byte limit", len(r.Ident), MaxIdentLen)})
		return
	}
	switch r.Op {
	case OpAlloc:
		if !r.Subnet.IsValid() {
			r.Subnet = n.cfg.DefaultSubnet
		}
		if r.Ident == "" {
			n.done(Done{ID: r.ID, Err: errors.New("ipalloc: no ID given")})
			return
		}
		if !r.Subnet.Addr().Is4() || !r.Subnet.Overlaps(n.cfg.Universe) {
			n.done(Done{ID: r.ID, Err: fmt.Errorf("range %v out of bounds: %v", r.Subnet, n.cfg.Universe)})
			return
		}
		if r.Subnet.Bits() > 30 {
			n.done(Done{ID: r.ID, Err: fmt.Errorf("invalid subnet - smaller than minimum size 4: %v", r.Subnet)})
			return
		}
		n.queue(r)
	case OpClaim:
		if r.Ident == "" || !r.Addr.IsValid() || !r.Addr.Addr().Is4() {
			n.done(Done{ID: r.ID, Err: fmt.Errorf("ipalloc: cannot claim %v for %q", r.Addr, r.Ident)})
			return
		}
		if !n.cfg.Universe.Contains(r.Addr.Addr()) {
			n.done(n.claimManual(r))
			return
		}
		n.queue(r)
	case OpRelease:
		n.done(n.release(r))
	case OpPrime:
		n.queue(r)
	case OpRmPeer:
		n.done(n.rmpeer(r))
	default:
		n.done(Done{ID: r.ID, Err: fmt.Errorf("ipalloc: unknown request %d", r.Op)})
	}
}

// Cancel drops a waiting request (its caller went away), answering it
// with ErrCancelled. A request no longer waiting is left alone.
func (n *Node) Cancel(id uint64) {
	for i, p := range n.pend {
		if p.req.ID == id {
			n.pend = slices.Delete(n.pend, i, i+1)
			n.done(Done{ID: id, Err: ErrCancelled})
			return
		}
	}
}

// ErrCancelled answers a cancelled request.
var ErrCancelled = errors.New("cancelled")

// queue tries r now and keeps it if it must wait.
func (n *Node) queue(r Request) {
	p := &pending{req: r}
	if n.try(p) {
		return
	}
	n.pend = append(n.pend, p)
	n.retry()
}

// retry tries the waiting requests again: claims first, then the rest in
// order; then asks for space if an allocation still waits.
func (n *Node) retry() {
	if len(n.pend) == 0 {
		n.want = nil
		return
	}
	left := n.pend[:0:0]
	for _, claims := range []bool{true, false} {
		for _, p := range n.pend {
			if (p.req.Op == OpClaim) != claims {
				continue
			}
			if !n.try(p) {
				left = append(left, p)
			}
		}
	}
	n.pend = left
	n.askForSpace()
}

// try attempts a request and reports whether it finished.
func (n *Node) try(p *pending) bool {
	r := p.req
	if n.ring.Empty() {
		n.establish()
		if r.Op == OpClaim && !p.logged {
			p.logged = true
			n.cfg.Infof("Claim %v for %s: is in the range %v, but the allocator is not initialized yet; will try later.", r.Addr, r.Ident, n.cfg.Universe)
		}
		return false
	}
	switch r.Op {
	case OpPrime:
		n.done(Done{ID: r.ID})
		return true
	case OpAlloc:
		if a, ok := n.holds4(r.Ident, r.Subnet); ok {
			n.done(Done{ID: r.ID, Addr: a})
			return true
		}
		a, ok := n.lowestFree(r.Subnet)
		if !ok {
			return false
		}
		pfx := netip.PrefixFrom(ring.Addr(a), r.Subnet.Bits())
		n.record(r.Ident, pfx)
		n.afterLocalChange()
		n.done(Done{ID: r.ID, Addr: pfx})
		return true
	case OpClaim:
		return n.tryClaim(p)
	}
	return true
}

// holds4 returns an address ident already holds inside subnet.
func (n *Node) holds4(ident string, subnet netip.Prefix) (netip.Prefix, bool) {
	for _, a := range n.owned[ident] {
		if subnet.Contains(a.Addr()) && n.cfg.Universe.Contains(a.Addr()) {
			return a, true
		}
	}
	return netip.Prefix{}, false
}

// lowestFree returns the lowest address we own, free and not held, among
// the host addresses of subnet (its first and last address excluded).
func (n *Node) lowestFree(subnet netip.Prefix) (uint32, bool) {
	s, e := ring.Bounds(subnet)
	s, e = s+1, e-1
	var found uint32
	ok := false
	for _, sp := range subtract(n.ring.OwnedBy(n.cfg.Self), n.holds) {
		c, in := clip(sp, s, e)
		if !in {
			continue
		}
		n.used.gaps(c, func(g ring.Span) bool {
			found, ok = g.Start, true
			return false
		})
		if ok {
			return found, true
		}
	}
	return 0, false
}

func (n *Node) record(ident string, p netip.Prefix) {
	a := p.Addr()
	if !slices.Contains(n.owned[ident], p) {
		n.owned[ident] = append(n.owned[ident], p)
	}
	if n.cfg.Universe.Contains(a) {
		v := ring.AddrValue(a)
		n.holder[v] = ident
		n.used.add(v)
	} else {
		n.manual[a] = ident
	}
	n.dirty = true
}

func (n *Node) forget(ident string, p netip.Prefix) {
	a := p.Addr()
	n.owned[ident] = slices.DeleteFunc(n.owned[ident], func(q netip.Prefix) bool { return q.Addr() == a })
	if len(n.owned[ident]) == 0 {
		delete(n.owned, ident)
	}
	if n.cfg.Universe.Contains(a) {
		v := ring.AddrValue(a)
		delete(n.holder, v)
		n.used.remove(v)
	} else {
		delete(n.manual, a)
	}
	n.dirty = true
}

// afterLocalChange updates our free counts in the ring after allocations
// changed. Free counts only guide whom peers ask for space, so they spread
// by anti-entropy rather than a broadcast per allocation.
func (n *Node) afterLocalChange() {
	n.dirty = true
	n.reportFree()
}

func (n *Node) reportFree() bool {
	return n.ring.ReportFree(n.cfg.Self, func(start uint32, end uint64) uint64 {
		return end - uint64(start) - n.used.count(start, end)
	})
}

func (n *Node) claimManual(r Request) Done {
	a := r.Addr.Addr()
	if other, ok := n.manual[a]; ok && other != r.Ident {
		return Done{ID: r.ID, Err: fmt.Errorf("address %v already in use by %s", r.Addr, other)}
	}
	if _, ok := n.manual[a]; !ok {
		n.cfg.Infof("Address %v claimed by %s - not in our range", r.Addr, r.Ident)
	}
	n.forget(r.Ident, r.Addr) // a new prefix length replaces the old
	n.record(r.Ident, r.Addr)
	n.rd.Manual, n.rd.ManualChanged = n.manualList(), true
	return Done{ID: r.ID, Addr: r.Addr}
}

func (n *Node) manualList() []netip.Prefix {
	out := make([]netip.Prefix, 0, len(n.manual))
	for a := range n.manual {
		for _, p := range n.owned[n.manual[a]] {
			if p.Addr() == a {
				out = append(out, p)
			}
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return out
}

// tryClaim claims an address inside the range: ours and free, or asked of
// its owner, who donates it if it is free.
func (n *Node) tryClaim(p *pending) bool {
	r := p.req
	v := ring.AddrValue(r.Addr.Addr())
	owner := n.ring.Owner(v)
	if owner == n.cfg.Self {
		if n.inHold(v) {
			return false
		}
		if id, ok := n.holder[v]; ok {
			if id == r.Ident {
				n.done(Done{ID: r.ID, Addr: r.Addr})
				return true
			}
			n.done(Done{ID: r.ID, Err: fmt.Errorf("address %v is already owned by %s", r.Addr, id)})
			return true
		}
		n.record(r.Ident, r.Addr)
		n.afterLocalChange()
		n.done(Done{ID: r.ID, Addr: r.Addr})
		return true
	}
	if owner != p.owner {
		p.owner, p.tries, p.nextAt = owner, 0, 0
	}
	if n.ticks < p.nextAt {
		return false
	}
	if p.tries >= n.cfg.ClaimTries {
		why := "no answer"
		if !n.reach[owner] {
			why = "it is unreachable"
		}
		n.failClaim(p, owner, why)
		return true
	}
	p.tries++
	p.nextAt = n.ticks + int64(n.cfg.RetryTicks)
	if n.reach[owner] {
		n.send(owner, proto.IPAMMsg{Kind: proto.IPAMSpaceRequest, Start: v, Last: v})
	}
	return false
}

func (n *Node) failClaim(p *pending, owner proto.PeerName, why string) {
	err := fmt.Errorf("address %v is owned by other peer %v - %s", p.req.Addr, owner, why)
	if p.req.ID == 0 {
		n.stats.Duplicates++
		n.cfg.Warnf("address %v of %s could not be taken back from peer %v after a merge conflict: it may be in use twice", p.req.Addr, p.req.Ident, owner)
	}
	n.done(Done{ID: p.req.ID, Err: err})
}

func (n *Node) addHold(start uint32, end uint64) {
	n.holds = append(n.holds, hold{Start: start, End: end, Until: n.ticks + int64(n.cfg.SettleTicks), acked: map[proto.PeerName]bool{}})
	slices.SortFunc(n.holds, func(a, b hold) int { return cmp.Compare(a.Start, b.Start) })
	n.dirty = true
}

// settleHolds releases the holds that have settled, and asks the peers
// that have not confirmed our ring yet to do so.
func (n *Node) settleHolds() {
	if len(n.holds) == 0 {
		return
	}
	before := len(n.holds)
	n.holds = slices.DeleteFunc(n.holds, func(h hold) bool {
		if h.Until > n.ticks {
			return false
		}
		for p := range n.reach {
			if !h.acked[p] {
				return false
			}
		}
		return true
	})
	if len(n.holds) != before {
		n.dirty = true
		n.cfg.Infof("space taken over by rmpeer is settled and in use")
		n.retry()
	}
	if len(n.holds) == 0 || n.ticks%int64(n.cfg.RetryTicks) != 0 {
		return
	}
	h := n.ring.Hash()
	for _, p := range n.reachable() {
		if slices.ContainsFunc(n.holds, func(x hold) bool { return !x.acked[p] }) {
			n.send(p, proto.IPAMMsg{Kind: proto.IPAMDigest, Hash: h, Echo: true})
		}
	}
}

func (n *Node) inHold(v uint32) bool {
	for _, h := range n.holds {
		if v >= h.Start && uint64(v) < h.End {
			return true
		}
	}
	return false
}

// askForSpace asks the next donor for space for the first waiting
// allocation, unless a request is out already.
func (n *Node) askForSpace() {
	var sub netip.Prefix
	for _, p := range n.pend {
		if p.req.Op == OpAlloc {
			sub = p.req.Subnet
			break
		}
	}
	if !sub.IsValid() || n.ring.Empty() {
		n.want = nil
		return
	}
	us, ue := ring.Bounds(n.cfg.Universe)
	s, e := ring.Bounds(sub)
	s, e = max(s, us), min(e, ue)
	if n.want == nil || n.want.start != s || n.want.end != e {
		n.want = &spaceWant{start: s, end: e, since: n.ticks, denied: map[proto.PeerName]bool{}}
	}
	if n.want.donor != 0 {
		return
	}
	for _, d := range n.ring.Donors(n.cfg.Self, s, e) {
		if n.want.denied[d] {
			continue
		}
		if !n.reach[d] && n.ticks-n.want.since < int64(n.cfg.RetryTicks) {
			// The best donor may be reachable in a moment (a peer that
			// just joined knows only its first neighbour): wait for it
			// a little, so the choice stays the deterministic one.
			return
		}
		if n.reach[d] {
			n.want.donor, n.want.sentAt = d, n.ticks
			n.send(d, proto.IPAMMsg{Kind: proto.IPAMSpaceRequest, Start: s, Last: uint32(e - 1)})
			return
		}
	}
	// Everyone said no: start over after a while (space may be freed).
	if len(n.want.denied) > 0 && n.ticks-n.want.sentAt >= int64(n.cfg.RetryTicks)*5 {
		n.want = nil
	}
}

// release frees Ident's addresses, or only r.Addr.
func (n *Node) release(r Request) Done {
	addrs := n.owned[r.Ident]
	if r.Addr.IsValid() {
		i := slices.IndexFunc(addrs, func(p netip.Prefix) bool { return p.Addr() == r.Addr.Addr() })
		if i < 0 {
			return Done{ID: r.ID, Err: fmt.Errorf("Free: address %v not found for %s", r.Addr.Addr(), r.Ident)}
		}
		addrs = addrs[i : i+1]
	} else if len(addrs) == 0 {
		// Waiting requests of this ID go too.
		cancelled := false
		n.pend = slices.DeleteFunc(n.pend, func(p *pending) bool {
			if p.req.Ident == r.Ident {
				n.done(Done{ID: p.req.ID, Err: ErrCancelled})
				cancelled = true
				return true
			}
			return false
		})
		if cancelled {
			return Done{ID: r.ID}
		}
		return Done{ID: r.ID, Err: fmt.Errorf("Delete: no addresses for %s", r.Ident)}
	}
	manual := false
	for _, p := range slices.Clone(addrs) {
		manual = manual || !n.cfg.Universe.Contains(p.Addr())
		n.forget(r.Ident, p)
	}
	if manual {
		n.rd.Manual, n.rd.ManualChanged = n.manualList(), true
	}
	n.afterLocalChange()
	n.retry()
	return Done{ID: r.ID}
}

// rmpeer takes over a dead peer's space. A reachable peer is refused: its
// space is in use.
func (n *Node) rmpeer(r Request) Done {
	switch {
	case r.Peer == 0:
		return Done{ID: r.ID, Err: errors.New("ipalloc: no peer given")}
	case r.Peer == n.cfg.Self:
		return Done{ID: r.ID, Err: errors.New("cannot remove ourselves: rmpeer takes over the space of another, dead peer")}
	case n.reach[r.Peer]:
		return Done{ID: r.ID, Err: fmt.Errorf("peer %v is connected: rmpeer is only for dead peers (stop it first)", r.Peer)}
	}
	spans := n.ring.OwnedBy(r.Peer)
	before := n.ring.Clone()
	taken := n.ring.Transfer(r.Peer, n.cfg.Self)
	if taken == 0 {
		n.cfg.Warnf("rmpeer: peer %v owns no space", r.Peer)
		return Done{ID: r.ID}
	}
	for _, s := range spans {
		n.addHold(s.Start, s.End)
	}
	n.cfg.Infof("%d IPs taken over from %v", taken, r.Peer)
	n.reportFree()
	n.broadcastSince(before)
	n.retry()
	return Done{ID: r.ID, Taken: taken}
}

// Step takes a message from a peer. On error the message was refused and
// the Node is unchanged.
func (n *Node) Step(from proto.PeerName, m *proto.IPAMMsg) error {
	if from == 0 || from == n.cfg.Self {
		return fmt.Errorf("ipalloc: message from %v", from)
	}
	switch m.Kind {
	case proto.IPAMRing:
		return n.stepRing(from, &m.Ring, m.Reply, m.Partial)
	case proto.IPAMPaxos:
		if !n.ring.Empty() {
			n.sendRing(from, false)
			return nil
		}
		if n.paxos == nil {
			return nil
		}
		if n.paxos.Update(m.Paxos) {
			if n.paxos.Think() {
				n.send(0, proto.IPAMMsg{Kind: proto.IPAMPaxos, Paxos: n.paxos.State()})
			}
			n.decide()
		}
	case proto.IPAMRingRequest:
		switch {
		case !n.ring.Empty():
			n.sendRing(from, false)
		case n.paxos != nil && !n.awaiting:
			n.establish() // an observer needs a ring: vote on its behalf
		}
	case proto.IPAMSpaceRequest:
		n.donate(from, m.Start, uint64(m.Last)+1)
	case proto.IPAMSpaceDenied:
		if n.want != nil && n.want.donor == from {
			n.want.denied[from] = true
			n.want.donor = 0
			n.retry()
		}
		for _, p := range n.pend {
			if p.req.Op == OpClaim && p.owner == from && m.Start == m.Last && ring.AddrValue(p.req.Addr.Addr()) == m.Start {
				n.pend = slices.DeleteFunc(n.pend, func(q *pending) bool { return q == p })
				n.failClaimDenied(p, from)
				break
			}
		}
	case proto.IPAMDigest:
		switch h := n.ring.Hash(); {
		case n.ring.Empty():
			// One ring will do: ask one peer at a time, not every
			// peer whose digest arrives.
			if n.ticks >= n.nextRingRequest {
				n.nextRingRequest = n.ticks + int64(n.cfg.RetryTicks)
				n.send(from, proto.IPAMMsg{Kind: proto.IPAMRingRequest})
			}
		case m.Hash != h:
			// One exchange per interval is enough for anti-entropy,
			// and bounds what a crowd of digests costs.
			if n.ticks >= n.nextExchange {
				n.nextExchange = n.ticks + int64(n.cfg.RetryTicks)
				n.sendRing(from, true)
			}
		default:
			for i := range n.holds {
				n.holds[i].acked[from] = true
			}
			if m.Echo {
				n.send(from, proto.IPAMMsg{Kind: proto.IPAMDigest, Hash: h})
			}
		}
	default:
		return fmt.Errorf("ipalloc: unknown message kind %d", m.Kind)
	}
	return nil
}

func (n *Node) failClaimDenied(p *pending, owner proto.PeerName) {
	if p.req.ID == 0 {
		n.stats.Duplicates++
		n.cfg.Warnf("address %v of %s is also allocated by peer %v after a merge conflict: it is in use twice", p.req.Addr, p.req.Ident, owner)
		n.done(Done{})
		return
	}
	n.done(Done{ID: p.req.ID, Err: fmt.Errorf("address %v is owned by other peer %v", p.req.Addr, owner)})
}

func (n *Node) stepRing(from proto.PeerName, m *proto.Ring, reply, partial bool) error {
	before := n.ownedSize()
	target := n.ring
	if partial {
		target = n.ring.Clone()
	}
	changed, err := target.Merge(m, partial)
	if err == nil && partial && n.ownedSizeIn(target) > before {
		// A partial ring never gives us space: it may lack the token
		// that ends the range (we missed an earlier change). The whole
		// ring comes with every grant; ask for it if it got lost.
		err = ring.ErrNeedWhole
	}
	if errors.Is(err, ring.ErrNeedWhole) {
		if n.ticks >= n.nextRingRequest {
			n.nextRingRequest = n.ticks + int64(n.cfg.RetryTicks)
			n.send(from, proto.IPAMMsg{Kind: proto.IPAMRingRequest})
		}
		return nil
	}
	if err != nil {
		return err
	}
	n.ring = target
	if changed {
		if n.awaiting {
			n.awaiting = false
			n.cfg.Infof("IPAM ring received from %v", from)
		}
		n.checkConflicts(from)
		n.reportFree()
		n.ringChanged()
		if before == 0 && n.ownedSize() > 0 {
			n.cfg.Infof("IPAM space received: %d addresses", n.ownedSize())
		}
		n.retry()
	}
	// Push-pull: if the sender asks and lacks what we have, send it our
	// ring (not for broadcasts, which would bring one answer per peer).
	if reply && !partial && ring.HashProto(m) != n.ring.Hash() {
		n.sendRing(from, false)
	}
	return nil
}

func (n *Node) ownedSize() uint64 { return n.ownedSizeIn(n.ring) }

func (n *Node) ownedSizeIn(r *ring.Ring) uint64 {
	var t uint64
	for _, s := range r.OwnedBy(n.cfg.Self) {
		t += s.Size()
	}
	return t
}

// checkConflicts finds our allocations in space the ring now gives to
// another peer (two peers thought they owned it): each is reported and
// asked back from the new owner as a claim, which succeeds unless that
// peer allocated the same address.
func (n *Node) checkConflicts(from proto.PeerName) {
	for _, v := range slices.Clone(n.used) {
		owner := n.ring.Owner(v)
		if owner == n.cfg.Self {
			continue
		}
		ident := n.holder[v]
		var pfx netip.Prefix
		for _, p := range n.owned[ident] {
			if p.Addr() == ring.Addr(v) {
				pfx = p
			}
		}
		n.stats.Conflicts++
		n.cfg.Warnf("IPAM merge conflict: peer %v owns %v, allocated here to %s (ring from %v); asking for it back", owner, ring.Addr(v), ident, from)
		n.forget(ident, pfx)
		n.pend = append(n.pend, &pending{req: Request{Op: OpClaim, Ident: ident, Addr: pfx}})
	}
}

// donate answers a space request for [start, end) from peer: the biggest
// aligned block of our free space there, or its upper half if it is more
// than half of what is free; or a refusal.
func (n *Node) donate(to proto.PeerName, start uint32, end uint64) {
	if n.ring.Empty() {
		return
	}
	var best ring.Span
	var free uint64
	for _, sp := range subtract(n.ring.OwnedBy(n.cfg.Self), n.holds) {
		c, in := clip(sp, start, end)
		if !in {
			continue
		}
		n.used.gaps(c, func(g ring.Span) bool {
			free += g.Size()
			if b := biggestAligned(g); b.Size() >= best.Size() {
				best = b
			}
			return true
		})
	}
	if best.Size() == 0 {
		n.send(to, proto.IPAMMsg{Kind: proto.IPAMSpaceDenied, Start: start, Last: uint32(end - 1)})
		n.sendRing(to, false)
		return
	}
	if best.Size() > free/2 {
		best.Start += uint32(best.Size() / 2)
	}
	before := n.ring.Clone()
	if err := n.ring.Grant(best.Start, best.End, n.cfg.Self, to); err != nil {
		n.cfg.Warnf("cannot donate %v-%v to %v: %v", ring.Addr(best.Start), best.End, to, err)
		return
	}
	n.stats.Donations++
	n.cfg.Infof("Donated %v-%v (%d IPs) to %v", ring.Addr(best.Start), ring.Addr(uint32(best.End-1)), best.Size(), to)
	n.reportFree()
	n.broadcastSince(before)
	n.sendRing(to, false) // whole: a partial ring never gives space
}
