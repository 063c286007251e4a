package fuzz

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"testing"
	"testing/synctest"

	"go.uber.org/zap"
	wgtun "golang.zx2c4.com/wireguard/tun"

	"github.com/overlayd/overlayd/peering"
	"github.com/overlayd/overlayd/peering/conn"
	"github.com/overlayd/overlayd/proto"
	"github.com/overlayd/overlayd/tun"
)

// fakePC is a conn.PacketConn in memory: datagrams put in `in` are read,
// datagrams sent are recorded. Made inside a synctest bubble, its readers
// block durably.
type fakePC struct {
	in     chan fakeDgram
	closed chan struct{}
	once   sync.Once
	mu     sync.Mutex
	sent   []fakeDgram // guarded by mu
}

type fakeDgram struct {
	ep  conn.Endpoint
	msg []byte
}

var _ conn.PacketConn = (*fakePC)(nil)

func newFakePC(queue int) *fakePC {
	return &fakePC{in: make(chan fakeDgram, queue), closed: make(chan struct{})}
}

func (p *fakePC) NewReader(int) conn.Reader { return fakeReader{p} }
func (p *fakePC) NewSender(int) conn.Sender { return fakeSender{p} }
func (p *fakePC) LocalPort() uint16         { return 6783 }
func (p *fakePC) GSO() bool                 { return false }
func (p *fakePC) GRO() bool                 { return false }
func (p *fakePC) Close() error              { p.once.Do(func() { close(p.closed) }); return nil }

// take returns what was sent since the last take.
func (p *fakePC) take() []fakeDgram {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.sent
	p.sent = nil
	return s
}

type fakeReader struct{ p *fakePC }

// Read waits for one datagram, then takes those already queued, up to the
// batch.
func (r fakeReader) Read(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
	var d fakeDgram
	select {
	case <-r.p.closed:
		return 0, net.ErrClosed
	case d = <-r.p.in:
	}
	n := 0
	for {
		sizes[n], eps[n] = copy(bufs[n], d.msg), d.ep
		if len(d.msg) > len(bufs[n]) {
			sizes[n] = 0
		}
		if n++; n == len(bufs) {
			return n, nil
		}
		select {
		case d = <-r.p.in:
		default:
			return n, nil
		}
	}
}

type fakeSender struct{ p *fakePC }

func (s fakeSender) Send(bufs [][]byte, to conn.Endpoint) (int, error) {
	s.p.mu.Lock()
	defer s.p.mu.Unlock()
	for _, b := range bufs {
		s.p.sent = append(s.p.sent, fakeDgram{ep: to, msg: bytes.Clone(b)})
	}
	return len(bufs), nil
}

// fakeTUN is a tun.Device that records the packets written to it and never
// has one to read.
type fakeTUN struct {
	closed  chan struct{}
	events  chan wgtun.Event
	once    sync.Once
	mu      sync.Mutex
	written [][]byte // guarded by mu
}

var _ tun.Device = (*fakeTUN)(nil)

func newFakeTUN() *fakeTUN {
	return &fakeTUN{closed: make(chan struct{}), events: make(chan wgtun.Event)}
}

func (d *fakeTUN) File() *os.File { return nil }
func (d *fakeTUN) Read([][]byte, []int, int) (int, error) {
	<-d.closed
	return 0, os.ErrClosed
}
func (d *fakeTUN) Write(bufs [][]byte, offset int) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, b := range bufs {
		d.written = append(d.written, bytes.Clone(b[offset:]))
	}
	return len(bufs), nil
}
func (d *fakeTUN) MTU() (int, error)          { return 1420, nil }
func (d *fakeTUN) Name() (string, error)      { return "fuzz0", nil }
func (d *fakeTUN) Events() <-chan wgtun.Event { return d.events }
func (d *fakeTUN) BatchSize() int             { return 8 }
func (d *fakeTUN) Close() error {
	d.once.Do(func() { close(d.closed); close(d.events) })
	return nil
}

func (d *fakeTUN) take() [][]byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	w := d.written
	d.written = nil
	return w
}

