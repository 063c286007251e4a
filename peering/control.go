package peering

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/peering/conn"
	"github.com/overlayd/overlayd/peering/handshake"
	"github.com/overlayd/overlayd/peering/routes"
	"github.com/overlayd/overlayd/proto"
)

// ChannelAddresses is the gossip channel on which peers announce the
// prefixes they serve.
const ChannelAddresses = "addresses"

// tickEvery is how often the control loop checks its timers.
const tickEvery = 100 * time.Millisecond

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
	t   *target
	gen int // t.gen when the lookup started; stale results are ignored
	ep  netip.AddrPort
	err error
}

// connState is where a connection stands, as Weave shows it.
type connState int

const (
	stateConnecting  connState = iota // hello sent, no answer yet
	statePending                      // handshake done, waiting for the peer to confirm
	stateEstablished                  // both sides have confirmed
)

func (s connState) String() string {
	return [...]string{"connecting", "pending", "established"}[s]
}

// connection is one association with a peer at one UDP endpoint. Owned by
// the control loop.
type connection struct {
	ep       netip.AddrPort
	local    netip.Addr // our address the peer talks to; zero: the kernel's choice
	outbound bool       // we dialled it (it serves a target)
	target   *target    // nil for inbound connections
	state    connState
	started  time.Time // when the handshake completed
	// remote is the peer's hello; its Name is zero until we have one.
	remote    proto.Hello
	hellos    int       // hellos sent while connecting
	nextHello time.Time // when to send the next one
	lastHeard time.Time // last hello, accept or heartbeat from the peer
	nextBeat  time.Time
	// remoteEstablished is the peer's own view, from its heartbeats.
	remoteEstablished bool
	// announce is the peer's latest announcement; nil until one arrives.
	announce *proto.Announce
}

// targetState is where a target stands while it has no connection.
type targetState int

const (
	targetConnecting targetState = iota // first attempt in progress
	targetRetrying                      // attempt in progress after a failure
	targetFailed                        // waiting to retry
)

// target is an address we keep dialling: from the command line or
// `overlayctl connect`. Owned by the control loop.
type target struct {
	addr      string // host:port as normalised by ParseTarget
	host      string
	port      uint16
	gen       int // bumped whenever a pending lookup must be ignored
	state     targetState
	resolving bool
	conn      *connection
	lastErr   error
	retryAt   time.Time // zero: try now
	never     bool      // failed for good (our own address, name collision)
	backoff   time.Duration
}

// control owns all connection state. Only its run goroutine touches it.
type control struct {
	r       *Router
	log     *zap.Logger
	send    conn.Sender
	scratch []byte
	bufs    [][]byte

	conns   map[netip.AddrPort]*connection
	targets map[string]*target
	order   []string // target addresses in the order they were added

	// rejectBudget is how many rejects we may still send: one more per
	// tick, at most maxRejectBudget, so that spoofed hellos cannot make us
	// a reflector.
	rejectBudget int

	local        []netip.Prefix // prefixes we serve (exposed addresses)
	localVersion uint64
	nextAnnounce time.Time
}

func newControl(r *Router) *control {
	return &control{
		r:            r,
		log:          r.log,
		send:         r.pc.NewSender(1),
		bufs:         make([][]byte, 1),
		conns:        make(map[netip.AddrPort]*connection),
		rejectBudget: maxRejectBudget,
		targets:      make(map[string]*target),
	}
}

func (c *control) run(ctx context.Context) error {
	tick := time.NewTicker(tickEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case now := <-tick.C:
			c.tick(ctx, now)
		case in := <-c.r.ctrl:
			c.handle(in, time.Now())
		case req := <-c.r.requests:
			req.fn(c)
			close(req.done)
		case res := <-c.r.resolved:
			c.resolvedTarget(res, time.Now())
		}
	}
}

// do runs fn on the control loop and waits for it.
func (r *Router) do(ctx context.Context, fn func(*control)) error {
	req := request{fn: fn, done: make(chan struct{})}
	select {
	case r.requests <- req:
	case <-ctx.Done():
		return ctx.Err()
	}
	<-req.done
	return nil
}

