package peering

import (
	"sync/atomic"

	"github.com/overlayd/overlayd/peering/conn"
	"github.com/overlayd/overlayd/proto"
	"github.com/overlayd/overlayd/tun"
)

// A Divert is the TUN device as the data plane (WireGuard) sees it in
// password mode with trusted subnets. Packets whose first hop is a peer
// that takes data in clear never reach the plane: on the plane's own read,
// the router writes its data header into the headroom in front of each,
// sends them, and reports their size as 0, which the plane skips. The rest
// pass untouched, so encrypted traffic costs one route lookup per packet
// more and no copy. Data from plaintext peers is written to the device by
// the router, beside the plane's writes (the device serialises them).
//
// The router attaches itself in New; until then every packet passes.
type Divert struct {
	tun.Device
	r atomic.Pointer[Router]
	// Owned by the plane's reading goroutine (the device has one reader).
	send conn.Sender
	b    batcher
}

// NewDivert wraps dev; closing the Divert closes dev.
func NewDivert(dev tun.Device) *Divert { return &Divert{Device: dev} }

// Read reads a batch from the device and sends the packets of plaintext
// peers itself; their sizes come back 0.
func (d *Divert) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	n, err := d.Device.Read(bufs, sizes, offset)
	if r := d.r.Load(); r != nil && n > 0 && offset >= proto.DataHeaderLen {
		if d.send == nil {
			d.send = r.pc.NewSender(d.Device.BatchSize())
		}
		r.route(bufs[:n], sizes[:n], offset, &d.b, true)
		r.flush(d.send, &d.b)
	}
	return n, err
}

// plainSource reports whether data in clear from neighbour from may carry
// pkt, in password mode: from's data goes in clear, and pkt's source is an
// address our routes send towards from, as WireGuard's allowed IPs would
// require of an encrypted packet (so a trusted peer, or a datagram forged
// with its address, cannot pass off another peer's address or ours).
func (r *Router) plainSource(snap *snapshot, from *path, pkt []byte) bool {
	if !from.plain {
		return false
	}
	src, ok := proto.SrcAddr(pkt)
	if !ok {
		return false
	}
	p, ok := snap.routes.Lookup(src)
	return ok && !p.local && p.hop == from.hop
}
