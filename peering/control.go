package peering

import (
	"cmp"
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/peering/conn"
	"github.com/overlayd/overlayd/peering/gossip"
	"github.com/overlayd/overlayd/peering/handshake"
	"github.com/overlayd/overlayd/peering/link"
	"github.com/overlayd/overlayd/peering/routes"
	"github.com/overlayd/overlayd/peering/secure"
	"github.com/overlayd/overlayd/peering/topology"
	"github.com/overlayd/overlayd/proto"
)

// inbound is a control datagram copied out of the receive path.
type inbound struct {
	from conn.Endpoint
	msg  []byte // owned by the control loop
}

// request runs fn on the control loop; done is closed afterwards.
type request struct {
	fn   func(*control)
	done chan struct{}
}

// resolution is the result of looking up a target's host name.
type resolution struct {
	key string
	gen int
	ep  netip.AddrPort
	err error
}

// control is the shell around the link Machine: it owns it on one goroutine,
// feeds it datagrams, ticks and requests, and carries out its Ready: sends,
// host name lookups, log lines and new routing snapshots. It decides nothing.
type control struct {
	r    *Router
	log  *zap.Logger
	m    *link.Machine
	topo *topology.Node
	asm  *gossip.Assembler
	send conn.Sender
	bufs [][]byte

	neighbours map[proto.PeerName]link.PeerPath // established, from the link Machine
	local      []netip.Prefix                   // prefixes we serve
	owners     []Owner                          // the allocator's ring: who owns which part of the range
	msgID      uint32                           // of our last chunked gossip message
	ticks      int64
	out        []outMsg   // scratch for sendOutboxes
	outTurn    int        // the channel sendOutboxes starts with
	refused    int        // announced prefixes the route table left out
	programmed []DataPeer // what the data plane was last given
}

func newControl(r *Router, m *link.Machine, topo *topology.Node) *control {
	return &control{r: r, log: r.log, m: m, topo: topo, asm: gossip.NewAssembler(), send: r.pc.NewSender(64), bufs: make([][]byte, 1),
		neighbours: map[proto.PeerName]link.PeerPath{}}
}

func (c *control) run(ctx context.Context) error {
	tick := time.NewTicker(c.r.cfg.TickEvery)
	defer tick.Stop()
	for {
		c.apply(ctx)
		// A datagram of an established peer first (see peerQueueLen),
		// then whatever is ready: the ticks go on under any flood.
		select {
		case in := <-c.r.peerCtrl:
			c.step(in)
		default:
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
			c.m.Tick()
			c.ticks++
			if c.ticks%int64(c.r.gossipTicks) == 0 {
				c.topo.Tick()
				c.asm.Expire(c.ticks / int64(c.r.gossipTicks))
				c.discover()
			}
		case in := <-c.r.peerCtrl:
			c.step(in)
		case in := <-c.r.ctrl:
			c.step(in)
		case req := <-c.r.requests:
			c.takePending() // what the caller set before is in place
			req.fn(c)
			close(req.done)
		case <-c.r.wake:
			c.takePending()
			c.sendOutboxes()
		case res := <-c.r.resolved:
			c.m.Resolved(res.key, res.gen, res.ep, res.err)
		}
	}
}

// step hands the link Machine one control datagram, and counts what it
// refused.
func (c *control) step(in inbound) {
	err := c.m.Step(link.Endpoint(in.from), in.msg)
	switch {
	case err == nil:
	case errors.Is(err, link.ErrImpostor):
		c.r.stats.GossipRejected.Add(1)
		c.log.Warn("gossip refused", zap.Stringer("endpoint", in.from.Remote), zap.Error(err))
	case errors.Is(err, link.ErrStranger):
		c.r.stats.DropUnknownPeer.Add(1)
	case errors.Is(err, link.ErrRefused):
		// counted by the Machine, by reason
		c.log.Debug("password mode refused a message", zap.Stringer("endpoint", in.from.Remote), zap.Error(err))
	default:
		c.r.stats.malformed(proto.Type(in.msg[1])) // the header was checked
	}
}

// takePending puts in place the latest SetLocal and SetOwners.
func (c *control) takePending() {
	c.r.pendMu.Lock()
	local, owners := c.r.pendLocal, c.r.pendOwners
	c.r.pendLocal, c.r.pendOwners = nil, nil
	c.r.pendMu.Unlock()
	if local != nil {
		c.local = local
		c.setLocal()
	}
	if owners != nil {
		c.owners = owners
		c.publish()
	}
}

