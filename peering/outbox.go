package peering

import (
	"slices"
	"sync"
	"sync/atomic"

	"github.com/overlayd/overlayd/peering/gossip"
	"github.com/overlayd/overlayd/proto"
)

// Limits of one channel's outbox: messages waiting, and their bytes.
const (
	OutboxLen   = 1024
	OutboxBytes = 16 << 20
)

// outboxBatch bounds the messages the control loop sends before it looks
// at its other inputs again (heartbeats must not wait for a burst).
const outboxBatch = 256

// An Outbox is the outbound queue of one gossip channel. Send and
// Broadcast never block: the control loop sends what is queued, and when
// the queue is full (OutboxLen messages or OutboxBytes) a message is
// dropped and counted; gossip tolerates loss, and the channel's protocol
// repairs it (anti-entropy). Its methods are safe for concurrent use.
type Outbox struct {
	channel string
	wake    chan<- struct{} // the router's: room for one

	mu    sync.Mutex
	q     []outMsg // guarded by mu
	bytes int      // guarded by mu: of q's payloads

	dropped     atomic.Uint64 // the queue was full
	unreachable atomic.Uint64 // no path led to the peer
}

type outMsg struct {
	dst     proto.PeerName // 0: every reachable peer
	payload []byte         // the outbox's own copy
}

// Send queues payload for dst, copied; false if it was dropped (the queue
// is full or payload is over gossip.MaxMessageBytes).
func (o *Outbox) Send(dst proto.PeerName, payload []byte) bool {
	if dst == 0 {
		return false
	}
	return o.put(outMsg{dst: dst, payload: payload})
}

// Broadcast queues payload, copied, for every peer reachable when it is
// sent; false if it was dropped.
func (o *Outbox) Broadcast(payload []byte) bool { return o.put(outMsg{payload: payload}) }

func (o *Outbox) put(m outMsg) bool {
	if len(m.payload) > gossip.MaxMessageBytes {
		o.dropped.Add(1)
		return false
	}
	o.mu.Lock()
	if len(o.q) >= OutboxLen || o.bytes+len(m.payload) > OutboxBytes {
		o.mu.Unlock()
		o.dropped.Add(1)
		return false
	}
	m.payload = slices.Clone(m.payload)
	o.q = append(o.q, m)
	o.bytes += len(m.payload)
	o.mu.Unlock()
	notify(o.wake)
	return true
}

// take moves up to n queued messages to buf and reports whether more are
// left.
func (o *Outbox) take(buf []outMsg, n int) ([]outMsg, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	k := min(n, len(o.q))
	for _, m := range o.q[:k] {
		o.bytes -= len(m.payload)
	}
	buf = append(buf, o.q[:k]...)
	clear(o.q[:k])
	o.q = o.q[k:]
	if len(o.q) == 0 {
		o.q = nil // let the backing array go
	}
	return buf, len(o.q) > 0
}

// Dropped counts the messages dropped because the queue was full or they
// were too large.
func (o *Outbox) Dropped() uint64 { return o.dropped.Load() }

// Unreachable counts the messages for a peer no path led to.
func (o *Outbox) Unreachable() uint64 { return o.unreachable.Load() }

// Outbox returns the outbox of a channel in Config.Channels; nil for
// another.
func (r *Router) Outbox(channel string) *Outbox { return r.outboxes[channel] }

// sendOutboxes sends up to outboxBatch queued messages, channel by
// channel, starting each time with the next channel so that a busy one
// does not starve the others, and asks to be called again if any are
// left.
func (c *control) sendOutboxes() {
	left := false
	n := outboxBatch
	var everyone []proto.PeerName // for broadcasts; the loop does not change who is reachable
	chans := c.r.channels
	if len(chans) > 0 {
		c.outTurn = (c.outTurn + 1) % len(chans)
	}
	for i := range chans {
		name := chans[(c.outTurn+i)%len(chans)]
		o := c.r.outboxes[name]
		var more bool
		c.out, more = o.take(c.out[:0], n)
		left = left || more
		n -= len(c.out)
		for i, m := range c.out {
			if m.dst != 0 {
				if !c.unicast(name, m.dst, m.payload) {
					o.unreachable.Add(1)
				}
			} else {
				if everyone == nil {
					everyone = c.r.Reachable()
				}
				for _, p := range everyone {
					c.unicast(name, p, m.payload)
				}
			}
			c.out[i] = outMsg{}
		}
	}
	if left {
		notify(c.r.wake)
	}
}

// notify sends on a wake channel (room for one) without waiting: a wake
// already pending covers this one.
func notify(wake chan<- struct{}) {
	select {
	case wake <- struct{}{}:
	default:
	}
}
