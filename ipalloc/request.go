package ipalloc

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/overlayd/overlayd/internal/ipv4"
	"github.com/overlayd/overlayd/ipalloc/ring"
	"github.com/overlayd/overlayd/proto"
)

// Local requests: allocation, claims, release, rmpeer, and the holds on
// space taken over by rmpeer.

// MaxManual bounds the addresses outside the range one host holds: each
// is announced to every peer (proto.MaxPrefixes with room for exposed
// addresses).
const MaxManual = proto.MaxPrefixes - 96

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

// NoAddressesError refuses to release the addresses of an ID that holds
// none. Its text is Weave's.
type NoAddressesError struct{ Ident string }

func (e *NoAddressesError) Error() string { return "Delete: no addresses for " + e.Ident }

// NotHeldError refuses to release an address its ID does not hold. Its
// text is Weave's.
type NotHeldError struct {
	Addr  netip.Addr
	Ident string
}

func (e *NotHeldError) Error() string {
	return fmt.Sprintf("Free: address %v not found for %s", e.Addr, e.Ident)
}

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
	if n.retrying { // try can lead back here (try → establish → decide)
		n.retryAgain = true
		return
	}
	n.retrying = true
	defer func() { n.retrying = false }()
	for again := true; again; again = n.retryAgain {
		n.retryAgain = false
		if len(n.pend) == 0 {
			clear(n.wants)
			return
		}
		todo := n.pend
		n.pend = nil // requests queued meanwhile land here
		var left []*pending
		for _, claims := range []bool{true, false} {
			for _, p := range todo {
				if (p.req.Op == OpClaim) != claims {
					continue
				}
				if !n.try(p) {
					left = append(left, p)
				}
			}
		}
		n.pend = append(left, n.pend...)
		n.askForSpace()
	}
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
		if n.reclaiming(r.Ident, r.Subnet) {
			return false // the ID's address is being asked back: it keeps it
		}
		a, ok := n.lowestFree(r.Subnet)
		if !ok {
			return false
		}
		pfx := netip.PrefixFrom(ipv4.Addr(a), r.Subnet.Bits())
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

// reclaiming reports whether an address of ident in subnet is being asked
// back after a merge conflict.
func (n *Node) reclaiming(ident string, subnet netip.Prefix) bool {
	return slices.ContainsFunc(n.pend, func(p *pending) bool {
		return p.req.ID == 0 && p.req.Op == OpClaim && p.req.Ident == ident && subnet.Contains(p.req.Addr.Addr())
	})
}

