package peering

// The data path, in both directions, with no allocation per packet or per
// batch once its buffers exist.
//
// TUN to peers (tunToPeers, one goroutine):
//  1. Read a batch from the TUN device into buffers that keep
//     proto.DataHeaderLen bytes of headroom in front of each packet.
//  2. Load the routing snapshot once for the whole batch.
//  3. For each packet: look up the destination address; write the data
//     header in place into the headroom; add the packet to its peer's group.
//  4. Send each group with one batched send to that peer's endpoint. The send
//     is synchronous, so every buffer is ours again when it returns.
//
// Peers to TUN (peersToTun, one goroutine):
//  1. Read a batch of datagrams from the socket.
//  2. Load the routing snapshot once for the whole batch.
//  3. Data messages from an established peer, for an address we serve, are
//     collected; their packet starts DataHeaderLen bytes into the buffer.
//     Data for another peer is relayed: its hop count goes up by one and it
//     is grouped by next hop, like packets from the TUN.
//  4. Other message types are copied and queued for the control loop (the
//     buffers are reused by the next batch); a full queue drops them.
//  5. The collected packets go to the TUN device with one batched write, the
//     relayed ones to their next hops with one batched send each.

import (
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/overlayd/overlayd/peering/conn"
	"github.com/overlayd/overlayd/proto"
	"github.com/overlayd/overlayd/tun"
)

// maxDatagram bounds one packet or datagram. Buffers have room for it so that
// neither a peer with a larger MTU nor GRO on the TUN device is cut short.
const maxDatagram = 65535

// group collects the packets of one batch that go to one peer.
type group struct {
	p    *path
	bufs [][]byte
}

// batcher groups a batch of packets by peer. Its slices are reused from batch
// to batch, so after warming up it does not allocate.
type batcher struct {
	groups []group
	n      int // groups in use
}

func (b *batcher) add(p *path, pkt []byte) {
	for i := range b.n {
		if b.groups[i].p == p {
			b.groups[i].bufs = append(b.groups[i].bufs, pkt)
			return
		}
	}
	if b.n == len(b.groups) {
		b.groups = append(b.groups, group{})
	}
	g := &b.groups[b.n]
	g.p, g.bufs = p, append(g.bufs[:0], pkt)
	b.n++
}

func (b *batcher) reset() {
	for i := range b.n {
		b.groups[i].p = nil
		clear(b.groups[i].bufs) // drop references to packet buffers
		b.groups[i].bufs = b.groups[i].bufs[:0]
	}
	b.n = 0
}

// tunToPeers moves packets from the TUN device to peers until the device is
// closed. It owns bufs, sizes and the batcher.
func (r *Router) tunToPeers() error {
	const hdr = proto.DataHeaderLen
	batch := r.dev.BatchSize()
	bufs := make([][]byte, batch)
	for i := range bufs {
		bufs[i] = make([]byte, hdr+maxDatagram)
	}
	sizes := make([]int, batch)
	send := r.pc.NewSender(batch)
	var b batcher
	failures := 0 // consecutive read errors
	for {
		n, err := r.dev.Read(bufs, sizes, hdr)
		if n > 0 {
			r.forward(bufs[:n], sizes[:n], &b)
			r.flush(send, &b)
		}
		switch {
		case err == nil:
			failures = 0
		case isClosed(err):
			return nil
		case failures < maxTunFailures:
			// One packet the offload code could not split, or a
			// passing device error: the device itself still works.
			failures++
			r.stats.DropTunRead.Add(1)
		default:
			return fmt.Errorf("peering: reading from the TUN device: %w", err)
		}
	}
}

// maxTunFailures consecutive read errors mean the device is gone.
const maxTunFailures = 1000

func isClosed(err error) bool {
	return errors.Is(err, os.ErrClosed) || errors.Is(err, net.ErrClosed)
}