// do runs fn on the control loop and waits for it.
func (r *Router) do(ctx context.Context, fn func(*control)) error {
	req := request{fn: fn, done: make(chan struct{})}
	select {
	case r.requests <- req:
	case <-ctx.Done():
		return ctx.Err()
	case <-r.stopped:
		return ErrStopped
	}
	<-req.done
	return nil
}

// apply carries out what the link Machine and the topology Node decided,
// until neither has anything left.
func (c *control) apply(ctx context.Context) {
	for range 16 {
		worked := c.applyLink(ctx)
		if c.applyTopology() {
			worked = true
		}
		if !worked {
			return
		}
	}
}

func (c *control) applyLink(ctx context.Context) bool {
	rd := c.m.Ready()
	if rd.Empty() {
		return false
	}
	if rd.Routing != nil {
		c.neighbours = make(map[proto.PeerName]link.PeerPath, len(rd.Routing.Peers))
		keys := map[proto.PeerName][proto.TopoKeyLen]byte{}
		for _, p := range rd.Routing.Peers {
			c.neighbours[p.Name] = p
			if p.SignKey != ([proto.TopoKeyLen]byte{}) {
				keys[p.Name] = p.SignKey
			}
		}
		c.topo.Prove(keys) // before setLocal: entries under other keys go first
		c.setLocal()
		c.publish() // endpoints may have changed even where the topology did not
	}
	for _, g := range rd.Gossip {
		c.onGossip(g)
	}
	for _, d := range rd.Sends {
		c.bufs[0] = d.Msg
		if _, err := c.send.Send(c.bufs, conn.Endpoint(d.To)); err != nil {
			c.log.Debug("sending control message", zap.Stringer("endpoint", d.To.Remote), zap.Error(err))
		}
	}
	c.bufs[0] = nil
	for _, q := range rd.Resolve {
		c.resolve(ctx, q)
	}
	for _, e := range rd.Events {
		c.logEvent(e)
	}
	c.m.Advance()
	return true
}

// setLocal tells the topology our connections and prefixes.
func (c *control) setLocal() {
	conns := make([]proto.TopoConn, 0, len(c.neighbours))
	for _, p := range c.neighbours {
		conns = append(conns, proto.TopoConn{Peer: p.Name, Addr: p.Via.Remote, Outbound: p.Outbound, Established: true,
			Key: p.SignKey}) // vouched for in signed entries
	}
	c.topo.SetLocal(conns, c.local)
}

func (c *control) applyTopology() bool {
	rd := c.topo.Ready()
	if len(rd.Msgs) == 0 && !rd.Changed && len(rd.Removed) == 0 {
		return false
	}
	c.topo.Advance()
	for _, m := range rd.Msgs {
		c.sendTopology(m)
	}
	for _, name := range rd.Removed {
		c.log.Info("removed unreachable peer", zap.Stringer("peer", name))
	}
	if rd.Changed || len(rd.Removed) > 0 {
		c.publish()
	}
	return true
}

// sendTopology encodes a topology message for a neighbour.
func (c *control) sendTopology(m topology.Msg) {
	if _, ok := c.neighbours[m.To]; !ok {
		return // gone meanwhile
	}
	payload, err := proto.AppendTopoMsg(nil, &m.Msg)
	if err != nil {
		c.log.Error("cannot encode topology", zap.Error(err))
		return
	}
	c.unicast(proto.ChannelTopology, m.To, payload)
}