var (
	dpSelf  = proto.PeerName(0x12d2fe7ac1f2)
	dpRange = netip.MustParsePrefix("10.40.0.0/16")
	dpLocal = netip.MustParsePrefix("10.40.1.0/24") // the prefix the router serves
	// dpA and dpB are established neighbours; dpC is reached through
	// dpA; dpD is known to nobody.
	dpA, dpB, dpC, dpD = proto.PeerName(0xaeafa6361837), proto.PeerName(0xe6b190cdda76), proto.PeerName(0x7e214a702f45), proto.PeerName(0x0a0b0c0d0e0f)
	dpEpA              = conn.Endpoint{Remote: netip.MustParseAddrPort("192.0.2.2:6783"), Local: netip.MustParseAddr("192.0.2.1")}
	dpEpB              = conn.Endpoint{Remote: netip.MustParseAddrPort("192.0.2.3:6783")}
	// dpFrom are where FuzzPeeringReceive's datagrams come from: the two
	// neighbours, a stranger, and A's address at another port.
	dpFrom = []conn.Endpoint{dpEpA, dpEpB, {Remote: netip.MustParseAddrPort("192.0.2.9:6783")},
		{Remote: netip.MustParseAddrPort("192.0.2.2:7000")}}
)

// dpData is a data message from src to dst carrying an IPv4 packet from
// one address to another, with hops relays crossed.
func dpData(src, dst proto.PeerName, from, to string, hops byte) []byte {
	b := make([]byte, proto.DataHeaderLen, 64)
	proto.PutDataHeader(b, src, dst)
	b[3] = hops
	f, t := netip.MustParseAddr(from).As4(), netip.MustParseAddr(to).As4()
	b = append(b, 0x45, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0)
	b = append(append(b, f[:]...), t[:]...)
	return append(b, 0x30, 0x39, 0x00, 0x35, 0, 8, 0, 0) // UDP header
}

// dpOps builds FuzzPeeringReceive inputs: datagrams, each from (1) |
// length (2) | bytes.
type dpOps []byte

func (o dpOps) add(from int, msg []byte) dpOps {
	o = append(o, byte(from))
	o = binary.BigEndian.AppendUint16(o, uint16(len(msg)))
	return append(o, msg...)
}

func dpSeeds() []dpOps {
	v6 := dpData(dpA, dpSelf, "10.40.2.5", "10.40.1.7", 0)[:proto.DataHeaderLen]
	v6 = append(v6, 0x60, 0, 0, 0, 0, 0, 17, 64)
	v6 = append(v6, make([]byte, 32)...)
	return []dpOps{
		// For us, and relayed.
		dpOps{}.add(0, dpData(dpA, dpSelf, "10.40.2.5", "10.40.1.7", 0)).
			add(1, dpData(dpB, dpSelf, "10.40.4.1", "10.40.1.200", 3)).
			add(1, dpData(dpC, dpSelf, "10.40.3.1", "10.40.1.8", 1)).
			add(0, dpData(dpA, dpB, "10.40.2.5", "10.40.4.9", 0)).
			add(1, dpData(dpB, dpC, "10.40.4.5", "10.40.3.9", 15)),
		// Dropped: from a stranger or a wrong port, too many hops, our
		// own name as source, an address we do not serve, an unknown
		// peer, IPv6.
		dpOps{}.add(2, dpData(dpA, dpSelf, "10.40.2.5", "10.40.1.7", 0)).
			add(3, dpData(dpA, dpSelf, "10.40.2.5", "10.40.1.7", 0)).
			add(0, dpData(dpA, dpB, "10.40.2.5", "10.40.4.9", 16)).
			add(0, dpData(dpSelf, dpSelf, "10.40.2.5", "10.40.1.7", 0)).
			add(0, dpData(dpA, dpSelf, "10.40.2.5", "10.40.2.7", 0)).
			add(1, dpData(dpB, dpD, "10.40.4.5", "10.40.9.9", 0)).
			add(0, v6),
		// Malformed, and control messages mixed in.
		dpOps{}.add(0, dpData(dpA, dpSelf, "10.40.2.5", "10.40.1.7", 0)[:10]).
			add(0, []byte{1, 6, 0, 0}).add(1, []byte{2, 6, 0, 0, 1}).add(2, nil).
			add(2, seedHello(proto.TypeHello)).
			add(0, proto.AppendHeartbeat(nil, proto.Heartbeat{Name: dpA, UID: 11, Established: true})).
			add(1, seedGossip()).
			add(0, dpData(dpA, dpSelf, "10.40.2.5", "10.40.1.9", 0)),
	}
}