// sendMsg sends one control message; it never blocks for long (the socket is
// non-blocking and gossip tolerates loss).
func (c *control) sendMsg(to conn.Endpoint, msg []byte) {
	c.bufs[0] = msg
	if _, err := c.send.Send(c.bufs, to); err != nil {
		c.log.Debug("sending control message", zap.Stringer("endpoint", to.Remote), zap.Error(err))
	}
	c.bufs[0] = nil
}

// endpoint is where cn's messages go, and from which of our addresses.
func (cn *connection) endpoint() conn.Endpoint {
	return conn.Endpoint{Remote: cn.ep, Local: cn.local}
}

func (c *control) sendHello(cn *connection, t proto.Type) {
	h := c.r.hs.Hello()
	c.scratch = proto.AppendHello(c.scratch[:0], t, &h)
	c.sendMsg(cn.endpoint(), c.scratch)
}

func (c *control) sendHeartbeat(cn *connection) {
	c.scratch = proto.AppendHeartbeat(c.scratch[:0], proto.Heartbeat{
		Name: c.r.cfg.Name, UID: c.r.cfg.UID, Established: cn.state == stateEstablished})
	c.sendMsg(cn.endpoint(), c.scratch)
}

func (c *control) sendAnnounce(cn *connection) {
	payload, err := proto.AppendAnnounce(nil, &proto.Announce{
		UID: c.r.cfg.UID, Version: c.localVersion, Prefixes: c.local})
	if err != nil {
		c.log.Error("cannot encode our announcement", zap.Error(err))
		return
	}
	msg, err := proto.AppendGossip(c.scratch[:0], &proto.Gossip{
		Channel: ChannelAddresses, Src: c.r.cfg.Name, Dst: cn.remote.Name, Payload: payload})
	if err != nil {
		c.log.Error("cannot encode our announcement", zap.Error(err))
		return
	}
	c.scratch = msg
	c.sendMsg(cn.endpoint(), msg)
}

// tick runs timers: dials, hello retries, heartbeats, time-outs, announcements.
func (c *control) tick(ctx context.Context, now time.Time) {
	cfg := &c.r.cfg
	c.rejectBudget = min(c.rejectBudget+1, maxRejectBudget)
	for _, addr := range c.order {
		t := c.targets[addr]
		if t.conn == nil && !t.resolving && !t.never && !now.Before(t.retryAt) {
			t.state = targetConnecting
			if t.lastErr != nil {
				t.state = targetRetrying
			}
			c.dial(ctx, t, now)
		}
	}
	for _, cn := range c.sortedConns() {
		switch {
		case cn.state == stateConnecting && !now.Before(cn.nextHello):
			if cn.hellos >= cfg.HelloAttempts {
				c.drop(cn, fmt.Errorf("no answer to %d hellos", cn.hellos), now)
				continue
			}
			c.sendHello(cn, proto.TypeHello)
			cn.hellos++
			cn.nextHello = now.Add(cfg.HelloInterval)
		case cn.state != stateConnecting && now.Sub(cn.lastHeard) > cfg.HeartbeatTimeout:
			c.drop(cn, errors.New("timed out waiting for heartbeat"), now)
			continue
		}
		if cn.state != stateConnecting && !now.Before(cn.nextBeat) {
			c.sendHeartbeat(cn)
			cn.nextBeat = now.Add(cfg.HeartbeatInterval)
		}
	}
	if !now.Before(c.nextAnnounce) {
		c.nextAnnounce = now.Add(cfg.AnnounceInterval)
		for _, cn := range c.sortedConns() {
			if cn.state == stateEstablished {
				c.sendAnnounce(cn)
			}
		}
	}
}

