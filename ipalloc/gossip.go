package ipalloc

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/overlayd/overlayd/internal/ipv4"
	"github.com/overlayd/overlayd/ipalloc/ring"
	"github.com/overlayd/overlayd/proto"
)

// Peer messages: consensus, ring merges and their conflicts, space
// requests and donation, anti-entropy.

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

// askForSpace asks, for each subnet that waiting allocations need, the
// next donor for space there, unless a request for it is out already.
func (n *Node) askForSpace() {
	if n.ring.Empty() {
		clear(n.wants)
		return
	}
	live := map[wantKey]bool{}
	us, ue := ipv4.Bounds(n.cfg.Universe)
	for _, p := range n.pend {
		if p.req.Op != OpAlloc {
			continue
		}
		s, e := ipv4.Bounds(p.req.Subnet)
		k := wantKey{start: max(s, us), end: min(e, ue)}
		if !live[k] {
			live[k] = true
			n.ask(k)
		}
	}
	for k := range n.wants {
		if !live[k] {
			delete(n.wants, k)
		}
	}
}

// ask sends the space request for k to the best donor that has not
// refused it yet.
func (n *Node) ask(k wantKey) {
	w := n.wants[k]
	if w == nil {
		w = &spaceWant{since: n.ticks, denied: map[proto.PeerName]bool{}}
		n.wants[k] = w
	}
	if w.donor != 0 {
		return
	}
	for _, d := range n.ring.Donors(n.cfg.Self, k.start, k.end) {
		if w.denied[d] {
			continue
		}
		if !n.reach[d] && n.ticks-w.since < int64(n.cfg.RetryTicks) {
			// The best donor may be reachable in a moment (a peer that
			// just joined knows only its first neighbour): wait for it
			// a little, so the choice stays the deterministic one.
			return
		}
		if n.reach[d] {
			w.donor, w.sentAt = d, n.ticks
			n.send(d, proto.IPAMMsg{Kind: proto.IPAMSpaceRequest, Start: k.start, Last: uint32(k.end - 1)})
			return
		}
	}
	// Everyone said no: start over after a while (space may be freed).
	if len(w.denied) > 0 && n.ticks-w.sentAt >= int64(n.cfg.RetryTicks)*5 {
		delete(n.wants, k)
	}
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
		if w := n.wants[wantKey{m.Start, uint64(m.Last) + 1}]; w != nil && w.donor == from {
			w.denied[from] = true
			w.donor = 0
		}
		// A claim fails only if the address is still the peer's: the
		// ring that comes before a refusal may show it was given to us
		// by an earlier answer.
		// Under loss, the answer that gave it to us may be lost while a
		// repeat is refused: ask once more before giving up.
		for _, p := range n.pend {
			if p.req.Op == OpClaim && p.owner == from && m.Start == m.Last && ipv4.Value(p.req.Addr.Addr()) == m.Start &&
				n.ring.Owner(m.Start) == from {
				p.denials++
				if p.denials >= 2 {
					n.pend = slices.DeleteFunc(n.pend, func(q *pending) bool { return q == p })
					n.failClaimDenied(p, from)
				} else {
					p.nextAt = n.ticks // ask again at once
				}
				break
			}
		}
		n.retry()
	case proto.IPAMHoldCheck:
		switch {
		case n.ring.Empty():
		case n.ring.HashSpan(m.Start, uint64(m.Last)+1) == m.Hash:
			n.send(from, proto.IPAMMsg{Kind: proto.IPAMHoldAck, Start: m.Start, Last: m.Last, Hash: m.Hash})
		case n.ticks >= n.nextExchange:
			n.nextExchange = n.ticks + int64(n.cfg.RetryTicks)
			n.sendRing(from, true) // we differ: exchange rings
		}
	case proto.IPAMHoldAck:
		for i := range n.holds {
			h := &n.holds[i]
			if h.Start == m.Start && h.End == uint64(m.Last)+1 && n.ring.HashSpan(h.Start, h.End) == m.Hash {
				h.acked[from] = true
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
		n.cfg.Warnf("address %v of %s is also allocated by peer %v after a merge conflict: given up here", p.req.Addr, p.req.Ident, owner)
		n.lose(Lost{Ident: p.req.Ident, Addr: p.req.Addr, Owner: owner, Held: true})
		n.done(Done{})
		return
	}
	n.done(Done{ID: p.req.ID, Err: &ClaimError{Addr: p.req.Addr, Owner: owner}})
}

func (n *Node) stepRing(from proto.PeerName, m *proto.Ring, reply, partial bool) error {
	before := n.ownedSize()
	if k := ring.AtLimit(m); k > 0 {
		n.stats.AtLimit += uint64(k)
		n.cfg.Warnf("ring from %v: %d entries at the version limit, which no honest peer reaches; not merged", from, k)
	}
	target := n.ring
	if partial {
		target = n.ring.Clone()
	}
	var authors []proto.PeerName   // of the changes refused: who may make them
	var reassert []proto.RingEntry // our space the sender took over
	changed, refused, err := target.MergeAllowed(m, partial, func(c ring.Change) bool {
		ok, author := n.mayChange(from, c)
		switch {
		case ok:
		case c.Old.Peer == n.cfg.Self && c.New.Peer == from && !c.Split &&
			c.New.Version > c.Old.Version+ring.TransferBump/2 && c.New.Version <= c.Old.Version+maxReassertJump:
			reassert = append(reassert, c.New) // shaped as a takeover: see reassert
		case author != 0 && len(authors) < maxAskAuthors && !slices.Contains(authors, author):
			authors = append(authors, author)
		}
		return ok
	})
	if err == nil && refused > 0 {
		n.stats.NotOwner += uint64(refused)
		n.cfg.Infof("ring from %v: %d entries move space that the sender may not move; skipped", from, refused)
		n.askAuthors(authors)
	}
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
	if len(reassert) > 0 {
		n.reassert(from, reassert)
	}
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

// maxAskAuthors bounds the peers asked for their rings after one refusal.
const maxAskAuthors = 16

// mayChange says whether a ring from peer `from` may make change c, as the
// owner of the space could:
//
//   - the owner changes its own entries and gives its space away (a grant);
//   - another peer's entries change only in a ring from that peer, while we
//     reach it (a relay's copy may be stale or forged: we ask the owner);
//     those of a peer we cannot reach come from whoever has them, as they
//     cannot come from it;
//   - space moves to another peer by a grant of its owner, or by a takeover
//     (rmpeer) sent by the new owner of the space of a peer we cannot
//     reach;
//   - our own space moves only where we took it over by rmpeer: in a ring
//     from the peer it moves to (see retake), or, while not every peer has
//     confirmed the takeover, as a new token older than the takeover (a
//     grant the dead peer made before it died).
//
// A refused change names the peer to ask for its ring instead (0: none).
//
// Without signatures `from` is only the name the message came under: a
// direct neighbour cannot send under another connected peer's name
// (link.ErrImpostor), but a relay can, and anyone can speak for a peer that
// is gone. With a password it is the peer that signed the message.
func (n *Node) mayChange(from proto.PeerName, c ring.Change) (ok bool, author proto.PeerName) {
	switch {
	case from == c.Old.Peer:
		return true, 0
	case c.Old.Peer == n.cfg.Self:
		return n.retake(from, c)
	case !c.Moves() && !n.reach[c.Old.Peer]:
		return true, 0
	case !c.Moves():
		return false, c.Old.Peer
	case from == c.New.Peer && !n.reach[c.Old.Peer]:
		return true, 0
	case n.reach[c.Old.Peer]:
		return false, c.Old.Peer
	case n.reach[c.New.Peer]:
		return false, c.New.Peer
	}
	return false, 0
}

// retake says whether a ring from peer `from` may take the token of change
// c from our space, and whom to ask if not. Where we took the space over
// from `from` by rmpeer, it may win it back: rmpeer was run for a peer
// that was only cut off, and it answers with its ring at a higher version
// (see reassert). While a takeover of ours is not confirmed by every peer
// (a hold), another peer that took over the same dead peer at the same
// time wins it if the ring's order says so, and a grant the dead peer made
// before it died shows as a new token of its grantee, older than our
// takeover: it may reach us through a third peer only, its grantee never
// having heard of it (the dead peer's message to it was lost). No move may
// jump the version further than a takeover does, so that no one can push
// ours to the limit this way.
func (n *Node) retake(from proto.PeerName, c ring.Change) (ok bool, author proto.PeerName) {
	a := c.New.Token
	held := n.holdAt(a) != nil
	switch {
	case from == c.New.Peer && n.takenFrom(a) == from:
		return c.New.Version <= c.Old.Version+ring.TransferBump, 0
	case from == c.New.Peer && held:
		return c.New.Version <= c.Old.Version+ring.TransferBump/2, 0
	case held && c.Split && c.Moves() && c.New.Version+ring.TransferBump/2 < c.Old.Version:
		return true, 0
	case held && n.reach[c.New.Peer]:
		return false, c.New.Peer // a relay's copy: ask the peer it names
	}
	return false, 0
}

// takenFrom returns the peer we last took token a over from by rmpeer, or 0.
func (n *Node) takenFrom(a uint32) proto.PeerName {
	for _, t := range slices.Backward(n.taken) {
		if a >= t.Start && uint64(a) < t.End {
			return t.From
		}
	}
	return 0
}

// reassert answers a takeover of our space by a live peer (rmpeer run for
// us while that peer could not reach us): our entries are raised above
// its own, so that it yields (it took the space from us: see retake) and
// every peer keeps ours. Only a change shaped as a takeover (a jump of at
// least half ring.TransferBump on an existing token, and not more than
// maxReassertJump) is answered, at most once per retry interval, so that
// no one can drive our versions to the limit quickly or split our ranges.
func (n *Node) reassert(from proto.PeerName, es []proto.RingEntry) {
	if n.ticks < n.nextReassert {
		return
	}
	n.nextReassert = n.ticks + int64(n.cfg.RetryTicks)
	before := n.ring.Clone()
	k := 0
	for _, e := range es {
		if ok, err := n.ring.Reassert(n.cfg.Self, e.Token, e.Version); ok && err == nil {
			k++
		}
	}
	if k == 0 {
		return
	}
	n.cfg.Warnf("peer %v took over %d ranges of ours (rmpeer while it could not reach us?); kept, and announced at a higher version", from, k)
	n.reportFree()
	n.broadcastSince(before)
}

// maxReassertJump is the largest version jump that reassert answers: a
// takeover adds ring.TransferBump to the version it saw, and its new owner
// may have changed the entries since.
const maxReassertJump = 10 * ring.TransferBump

// holdAt returns the hold over address or token a, or nil.
func (n *Node) holdAt(a uint32) *hold {
	for i := range n.holds {
		if h := &n.holds[i]; a >= h.Start && uint64(a) < h.End {
			return h
		}
	}
	return nil
}

// askAuthors asks the peers that may make changes we refused from a relay
// for their rings (at most once per retry interval): anti-entropy with a
// third peer cannot bring them.
func (n *Node) askAuthors(authors []proto.PeerName) {
	if len(authors) == 0 || n.ticks < n.nextAuthorAsk {
		return
	}
	n.nextAuthorAsk = n.ticks + int64(n.cfg.RetryTicks)
	for _, a := range authors {
		n.send(a, proto.IPAMMsg{Kind: proto.IPAMRingRequest})
	}
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
			if p.Addr() == ipv4.Addr(v) {
				pfx = p
			}
		}
		n.stats.Conflicts++
		n.cfg.Warnf("IPAM merge conflict: peer %v owns %v, allocated here to %s (ring from %v); asking for it back", owner, ipv4.Addr(v), ident, from)
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
	spans := n.ring.OwnedBy(n.cfg.Self)
	if end-uint64(start) > 1 {
		// Space taken over by rmpeer is not given away before it settles;
		// a single address is (it is a claim, maybe of an address that
		// the other side of a conflict had allocated).
		spans = subtract(spans, n.holds)
	}
	for _, sp := range spans {
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
		n.sendRing(to, false)
		if end-uint64(start) == 1 && n.ring.Owner(start) == to {
			return // we gave it already (that answer was lost): the ring says so
		}
		n.send(to, proto.IPAMMsg{Kind: proto.IPAMSpaceDenied, Start: start, Last: uint32(end - 1)})
		return
	}
	if best.Size() > free/2 {
		best.Start += uint32(best.Size() / 2)
	}
	before := n.ring.Clone()
	if err := n.ring.Grant(best.Start, best.End, n.cfg.Self, to); err != nil {
		n.cfg.Warnf("cannot donate %v-%v to %v: %v", ipv4.Addr(best.Start), best.End, to, err)
		return
	}
	n.stats.Donations++
	n.cfg.Infof("Donated %v-%v (%d IPs) to %v", ipv4.Addr(best.Start), ipv4.Addr(uint32(best.End-1)), best.Size(), to)
	n.reportFree()
	n.broadcastSince(before)
	n.sendRing(to, false) // whole: a partial ring never gives space
}