// dpResult is what a router did with FuzzPeeringReceive's datagrams.
type dpResult struct {
	written  [][]byte    // packets written to the TUN device
	relayed  []fakeDgram // data messages sent
	received uint64      // the ReceivedPackets counter
	relays   uint64      // the RelayedPackets counter
}

// dpRun starts a plaintext Router over fakes, inside a synctest bubble,
// makes it a neighbour of dpA (which reports dpC behind it) and dpB, and
// hands it the datagrams of b.
func dpRun(t *testing.T, b []byte) (res dpResult) {
	synctest.Test(t, func(t *testing.T) {
		pc, dev := newFakePC(len(b)/3+16), newFakeTUN()
		r, err := peering.New(peering.Config{Name: dpSelf, Nickname: "self", UID: 1, Range: dpRange, MTU: 1420,
			Rand: rand.New(rand.NewPCG(1, 2)), Log: zap.NewNop()}, dev, pc)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- r.Run(ctx) }()
		defer func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		}()
		if err := r.SetLocal([]netip.Prefix{dpLocal}); err != nil {
			t.Fatal(err)
		}
		neighbour := func(ep conn.Endpoint, name proto.PeerName, uid uint64, entries ...proto.TopoPeer) {
			pc.in <- fakeDgram{ep, proto.AppendHello(nil, proto.TypeHello, &proto.Hello{MinVersion: 1, MaxVersion: 1,
				Name: name, UID: uid, Port: 6783, Range: dpRange, Nickname: "n"})}
			synctest.Wait()
			var proof uint64
			for _, d := range pc.take() {
				if h, err := proto.ParseHello(d.msg); err == nil && d.ep.Remote == ep.Remote && d.msg[1] == byte(proto.TypeAccept) {
					proof = h.Proof
				}
			}
			if proof == 0 {
				t.Fatalf("no accept for %v", name)
			}
			pc.in <- fakeDgram{ep, proto.AppendHeartbeat(nil, proto.Heartbeat{Name: name, UID: uid, Established: true, Proof: proof})}
			payload, err := proto.AppendTopoMsg(nil, &proto.TopoMsg{Kind: proto.TopoEntries, Entries: entries})
			if err != nil {
				t.Fatal(err)
			}
			g, err := proto.AppendGossip(nil, &proto.Gossip{Channel: proto.ChannelTopology, Src: name, Dst: dpSelf, Payload: payload})
			if err != nil {
				t.Fatal(err)
			}
			pc.in <- fakeDgram{ep, g}
			synctest.Wait()
		}
		conns := func(ps ...proto.PeerName) []proto.TopoConn {
			var cs []proto.TopoConn
			for _, p := range ps {
				cs = append(cs, proto.TopoConn{Peer: p, Established: true})
			}
			slices.SortFunc(cs, topoByPeer)
			return cs
		}
		neighbour(dpEpA, dpA, 11,
			proto.TopoPeer{Name: dpA, UID: 11, Version: 1, Port: 6783, Conns: conns(dpSelf, dpC), Prefixes: []netip.Prefix{netip.MustParsePrefix("10.40.2.0/24")}},
			proto.TopoPeer{Name: dpC, UID: 33, Version: 1, Port: 6783, Conns: conns(dpA), Prefixes: []netip.Prefix{netip.MustParsePrefix("10.40.3.0/24")}})
		neighbour(dpEpB, dpB, 22,
			proto.TopoPeer{Name: dpB, UID: 22, Version: 1, Port: 6783, Conns: conns(dpSelf), Prefixes: []netip.Prefix{netip.MustParsePrefix("10.40.4.0/24")}})
		if got := r.Reachable(); !slices.Equal(got, []proto.PeerName{dpC, dpA, dpB}) {
			t.Fatalf("the harness's peers are not reachable: %v", got)
		}
		pc.take()
		before := r.Stats().ReceivedPackets.Load()
		relaysBefore := r.Stats().RelayedPackets.Load()

		for len(b) >= 3 {
			from := dpFrom[int(b[0])%len(dpFrom)]
			n := min(int(binary.BigEndian.Uint16(b[1:])), len(b)-3)
			pc.in <- fakeDgram{from, bytes.Clone(b[3 : 3+n])}
			b = b[3+n:]
		}
		synctest.Wait()
		res.written = dev.take()
		for _, d := range pc.take() {
			if len(d.msg) >= 2 && d.msg[1] == byte(proto.TypeData) {
				res.relayed = append(res.relayed, d)
			}
		}
		res.received = r.Stats().ReceivedPackets.Load() - before
		res.relays = r.Stats().RelayedPackets.Load() - relaysBefore
	})
	return res
}