// dial starts an attempt on a target: resolve its host if needed, then send
// hellos from a new connection.
func (c *control) dial(ctx context.Context, t *target, now time.Time) {
	if a, err := netip.ParseAddr(t.host); err == nil {
		c.connectTarget(t, netip.AddrPortFrom(a.Unmap(), t.port), now)
		return
	}
	t.resolving = true
	t.gen++
	gen, host, port := t.gen, t.host, t.port
	c.r.bg.Go(func() {
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		res := resolution{t: t, gen: gen}
		addrs, err := net.DefaultResolver.LookupNetIP(lctx, "ip", host)
		switch {
		case err != nil:
			res.err = err
		case len(addrs) == 0:
			res.err = fmt.Errorf("no address for %s", host)
		default:
			// Prefer IPv4: the MTU is computed for an IPv4 underlay.
			a := addrs[0].Unmap()
			for _, x := range addrs {
				if x.Unmap().Is4() {
					a = x.Unmap()
					break
				}
			}
			res.ep = netip.AddrPortFrom(a, port)
		}
		select {
		case c.r.resolved <- res:
		case <-ctx.Done():
		}
	})
}

func (c *control) resolvedTarget(res resolution, now time.Time) {
	t := res.t
	if c.targets[t.addr] != t || res.gen != t.gen {
		return // forgotten or superseded meanwhile
	}
	t.resolving = false
	if res.err != nil {
		c.targetFailed(t, fmt.Errorf("resolving %s: %w", t.host, res.err), now, 0)
		return
	}
	c.connectTarget(t, res.ep, now)
}

// connectTarget attaches t to the connection at ep, making one if needed.
func (c *control) connectTarget(t *target, ep netip.AddrPort, now time.Time) {
	if cn := c.conns[ep]; cn != nil {
		// Already talking to that endpoint (the peer dialled us first, or
		// another target names the same endpoint): share the connection.
		if cn.target == nil {
			cn.target = t
		}
		cn.outbound, t.conn = true, cn
		return
	}
	cn := &connection{ep: ep, outbound: true, target: t, state: stateConnecting, nextHello: now}
	c.conns[ep] = cn
	t.conn = cn
	c.log.Debug("connecting", zap.Stringer("endpoint", ep))
}

// handle processes one control datagram.
func (c *control) handle(in inbound, now time.Time) {
	hd, err := proto.ParseHeader(in.msg)
	if err != nil {
		return // checked by the receive path already
	}
	switch hd.Type {
	case proto.TypeHello, proto.TypeAccept:
		h, err := proto.ParseHello(in.msg)
		if err != nil {
			c.r.stats.DropMalformed.Add(1)
			return
		}
		if hd.Type == proto.TypeHello {
			c.onHello(in.from, &h, now)
		} else {
			c.onAccept(in.from, &h, now)
		}
	case proto.TypeReject:
		rj, err := proto.ParseReject(in.msg)
		if err != nil {
			c.r.stats.DropMalformed.Add(1)
			return
		}
		c.onReject(in.from, &rj, now)
	case proto.TypeHeartbeat:
		hb, err := proto.ParseHeartbeat(in.msg)
		if err != nil {
			c.r.stats.DropMalformed.Add(1)
			return
		}
		c.onHeartbeat(in.from, hb, now)
	case proto.TypeGossip:
		g, err := proto.ParseGossip(in.msg)
		if err != nil {
			c.r.stats.DropMalformed.Add(1)
			return
		}
		c.onGossip(in.from, &g)
	}
}

func (c *control) onHello(from conn.Endpoint, h *proto.Hello, now time.Time) {
	cn := c.conns[from.Remote]
	if h.Name == c.r.cfg.Name && h.UID == c.r.cfg.UID {
		// Our own hello: a target is one of our own addresses.
		if cn != nil {
			c.drop(cn, errCannotConnectToOurself, now)
		}
		return
	}
	if _, err := c.r.hs.Check(h); err != nil {
		c.refuse(from, h, err)
		if cn != nil {
			c.drop(cn, err, now)
		}
		return
	}
	if cn != nil && cn.remote.Name != 0 && (cn.remote.Name != h.Name || cn.remote.UID != h.UID) {
		// Another incarnation (or another peer) at this endpoint: start over.
		c.log.Info("peer restarted", zap.Stringer("peer", h.Name), zap.String("nick", h.Nickname),
			zap.Stringer("endpoint", from.Remote))
		c.drop(cn, errors.New("peer restarted"), now)
		cn = nil
	}
	if err := c.settleDuplicates(from.Remote, h, now); err != nil {
		c.refuse(from, h, err)
		if cn != nil {
			c.drop(cn, err, now)
		}
		return
	}
	if cn == nil {
		if c.pendingInbound() >= maxPendingInbound {
			c.r.stats.DropCtrlQueue.Add(1)
			return // a flood of hellos; real peers retry
		}
		cn = &connection{ep: from.Remote, state: statePending}
		c.conns[from.Remote] = cn
		c.adoptTarget(cn)
	}
	cn.remote = *h
	cn.lastHeard = now
	cn.local = from.Local
	c.sendHello(cn, proto.TypeAccept)
	if cn.state == stateConnecting {
		// Both sides dialled at once: wait for their accept or heartbeat.
		cn.state = statePending
		cn.started = now
	} else if cn.started.IsZero() {
		cn.started = now
	}
}