// unicast sends payload on channel to peer dst: straight to it if it is a
// neighbour, else to the first hop of the shortest path, which relays it.
// A payload that does not fit in one datagram goes in chunks, each relayed
// on its own and put back together by dst. In password mode the payload of
// a channel other than topology ends with our signature (see verified).
// It reports false if dst is unreachable.
func (c *control) unicast(channel string, dst proto.PeerName, payload []byte) bool {
	if k := c.r.cfg.Signing; k != nil && channel != proto.ChannelTopology {
		sig := k.Sign(proto.GossipSigned(channel, c.r.cfg.Name, dst, payload))
		payload = append(slices.Clip(payload), sig[:]...)
	}
	if len(payload) > gossip.MaxMessageBytes {
		c.log.Error("gossip message too large to send", zap.String("kind", channel), zap.Int("bytes", len(payload)))
		return false
	}
	var via conn.Endpoint
	var ok bool
	if nb, found := c.neighbours[dst]; found {
		via = conn.Endpoint(nb.Via)
	} else if p := c.r.snap.Load().byName[dst]; p != nil {
		via = p.ep
	} else {
		return false
	}
	g := proto.Gossip{Channel: channel, Src: c.r.cfg.Name, Dst: dst}
	pieces := gossip.Split(payload)
	if len(pieces) > 1 {
		c.msgID++
	}
	dgrams := make([][]byte, 0, len(pieces))
	for i, piece := range pieces {
		g.Payload, g.Chunk = piece, nil
		if len(pieces) > 1 {
			g.Chunk = &proto.Chunk{MsgID: c.msgID, Index: uint16(i), Count: uint16(len(pieces))}
		}
		b, err := proto.AppendGossip(nil, &g)
		if err != nil {
			c.log.Error("cannot encode gossip", zap.Error(err))
			return false
		}
		if b, ok = c.m.Seal(link.Endpoint(via), b); !ok {
			return false
		}
		dgrams = append(dgrams, b)
		if channel == proto.ChannelTopology {
			c.r.stats.GossipSentBytes.Add(uint64(len(b)))
		} else {
			c.r.stats.OtherSentBytes.Add(uint64(len(b)))
		}
	}
	if _, err := c.send.Send(dgrams, via); err != nil {
		c.log.Debug("sending gossip", zap.Stringer("peer", dst), zap.Error(err))
	}
	return true
}

// onGossip takes a gossip message the link Machine checked: relays it if it
// is for another peer, else puts chunks together and hands the message to
// its channel.
func (c *control) onGossip(g link.Gossip) {
	if g.Msg.Channel == proto.ChannelTopology {
		c.r.stats.GossipReceivedBytes.Add(uint64(len(g.Msg.Payload)))
	} else {
		c.r.stats.OtherReceivedBytes.Add(uint64(len(g.Msg.Payload)))
	}
	self := c.r.cfg.Name
	if g.Msg.Dst != self {
		c.relayGossip(g)
		return
	}
	handler, known := c.r.cfg.Channels[g.Msg.Channel]
	if g.Msg.Channel == proto.ChannelTopology {
		if g.Msg.Hops != 0 {
			c.r.stats.GossipRejected.Add(1)
			return // topology only travels between neighbours
		}
	} else if !known {
		c.r.stats.GossipUnknownChannel.Add(1)
		c.log.Debug("gossip on an unknown channel", zap.String("kind", g.Msg.Channel), zap.Stringer("peer", g.From))
		return
	}
	payload := g.Msg.Payload
	if g.Msg.Chunk != nil {
		full, err := c.asm.Add(&g.Msg, g.From, c.ticks/int64(c.r.gossipTicks))
		if err != nil {
			c.r.stats.GossipRejected.Add(1)
			c.log.Warn("gossip chunk refused", zap.Stringer("peer", g.Msg.Src), zap.Error(err))
			return
		}
		if full == nil {
			return
		}
		payload = full
	}
	if g.Msg.Channel != proto.ChannelTopology {
		if c.r.cfg.Signing != nil {
			if payload = c.verified(&g.Msg, payload); payload == nil {
				return
			}
		}
		handler(g.Msg.Src, payload)
		return
	}
	msg, err := proto.ParseTopoMsg(payload)
	if err != nil {
		c.r.stats.GossipRejected.Add(1)
		c.log.Warn("topology message refused", zap.Stringer("peer", g.From), zap.Error(err))
		return
	}
	if err := c.topo.Step(g.From, g.FromUID, &msg); err != nil {
		c.r.stats.GossipRejected.Add(1)
		c.log.Warn("topology entries refused", zap.Stringer("peer", g.From), zap.Error(err))
	}
}

// verified returns payload without its signature if its origin signed it
// (password mode), else nil, counted: a relay can then neither forge a
// message of another peer nor redirect one. A message whose origin's key
// is not known yet is dropped too; its origin sends again.
func (c *control) verified(g *proto.Gossip, payload []byte) []byte {
	key, known := c.r.snap.Load().keys[g.Src]
	n := len(payload) - proto.GossipSigLen
	if !known || n < 0 || !ed25519.Verify(key[:], proto.GossipSigned(g.Channel, g.Src, g.Dst, payload[:n]), payload[n:]) {
		c.r.stats.GossipUnsigned.Add(1)
		c.log.Debug("gossip not signed by its origin", zap.String("kind", g.Channel), zap.Stringer("peer", g.Src), zap.Bool("key_known", known))
		return nil
	}
	return payload[:n]
}