// FuzzPeeringReceive hands a running plaintext Router, with two
// established neighbours, datagrams from them, from a stranger and from a
// neighbour's address at another port. It never panics, Run ends cleanly,
// and:
//   - every packet written to the TUN device is the packet of a data
//     message from an established neighbour's endpoint, for our name, not
//     from our name, to an address we serve;
//   - every data message sent is a relay: one from an established
//     neighbour's endpoint, for another peer, with its hop count, below
//     MaxHops, raised by one and nothing else changed, sent to a
//     neighbour;
//   - the ReceivedPackets and RelayedPackets counters count them.
func FuzzPeeringReceive(f *testing.F) {
	for _, o := range dpSeeds() {
		f.Add([]byte(o))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		res := dpRun(t, b)
		// The data messages of the input that may come through.
		type cand struct {
			msg  []byte
			used bool
		}
		var cands []*cand
		for in := b; len(in) >= 3; {
			from := dpFrom[int(in[0])%len(dpFrom)]
			n := min(int(binary.BigEndian.Uint16(in[1:])), len(in)-3)
			msg := in[3 : 3+n]
			in = in[3+n:]
			if src, _, _, err := proto.ParseData(msg); err == nil && src != dpSelf && (from == dpEpA || from == dpEpB) {
				cands = append(cands, &cand{msg: msg})
			}
		}
		take := func(ok func(msg []byte) bool) bool {
			for _, c := range cands {
				if !c.used && ok(c.msg) {
					c.used = true
					return true
				}
			}
			return false
		}
		for _, pkt := range res.written {
			dst, ok := proto.DstAddr(pkt)
			if !ok || !dpLocal.Contains(dst) {
				t.Fatalf("wrote a packet for %v, which we do not serve: %x", dst, pkt)
			}
			if !take(func(msg []byte) bool {
				_, to, p, _ := proto.ParseData(msg)
				return to == dpSelf && bytes.Equal(p, pkt)
			}) {
				t.Fatalf("wrote a packet no data message for us from a neighbour carried: %x", pkt)
			}
		}
		for _, d := range res.relayed {
			if d.ep != dpEpA && d.ep != dpEpB {
				t.Fatalf("sent data to %v, not a neighbour", d.ep)
			}
			if !take(func(msg []byte) bool {
				_, to, _, _ := proto.ParseData(msg)
				return to != dpSelf && msg[3] < peering.MaxHops && len(msg) == len(d.msg) && d.msg[3] == msg[3]+1 &&
					bytes.Equal(msg[:3], d.msg[:3]) && bytes.Equal(msg[4:], d.msg[4:])
			}) {
				t.Fatalf("sent a data message that relays none from a neighbour: %x", d.msg)
			}
		}
		if res.received != uint64(len(res.written)) || res.relays != uint64(len(res.relayed)) {
			t.Fatalf("counted %d received and %d relayed, for %d written and %d relayed",
				res.received, res.relays, len(res.written), len(res.relayed))
		}
	})
}

// TestPeeringReceiveSeeds: the seeds of FuzzPeeringReceive get packets
// written to the TUN device and relayed, so that the fuzzer starts from
// the decisions, not from drops.
func TestPeeringReceiveSeeds(t *testing.T) {
	var written, relayed int
	for _, o := range dpSeeds() {
		res := dpRun(t, o)
		written += len(res.written)
		relayed += len(res.relayed)
	}
	if written != 4 || relayed != 2 {
		t.Errorf("the seeds got %d packets written and %d relayed, want 4 and 2", written, relayed)
	}
}