func (c *control) onAccept(from conn.Endpoint, h *proto.Hello, now time.Time) {
	cn := c.conns[from.Remote]
	if cn == nil || cn.state == stateEstablished {
		return // unsolicited, or a duplicate of one we already took
	}
	if _, err := c.r.hs.Check(h); err != nil {
		c.logRefusal(from, h.Name, h.Nickname, err)
		c.drop(cn, err, now)
		return
	}
	if cn.remote.Name != 0 && (cn.remote.Name != h.Name || cn.remote.UID != h.UID) {
		c.drop(cn, errors.New("peer changed identity during the handshake"), now)
		return
	}
	if err := c.settleDuplicates(from.Remote, h, now); err != nil {
		c.drop(cn, err, now)
		return
	}
	cn.remote = *h
	cn.lastHeard = now
	cn.local = from.Local
	if cn.started.IsZero() {
		cn.started = now
	}
	c.establish(cn, now)
}

func (c *control) onReject(from conn.Endpoint, rj *proto.Reject, now time.Time) {
	cn := c.conns[from.Remote]
	if cn == nil || cn.state != stateConnecting {
		return // rejects only answer our hellos
	}
	err := c.r.hs.FromReject(rj)
	c.logRefusal(from, rj.Name, "", err)
	c.drop(cn, err, now)
}

func (c *control) onHeartbeat(from conn.Endpoint, hb proto.Heartbeat, now time.Time) {
	cn := c.conns[from.Remote]
	if cn == nil || cn.remote.Name == 0 {
		return
	}
	if hb.Name != cn.remote.Name || hb.UID != cn.remote.UID {
		c.drop(cn, errors.New("heartbeat from another incarnation of the peer"), now)
		return
	}
	cn.lastHeard = now
	cn.remoteEstablished = hb.Established
	if cn.local != from.Local {
		// The peer now reaches us at another of our addresses: answer
		// from that one, data included.
		cn.local = from.Local
		if cn.state == stateEstablished {
			c.publish()
		}
	}
	if cn.state == statePending {
		c.establish(cn, now)
	}
}

func (c *control) onGossip(from conn.Endpoint, g *proto.Gossip) {
	cn := c.conns[from.Remote]
	// Pending is enough: the handshake has told us who the peer is, and its
	// announcement may overtake the heartbeat that establishes us.
	if cn == nil || cn.state == stateConnecting || g.Src != cn.remote.Name {
		return
	}
	if g.Channel != ChannelAddresses {
		c.log.Debug("gossip on an unknown channel", zap.String("kind", g.Channel), zap.Stringer("peer", g.Src))
		return
	}
	a, err := proto.ParseAnnounce(g.Payload)
	if err != nil {
		c.r.stats.DropMalformed.Add(1)
		c.log.Warn("bad announcement", zap.Stringer("peer", g.Src), zap.Error(err))
		return
	}
	if a.UID != cn.remote.UID || (cn.announce != nil && a.Version <= cn.announce.Version) {
		return // stale
	}
	cn.announce = &a
	c.log.Info("peer announced addresses", zap.Stringer("peer", g.Src), zap.String("nick", cn.remote.Nickname),
		zap.Stringers("addr", a.Prefixes))
	c.publish()
}