// flush sends each group of b to its peer with one batched send, counts
// what the socket refused, and empties b.
func (r *Router) flush(send conn.Sender, b *batcher) {
	for i := range b.n {
		g := &b.groups[i]
		if sent, _ := send.Send(g.bufs, g.p.ep); sent < len(g.bufs) {
			r.stats.DropSendError.Add(uint64(len(g.bufs) - sent))
		}
	}
	b.reset()
}

// forward routes one batch read from the TUN device into b: each packet's
// data header is written in place and the packet is grouped by peer.
func (r *Router) forward(bufs [][]byte, sizes []int, b *batcher) {
	r.route(bufs, sizes, proto.DataHeaderLen, b, false)
}

// route groups the packets of one batch read from the TUN device, each at
// offset in its buffer, by first hop into b, with the data header written
// in place in the headroom before offset. With plainOnly (the data plane
// reads the device: see Divert) it takes only the packets whose first hop
// takes data in clear and sets their sizes to 0; the others stay for the
// plane.
func (r *Router) route(bufs [][]byte, sizes []int, offset int, b *batcher, plainOnly bool) {
	const hdr = proto.DataHeaderLen
	snap := r.snap.Load() // one atomic load per batch
	self := r.cfg.Name
	var routed, bytes uint64
	for i, buf := range bufs {
		if sizes[i] <= 0 {
			continue
		}
		pkt := buf[offset-hdr : offset+sizes[i]]
		dst, ok := proto.DstAddr(pkt[hdr:])
		p, found := snap.routes.Lookup(dst)
		if !ok || !found || p.local || plainOnly && !p.plain {
			if !plainOnly {
				r.stats.DropUnroutable.Add(1)
			}
			continue
		}
		proto.PutDataHeader(pkt, self, p.name)
		b.add(p, pkt)
		if plainOnly {
			sizes[i] = 0
		}
		routed++
		bytes += uint64(len(pkt))
	}
	read := uint64(len(bufs))
	if plainOnly {
		read = routed // the plane counts the rest
	}
	r.stats.TunPackets.Add(read)
	r.stats.SentPackets.Add(routed)
	r.stats.SentBytes.Add(bytes)
}

// peersToTun moves datagrams from the socket to the TUN device (data) and to
// the control loop (everything else) until the socket is closed.
func (r *Router) peersToTun() error {
	const hdr = proto.DataHeaderLen
	batch := controlBatch // only control messages come here when a data plane carries the data
	dev := r.tunOut()
	if dev != nil {
		batch = dev.BatchSize()
	}
	bufs := make([][]byte, batch)
	for i := range bufs {
		bufs[i] = make([]byte, maxDatagram+hdr)
	}
	sizes := make([]int, batch)
	eps := make([]conn.Endpoint, batch)
	out := make([][]byte, 0, batch)
	rd := r.pc.NewReader(batch)
	send := r.pc.NewSender(batch)
	var relay batcher
	for {
		n, err := rd.Read(bufs, sizes, eps)
		if err != nil {
			if isClosed(err) {
				return nil
			}
			return fmt.Errorf("peering: reading from the UDP socket: %w", err)
		}
		out = r.receive(bufs[:n], sizes[:n], eps[:n], out[:0], &relay)
		r.flush(send, &relay)
		if len(out) > 0 {
			if _, err := dev.Write(out, hdr); err != nil {
				if isClosed(err) {
					return nil
				}
				// Some packets of the batch were refused (e.g. not IP);
				// the device still works.
				r.stats.DropTunWrite.Add(1)
			}
			clear(out)
		}
	}
}

// tunOut is the device data from peers is written to: ours, or the data
// plane's through the Divert (nil: none).
func (r *Router) tunOut() tun.Device {
	if r.cfg.Divert != nil {
		return r.cfg.Divert.Device
	}
	return r.dev
}

// controlBatch is how many datagrams one read takes when the socket carries
// control messages only.
const controlBatch = 16

// MaxHops is how many relays a data message may cross; more means a
// routing loop while routes change, and it is dropped.
const MaxHops = 16