// relayGossip passes on unicast gossip for another peer, one hop closer.
func (c *control) relayGossip(g link.Gossip) {
	p := c.r.snap.Load().byName[g.Msg.Dst]
	switch {
	case g.Msg.Dst == 0 || p == nil:
		c.r.stats.DropUnroutable.Add(1)
		return
	case g.Msg.Hops >= MaxHops:
		c.r.stats.DropHops.Add(1)
		return
	}
	m := g.Msg
	m.Hops++
	b, err := proto.AppendGossip(nil, &m)
	if err != nil {
		c.r.stats.GossipRejected.Add(1)
		return
	}
	if b, ok := c.m.Seal(link.Endpoint(p.ep), b); ok {
		c.bufs[0] = b
	} else {
		c.r.stats.DropUnroutable.Add(1)
		return
	}
	if _, err := c.send.Send(c.bufs, p.ep); err != nil {
		c.log.Debug("relaying gossip", zap.Stringer("peer", m.Dst), zap.Error(err))
	}
	c.bufs[0] = nil
	c.r.stats.GossipRelayed.Add(1)
}

// discover hands the link Machine the peers worth dialling.
func (c *control) discover() {
	if !c.r.cfg.Discovery {
		return
	}
	cands := topology.Discover(c.topo.Candidates(), len(c.neighbours), c.topo.Len(), c.r.cfg.ConnLimit, c.r.cfg.Rand)
	addrs := make([]netip.AddrPort, len(cands))
	for i, cd := range cands {
		addrs[i] = cd.Addr
	}
	c.m.Discovered(addrs)
}

// resolve looks up a target's host name on a goroutine of its own and hands
// the answer back to the control loop.
func (c *control) resolve(ctx context.Context, q link.Resolve) {
	c.r.bg.Go(func() {
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		res := resolution{key: q.Target, gen: q.Gen}
		addrs, err := net.DefaultResolver.LookupNetIP(lctx, "ip", q.Host)
		switch {
		case err != nil:
			res.err = err
		case len(addrs) == 0:
			res.err = fmt.Errorf("no address for %s", q.Host)
		default:
			// Prefer IPv4: the MTU is computed for an IPv4 underlay.
			a := addrs[0].Unmap()
			for _, x := range addrs {
				if x.Unmap().Is4() {
					a = x.Unmap()
					break
				}
			}
			res.ep = netip.AddrPortFrom(a, q.Port)
		}
		select {
		case c.r.resolved <- res:
		case <-ctx.Done():
		}
	})
}

// logEvent logs what the Machine reports. Refusals carry the error's text
// as the message, so Weave's operator texts appear verbatim (not quoted in
// a field); a range mismatch is an error: the cluster is misconfigured.
func (c *control) logEvent(e link.Event) {
	fields := make([]zap.Field, 0, 5)
	if e.Peer != 0 {
		fields = append(fields, zap.Stringer("peer", e.Peer))
	}
	if e.Nick != "" {
		fields = append(fields, zap.String("nick", e.Nick))
	}
	if e.Endpoint != "" {
		fields = append(fields, zap.String("endpoint", e.Endpoint))
	}
	switch e.Kind {
	case link.EventEstablished:
		c.log.Info("connection established", fields...)
	case link.EventLost:
		c.log.Info("connection lost", append(fields, zap.Error(e.Err))...)
	case link.EventRefused:
		var (
			re *handshake.RangeError
			ce *handshake.CollisionError
			ve *handshake.VersionError
		)
		switch {
		case errors.As(e.Err, &re):
			// Weave's line, made of two parsed prefixes.
			c.log.Error(e.Err.Error(), fields...)
		case errors.As(e.Err, &ce), errors.As(e.Err, &ve):
			// Weave's lines, the peer's words quoted (%q) or numbers.
			c.log.Warn(e.Err.Error(), fields...)
		default:
			// The reason may carry the peer's own words: a field, not
			// the message.
			c.log.Warn("connection refused", append(fields, zap.Error(e.Err))...)
		}
	case link.EventRestarted:
		c.log.Info("peer restarted", fields...)
	case link.EventTargetAdded:
		c.log.Info("target added", fields...)
	case link.EventTargetForgotten:
		c.log.Info("target forgotten", fields...)
	case link.EventRetry:
		c.log.Debug("will retry", append(fields, zap.Duration("in", c.r.ticks(e.RetryTicks)), zap.Error(e.Err))...)
	}
}