// establish marks cn established and tells the peer what we serve.
func (c *control) establish(cn *connection, now time.Time) {
	cn.state = stateEstablished
	for _, t := range c.targets {
		if t.conn == cn {
			t.backoff, t.lastErr = 0, nil
		}
	}
	c.log.Info("connection established", zap.Stringer("peer", cn.remote.Name),
		zap.String("nick", cn.remote.Nickname), zap.Stringer("endpoint", cn.ep))
	c.sendHeartbeat(cn)
	cn.nextBeat = now.Add(c.r.cfg.HeartbeatInterval)
	c.sendAnnounce(cn)
	c.publish()
}

// settleDuplicates decides between a handshake from the peer h at ep and
// other connections to the same peer at other endpoints. An established
// connection to the same incarnation wins: the new one is a duplicate (a
// multi-homed peer reached through two targets) and an error says so.
// Otherwise the others are dropped: the peer restarted or moved.
func (c *control) settleDuplicates(ep netip.AddrPort, h *proto.Hello, now time.Time) error {
	for _, other := range c.sortedConns() {
		if other.ep == ep || other.remote.Name != h.Name {
			continue
		}
		if other.state == stateEstablished && other.remote.UID == h.UID {
			return fmt.Errorf("already connected to %v(%s) via %v", h.Name, h.Nickname, other.ep)
		}
		c.drop(other, fmt.Errorf("peer %v now connected at %v", h.Name, ep), now)
	}
	return nil
}

// adoptTarget links an inbound connection to the target with its endpoint.
func (c *control) adoptTarget(cn *connection) {
	for _, addr := range c.order {
		t := c.targets[addr]
		if t.conn == nil && !t.resolving {
			if a, err := netip.ParseAddr(t.host); err == nil && netip.AddrPortFrom(a.Unmap(), t.port) == cn.ep {
				cn.outbound, cn.target, t.conn = true, t, cn
				return
			}
		}
	}
}

var errCannotConnectToOurself = errors.New("cannot connect to ourself")

// maxPendingInbound bounds inbound connections still waiting for their
// first heartbeat, so that spoofed hellos cannot grow our state.
const maxPendingInbound = 64

// maxRejectBudget is the burst of rejects we send; the rate is one per tick.
const maxRejectBudget = 20

func (c *control) pendingInbound() int {
	n := 0
	for _, cn := range c.conns {
		if cn.state == statePending && !cn.outbound {
			n++
		}
	}
	return n
}

// refuse answers a hello with a reject and logs why.
func (c *control) refuse(from conn.Endpoint, h *proto.Hello, err error) {
	c.logRefusal(from, h.Name, h.Nickname, err)
	if c.rejectBudget <= 0 {
		return
	}
	c.rejectBudget--
	rj := c.r.hs.Reject(err)
	c.scratch = proto.AppendReject(c.scratch[:0], &rj)
	c.sendMsg(from, c.scratch)
}

// logRefusal logs a failed handshake with the error's text as the message,
// so Weave's operator texts appear verbatim (not quoted inside a field). A
// range mismatch is an error: the cluster is misconfigured.
func (c *control) logRefusal(from conn.Endpoint, name proto.PeerName, nick string, err error) {
	fields := []zap.Field{zap.Stringer("peer", name), zap.Stringer("endpoint", from.Remote)}
	if nick != "" {
		fields = append(fields, zap.String("nick", nick))
	}
	var re *handshake.RangeError
	if errors.As(err, &re) {
		c.log.Error(err.Error(), fields...)
		return
	}
	c.log.Warn(err.Error(), fields...)
}

// drop ends a connection. If it served a target, the target is retried after
// a back-off (at once if the connection had lasted a minute).
func (c *control) drop(cn *connection, reason error, now time.Time) {
	if c.conns[cn.ep] != cn {
		return
	}
	delete(c.conns, cn.ep)
	if cn.state != stateConnecting {
		c.log.Info("connection lost", zap.Stringer("peer", cn.remote.Name), zap.String("nick", cn.remote.Nickname),
			zap.Stringer("endpoint", cn.ep), zap.Error(reason))
	}
	var lasted time.Duration
	if !cn.started.IsZero() {
		lasted = now.Sub(cn.started)
	}
	for _, addr := range c.order {
		if t := c.targets[addr]; t.conn == cn {
			t.conn = nil
			c.targetFailed(t, reason, now, lasted)
		}
	}
	if cn.state == stateEstablished || cn.announce != nil {
		c.publish()
	}
}