// receive sorts one batch of datagrams: data for us is appended to out (the
// buffer, with the packet at offset DataHeaderLen), data for others goes
// into relay, control messages are copied to the control loop.
func (r *Router) receive(bufs [][]byte, sizes []int, eps []conn.Endpoint, out [][]byte, relay *batcher) [][]byte {
	snap := r.snap.Load() // one atomic load per batch
	var bytes, relayed, relayedBytes uint64
	var now time.Time // read at the batch's first control message
	for i, buf := range bufs {
		msg := buf[:sizes[i]]
		if len(msg) >= 2 && msg[0] == proto.Version && proto.Type(msg[1]) == proto.TypeData {
			if r.dev == nil && r.cfg.Divert == nil {
				r.stats.DropPlainData.Add(1) // data goes by the data plane only
				continue
			}
			src, dst, pkt, err := proto.ParseData(msg)
			if err != nil {
				r.stats.malformed(proto.TypeData)
				continue
			}
			from, ok := snap.peers[eps[i].Remote]
			if !ok || src == r.cfg.Name {
				r.stats.DropUnknownPeer.Add(1)
				continue
			}
			if r.dev == nil && !r.plainSource(snap, from, pkt) {
				r.stats.DropPlainData.Add(1) // its data must come encrypted
				continue
			}
			if dst != r.cfg.Name {
				p := snap.byName[dst]
				switch {
				case p == nil:
					r.stats.DropUnroutable.Add(1)
				case msg[3] >= MaxHops:
					r.stats.DropHops.Add(1)
				case r.dev == nil && !p.plain:
					// The next hop takes only encrypted data: the kernel
					// forwards the packet back into the device, where the
					// plane reads it (forwarding is on in password mode).
					// Only a packet our routes send that way goes to the
					// kernel, never one for this host or elsewhere.
					to, _ := proto.DstAddr(pkt)
					if q, ok := snap.routes.Lookup(to); !ok || q.local || q.hop != p.hop {
						r.stats.DropNotForUs.Add(1)
						continue
					}
					out = append(out, msg)
					bytes += uint64(len(pkt))
				default:
					msg[3]++
					relay.add(p, msg)
					relayed++
					relayedBytes += uint64(len(msg))
				}
				continue
			}
			to, _ := proto.DstAddr(pkt)
			if p, ok := snap.routes.Lookup(to); !ok || !p.local {
				r.stats.DropNotForUs.Add(1)
				continue
			}
			out = append(out, msg)
			bytes += uint64(len(pkt))
			continue
		}
		if _, err := proto.ParseHeader(msg); err != nil {
			r.stats.malformed(0)
			continue
		}
		if now.IsZero() {
			now = time.Now()
		}
		q, drops := r.ctrl, &r.stats.DropCtrlQueue
		if _, ok := snap.peers[eps[i].Remote]; ok {
			q, drops = r.peerCtrl, &r.stats.DropPeerQueue
			if !r.peerLimit.Allow(eps[i].Remote, now) {
				r.stats.DropPeerRate.Add(1)
				continue
			}
		} else if !r.strangers.Allow(eps[i].Remote.Addr(), now) {
			r.stats.DropSourceRate.Add(1)
			continue
		}
		select {
		case q <- inbound{from: eps[i], msg: append([]byte(nil), msg...)}:
		default:
			drops.Add(1)
		}
	}
	r.stats.ReceivedPackets.Add(uint64(len(out)))
	r.stats.ReceivedBytes.Add(bytes)
	r.stats.RelayedPackets.Add(relayed)
	r.stats.RelayedBytes.Add(relayedBytes)
	return out
}

// malformed counts an undecodable datagram of type t (0: bad header).
func (s *Stats) malformed(t proto.Type) {
	s.DropMalformed.Add(1)
	if int(t) < len(s.DecodeErrors) {
		s.DecodeErrors[t].Add(1)
	}
}