// lowestFree returns the lowest address we own, free and not held, among
// the host addresses of subnet (its first and last address excluded).
func (n *Node) lowestFree(subnet netip.Prefix) (uint32, bool) {
	s, e := ipv4.Bounds(subnet)
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
		v := ipv4.Value(a)
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
		v := ipv4.Value(a)
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
		if len(n.manual) >= MaxManual {
			return Done{ID: r.ID, Err: fmt.Errorf("ipalloc: %d addresses outside the range are held here already, the most a host announces", MaxManual)}
		}
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
	v := ipv4.Value(r.Addr.Addr())
	owner := n.ring.Owner(v)
	if owner == n.cfg.Self {
		if h := n.holdAt(v); h != nil && !h.inUse {
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

// ClaimError refuses a claim of an address another peer owns: it did not
// answer or cannot be reached (Temporary: it may donate the address
// later), or it refused. Its text is Weave's.
type ClaimError struct {
	Addr      netip.Prefix
	Owner     proto.PeerName
	Why       string // "no answer", "it is unreachable"; "" when refused
	Temporary bool
}

func (e *ClaimError) Error() string {
	if e.Why == "" {
		return fmt.Sprintf("address %v is owned by other peer %v", e.Addr, e.Owner)
	}
	return fmt.Sprintf("address %v is owned by other peer %v - %s", e.Addr, e.Owner, e.Why)
}

func (n *Node) failClaim(p *pending, owner proto.PeerName, why string) {
	err := &ClaimError{Addr: p.req.Addr, Owner: owner, Why: why, Temporary: true}
	if p.req.ID == 0 {
		n.stats.Duplicates++
		n.cfg.Warnf("address %v of %s could not be taken back from peer %v after a merge conflict: given up here", p.req.Addr, p.req.Ident, owner)
		n.lose(Lost{Ident: p.req.Ident, Addr: p.req.Addr, Owner: owner})
	}
	n.done(Done{ID: p.req.ID, Err: err})
}

func (n *Node) addHold(start uint32, end uint64, inUse bool) {
	n.holds = append(n.holds, hold{Start: start, End: end, Until: n.ticks + int64(n.cfg.SettleTicks), inUse: inUse, acked: map[proto.PeerName]bool{}})
	slices.SortFunc(n.holds, func(a, b hold) int { return cmp.Compare(a.Start, b.Start) })
	n.dirty = true
}

// settleHolds releases the holds that every confirmer has confirmed, puts
// in use those that have waited MaxHoldTicks, and asks the peers that have
// not confirmed our ring yet to do so.
func (n *Node) settleHolds() {
	if len(n.holds) == 0 {
		return
	}
	changed := false
	kept := n.holds[:0]
	for _, h := range n.holds {
		if h.Until > n.ticks {
			kept = append(kept, h)
			continue
		}
		var missing []proto.PeerName
		for _, p := range n.confirmers() {
			if !h.acked[p] {
				missing = append(missing, p)
			}
		}
		if len(missing) == 0 {
			changed = true
			continue
		}
		if !h.inUse && n.ticks-h.Until >= int64(n.cfg.MaxHoldTicks) {
			n.cfg.Warnf("space %v-%v taken over by rmpeer is used although %v have not confirmed who owns it (unreachable, a different ring, or too busy): if one of them took it over too, the ring's order picks one owner when they meet, and addresses allocated on both sides are reported as duplicates",
				ipv4.Addr(h.Start), ipv4.Addr(uint32(h.End-1)), missing)
			h.inUse, changed = true, true
		}
		kept = append(kept, h)
	}
	clear(n.holds[len(kept):])
	n.holds = kept
	if changed {
		n.dirty = true
		n.cfg.Infof("space taken over by rmpeer is settled and in use")
		n.retry()
	}
	if len(n.holds) == 0 || n.ticks%int64(n.cfg.RetryTicks) != 0 {
		return
	}
	for _, h := range n.holds {
		check := proto.IPAMMsg{Kind: proto.IPAMHoldCheck, Start: h.Start, Last: uint32(h.End - 1), Hash: n.ring.HashSpan(h.Start, h.End)}
		for _, p := range n.reachable() {
			if !h.acked[p] {
				n.send(p, check)
			}
		}
	}
}

// confirmers are the peers that must confirm who owns held space: those
// we reach, and those that own space (one behind a partition may have run
// rmpeer for the same peer; it is waited for, up to MaxHoldTicks).
func (n *Node) confirmers() []proto.PeerName {
	ps := n.reachable()
	for _, p := range n.ring.Peers() {
		if p != n.cfg.Self && !n.reach[p] {
			ps = append(ps, p)
		}
	}
	return ps
}

// release frees Ident's addresses, or only r.Addr.
func (n *Node) release(r Request) Done {
	addrs := n.owned[r.Ident]
	if r.Addr.IsValid() {
		i := slices.IndexFunc(addrs, func(p netip.Prefix) bool { return p.Addr() == r.Addr.Addr() })
		if i < 0 {
			return Done{ID: r.ID, Err: &NotHeldError{Addr: r.Addr.Addr(), Ident: r.Ident}}
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
		return Done{ID: r.ID, Err: &NoAddressesError{Ident: r.Ident}}
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
		n.addHold(s.Start, s.End, false)
		n.taken = append(n.taken, takeover{Start: s.Start, End: s.End, From: r.Peer})
	}
	if k := len(n.taken) - maxTakeovers; k > 0 {
		n.taken = slices.Delete(n.taken, 0, k)
	}
	n.cfg.Infof("%d IPs taken over from %v", taken, r.Peer)
	n.reportFree()
	n.broadcastSince(before)
	n.retry()
	return Done{ID: r.ID, Taken: taken}
}