// targetFailed records a failed attempt and schedules the next one.
func (c *control) targetFailed(t *target, reason error, now time.Time, lasted time.Duration) {
	t.lastErr = reason
	t.state = targetFailed
	if errors.Is(reason, errCannotConnectToOurself) || handshake.Permanent(reason) {
		t.never = true
		return
	}
	if lasted > time.Minute {
		t.backoff = 0
		t.retryAt = now
		return
	}
	t.backoff = nextBackoff(t.backoff, c.r.cfg.RetryInitial, c.r.cfg.RetryMax)
	t.retryAt = now.Add(jitter(t.backoff, c.r.cfg.Rand.Float64()))
	c.log.Debug("will retry", zap.String("endpoint", t.addr), zap.Time("at", t.retryAt), zap.Error(reason))
}

// sortedConns lists connections by endpoint, so that every loop over them is
// deterministic.
func (c *control) sortedConns() []*connection {
	cs := make([]*connection, 0, len(c.conns))
	for _, cn := range c.conns {
		cs = append(cs, cn)
	}
	slices.SortFunc(cs, func(a, b *connection) int { return a.ep.Compare(b.ep) })
	return cs
}

// publish builds a new snapshot for the data path from the established
// connections' announcements and our own prefixes.
func (c *control) publish() {
	var rs []routes.Route[*path]
	self := &path{name: c.r.cfg.Name, local: true}
	for _, p := range c.local {
		rs = append(rs, routes.Route[*path]{Prefix: p, Via: self})
	}
	peers := make(map[netip.AddrPort]*path)
	// Peers in name order: where two announce the same prefix, the lower
	// name wins, the same on every host.
	cs := c.sortedConns()
	slices.SortFunc(cs, func(a, b *connection) int { return cmpName(a.remote.Name, b.remote.Name) })
	for _, cn := range cs {
		if cn.state != stateEstablished {
			continue
		}
		p := &path{name: cn.remote.Name, ep: cn.endpoint()}
		peers[cn.ep] = p
		if cn.announce != nil {
			for _, pfx := range cn.announce.Prefixes {
				rs = append(rs, routes.Route[*path]{Prefix: pfx, Via: p})
			}
		}
	}
	c.r.snap.Store(&snapshot{routes: routes.New(rs), peers: peers})
}

func cmpName(a, b proto.PeerName) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// ParseTarget checks a peer address given as HOST, HOST:PORT, [IPv6] or
// [IPv6]:PORT and returns it normalised as host:port.
func ParseTarget(s string) (host string, port uint16, err error) {
	if s == "" {
		return "", 0, errors.New("empty peer address")
	}
	if strings.Contains(s, "%") {
		return "", 0, fmt.Errorf("peer address %q: zoned (link-local) addresses are not supported", s)
	}
	if ap, err := netip.ParseAddrPort(s); err == nil {
		if ap.Port() == 0 {
			return "", 0, fmt.Errorf("peer address %q: port 0", s)
		}
		return ap.Addr().Unmap().String(), ap.Port(), nil
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return a.Unmap().String(), DefaultPort, nil
	}
	h, p, err := net.SplitHostPort(s)
	if err != nil {
		h, p = s, strconv.Itoa(DefaultPort)
	}
	if h == "" || len(h) > 253 {
		return "", 0, fmt.Errorf("peer address %q: bad host", s)
	}
	for _, ch := range h {
		ok := ch == '-' || ch == '.' || ch == '_' || ch >= '0' && ch <= '9' || ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z'
		if !ok {
			return "", 0, fmt.Errorf("peer address %q: bad host name", s)
		}
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n == 0 {
		return "", 0, fmt.Errorf("peer address %q: bad port %q", s, p)
	}
	return h, uint16(n), nil
}

func joinTarget(host string, port uint16) string {
	return net.JoinHostPort(host, strconv.Itoa(int(port)))
}