// publish swaps in a new snapshot for the data path: every prefix a known
// peer serves, sent towards it through the first hop of its shortest path;
// our own prefixes are local.
func (c *control) publish() {
	self := c.r.cfg.Name
	hops := c.topo.Routes()
	for name := range c.neighbours {
		if _, ok := hops[name]; !ok {
			hops[name] = name // connected, but its entry has not arrived yet
		}
	}
	snap := &snapshot{peers: make(map[netip.AddrPort]*path, len(c.neighbours)), byName: map[proto.PeerName]*path{}}
	for name, nb := range c.neighbours {
		snap.peers[nb.Via.Remote] = &path{name: name, hop: name, ep: conn.Endpoint(nb.Via), plain: nb.Plaintext}
	}
	for dest, hop := range hops {
		nb, ok := c.neighbours[hop]
		if !ok {
			continue
		}
		snap.byName[dest] = &path{name: dest, hop: hop, ep: conn.Endpoint(nb.Via), relayed: dest != hop, plain: nb.Plaintext}
	}
	src := routes.Sources[proto.PeerName, *path]{
		Self: self, Local: c.local, Owners: c.owners, Here: &path{name: self, local: true},
		Path: func(p proto.PeerName) (*path, bool) { v := snap.byName[p]; return v, v != nil },
	}
	snap.nicks = map[proto.PeerName]string{}
	if c.r.cfg.Signing != nil {
		snap.keys = map[proto.PeerName][proto.TopoKeyLen]byte{}
		for _, e := range c.topo.Peers() {
			if k, ok := c.topo.KeyOf(e.Name); ok {
				snap.keys[e.Name] = k
			}
		}
		for name := range c.neighbours {
			if k, ok := c.topo.KeyOf(name); ok {
				snap.keys[name] = k
			}
		}
	}
	for _, e := range c.topo.Peers() {
		if e.Name == self || snap.byName[e.Name] == nil {
			continue
		}
		snap.nicks[e.Name] = e.Nickname
		src.Announced = append(src.Announced, routes.Announcement[proto.PeerName]{Peer: e.Name, Prefixes: e.Prefixes})
	}
	snap.routes = routes.Build(src)
	if n := snap.routes.Refused; n != c.refused {
		if n > 0 {
			c.log.Warn("announced addresses refused: they lie in ring space another peer owns", zap.Int("refused", n))
		}
		c.refused = n
	}
	c.r.snap.Store(snap)
	if c.r.cfg.DataPlane != nil {
		c.program(snap.routes)
	}
}

// program hands the data plane its peers, when they changed: every
// neighbour whose handshake gave a key and a data port, with the prefixes
// whose first hop it is. Relayed traffic is therefore encrypted hop by hop:
// the relay decrypts it, and its kernel routes it back into the plane for
// the next hop (WireGuard has no notion of a relay).
func (c *control) program(rt *routes.Table[*path]) {
	byHop := map[proto.PeerName][]netip.Prefix{}
	for _, r := range rt.Routes() {
		if !r.Via.local {
			byHop[r.Via.hop] = append(byHop[r.Via.hop], r.Prefix)
		}
	}
	peers := make([]DataPeer, 0, len(c.neighbours))
	for _, name := range slices.Sorted(maps.Keys(c.neighbours)) {
		nb := c.neighbours[name]
		if nb.Key == (secure.Key{}) || nb.DataPort == 0 || nb.Plaintext {
			continue // no data plane there, or its data goes in clear
		}
		ps := byHop[name]
		slices.SortFunc(ps, comparePrefix)
		peers = append(peers, DataPeer{Name: name, Key: nb.Key,
			Endpoint: netip.AddrPortFrom(nb.Via.Remote.Addr(), nb.DataPort), Prefixes: ps})
	}
	if slices.EqualFunc(peers, c.programmed, equalDataPeer) {
		return
	}
	if err := c.r.cfg.DataPlane.Program(peers); err != nil {
		c.log.Error("programming the data plane", zap.Error(err))
		return
	}
	c.programmed = peers
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}

func equalDataPeer(a, b DataPeer) bool {
	return a.Name == b.Name && a.Key == b.Key && a.Endpoint == b.Endpoint && slices.Equal(a.Prefixes, b.Prefixes)
}
