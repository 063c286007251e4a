package peering

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/peering/conn"
	"github.com/overlayd/overlayd/peering/handshake"
	"github.com/overlayd/overlayd/peering/link"
	"github.com/overlayd/overlayd/peering/routes"
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
	send conn.Sender
	bufs [][]byte
}

func newControl(r *Router, m *link.Machine) *control {
	return &control{r: r, log: r.log, m: m, send: r.pc.NewSender(1), bufs: make([][]byte, 1)}
}

func (c *control) run(ctx context.Context) error {
	tick := time.NewTicker(c.r.cfg.TickEvery)
	defer tick.Stop()
	for {
		c.apply(ctx)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
			c.m.Tick()
		case in := <-c.r.ctrl:
			if err := c.m.Step(link.Endpoint(in.from), in.msg); err != nil {
				if errors.Is(err, link.ErrUnknownChannel) {
					c.log.Debug("gossip on an unknown channel", zap.Stringer("endpoint", in.from.Remote), zap.Error(err))
				} else {
					c.r.stats.DropMalformed.Add(1)
				}
			}
		case req := <-c.r.requests:
			req.fn(c)
			close(req.done)
		case res := <-c.r.resolved:
			c.m.Resolved(res.key, res.gen, res.ep, res.err)
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

// apply carries out the Machine's Ready.
func (c *control) apply(ctx context.Context) {
	rd := c.m.Ready()
	if rd.Empty() {
		return
	}
	if rd.Routing != nil {
		c.publish(rd.Routing)
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
		var re *handshake.RangeError
		if errors.As(e.Err, &re) {
			c.log.Error(e.Err.Error(), fields...)
		} else {
			c.log.Warn(e.Err.Error(), fields...)
		}
	case link.EventRestarted:
		c.log.Info("peer restarted", fields...)
	case link.EventAnnounced:
		c.log.Info("peer announced addresses", append(fields, zap.Stringers("addr", e.Prefixes))...)
	case link.EventTargetAdded:
		c.log.Info("target added", fields...)
	case link.EventTargetForgotten:
		c.log.Info("target forgotten", fields...)
	case link.EventRetry:
		c.log.Debug("will retry", append(fields, zap.Duration("in", c.r.ticks(e.RetryTicks)), zap.Error(e.Err))...)
	}
}

// publish swaps in a new snapshot for the data path.
func (c *control) publish(rt *link.Routing) {
	paths := make(map[proto.PeerName]*path, len(rt.Peers))
	peers := make(map[netip.AddrPort]*path, len(rt.Peers))
	for _, p := range rt.Peers {
		pp := &path{name: p.Name, ep: conn.Endpoint(p.Via)}
		paths[p.Name] = pp
		peers[p.Via.Remote] = pp
	}
	self := &path{name: c.r.cfg.Name, local: true}
	rs := make([]routes.Route[*path], 0, len(rt.Routes))
	for _, r := range rt.Routes {
		via := self
		if !r.Local {
			via = paths[r.Peer]
		}
		rs = append(rs, routes.Route[*path]{Prefix: r.Prefix, Via: via})
	}
	c.r.snap.Store(&snapshot{routes: routes.New(rs), peers: peers})
}
