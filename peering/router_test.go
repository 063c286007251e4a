package peering

import (
	"bytes"
	"context"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"golang.zx2c4.com/wireguard/tun/tuntest"

	"github.com/overlayd/overlayd/peering/conn"
	"github.com/overlayd/overlayd/peering/routes"
	"github.com/overlayd/overlayd/proto"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var testRange = netip.MustParsePrefix("10.40.0.0/16")

type node struct {
	r      *Router
	tun    *tuntest.ChannelTUN
	pc     *conn.UDP
	cancel context.CancelFunc
	done   chan error
}

func startNode(t *testing.T, name proto.PeerName, nick string, opts ...func(*Config)) *node {
	t.Helper()
	pc, err := conn.Listen(0)
	if err != nil {
		t.Fatal(err)
	}
	ct := tuntest.NewChannelTUN()
	cfg := Config{Name: name, Nickname: nick, Range: testRange, MTU: 1420, Discovery: true,
		Rand: rand.New(rand.NewPCG(uint64(name), 1)), Log: zaptest.NewLogger(t).Named(nick)}
	for _, o := range opts {
		o(&cfg)
	}
	r, err := New(cfg, ct.TUN(), pc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	n := &node{r: r, tun: ct, pc: pc, cancel: cancel, done: make(chan error, 1)}
	go func() { n.done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-n.done; err != nil {
			t.Errorf("%s: Run: %v", nick, err)
		}
	})
	return n
}

// newTestRouter makes a Router that is never run, over a channel TUN and a
// loopback socket.
func newTestRouter(t *testing.T, opts ...func(*Config)) *Router {
	t.Helper()
	pc, err := conn.Listen(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	cfg := Config{Name: 1, Nickname: "test", Range: testRange, MTU: 1420, Rand: rand.New(rand.NewPCG(1, 1)), Log: zap.NewNop()}
	for _, o := range opts {
		o(&cfg)
	}
	r, err := New(cfg, tuntest.NewChannelTUN().TUN(), pc)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// collect is the router's metrics in Prometheus's text format.
func collect(t *testing.T, r *Router) string {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(r.Collector())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, mf := range mfs {
		if _, err := expfmt.MetricFamilyToText(&b, mf); err != nil {
			t.Fatal(err)
		}
	}
	return b.String()
}

func (n *node) status(t *testing.T) Status {
	t.Helper()
	st, err := n.r.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 5s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestTwoRoutersInProcess runs two routers on loopback UDP with channel TUN
// devices: after the handshake and announcements, a packet read from A's
// TUN comes out of B's, byte for byte.
func TestTwoRoutersInProcess(t *testing.T) {
	ctx := context.Background()
	a := startNode(t, 0xa, "a")
	b := startNode(t, 0xb, "b")
	if err := b.r.Connect(ctx, []string{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), a.pc.LocalPort()).String()}); err != nil {
		t.Fatal(err)
	}
	addrA, addrB := netip.MustParseAddr("10.40.0.1"), netip.MustParseAddr("10.40.0.2")
	if err := a.r.SetLocal([]netip.Prefix{netip.PrefixFrom(addrA, 32)}); err != nil {
		t.Fatal(err)
	}
	if err := b.r.SetLocal([]netip.Prefix{netip.PrefixFrom(addrB, 32)}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a learns b's address", func() bool {
		for _, rt := range a.status(t).Routes {
			if rt.Prefix.Addr() == addrB && rt.Via == 0xb {
				return true
			}
		}
		return false
	})
	for i := range 3 {
		ping := tuntest.Ping(addrB, addrA)
		ping[len(ping)-1] = byte(i)
		a.tun.Outbound <- ping
		select {
		case got := <-b.tun.Inbound:
			if !bytes.Equal(got, ping) {
				t.Fatalf("b got % x, a sent % x", got, ping)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("packet did not arrive")
		}
	}
	// Unroutable packets are dropped and counted.
	a.tun.Outbound <- tuntest.Ping(netip.MustParseAddr("10.40.9.9"), addrA)
	eventually(t, "drop counted", func() bool { return a.r.Stats().DropUnroutable.Load() == 1 })

	st := b.status(t)
	if len(st.Connections) != 1 || st.Connections[0].State != "established" || st.Connections[0].Name != 0xa {
		t.Errorf("b's connections: %+v", st.Connections)
	}
	if len(st.Peers) != 2 || st.Peers[1].Name != 0xa || !st.Peers[1].Connections[0].Established {
		t.Errorf("b's peers: %+v", st.Peers)
	}
}

// dataPathFixture is a router with a published snapshot and a real UDP
// socket pair, for allocation tests and benchmarks of the packet path.
type dataPathFixture struct {
	r       *Router
	send    conn.Sender
	bufs    [][]byte
	sizes   []int
	b       batcher
	relay   batcher
	in      [][]byte
	inSizes []int
	inAddrs []conn.Endpoint
	out     [][]byte
	sink    *conn.UDP
	sinkRd  conn.Reader
}

func newDataPathFixture(t testing.TB, batch int) *dataPathFixture {
	pc, err := conn.Listen(0)
	if err != nil {
		t.Fatal(err)
	}
	sink, err := conn.Listen(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close(); sink.Close() })
	r, err := New(Config{Name: 1, MTU: 1420, Rand: rand.New(rand.NewPCG(1, 1)), Log: zap.NewNop()},
		tuntest.NewChannelTUN().TUN(), pc)
	if err != nil {
		t.Fatal(err)
	}
	peerEP := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), sink.LocalPort())
	peer := &path{name: 2, ep: conn.Endpoint{Remote: peerEP}}
	self := &path{name: 1, local: true}
	r.snap.Store(&snapshot{
		routes: routes.New([]routes.Route[*path]{
			{Prefix: netip.MustParsePrefix("10.40.0.2/32"), Via: peer},
			{Prefix: netip.MustParsePrefix("10.40.0.1/32"), Via: self},
		}),
		peers: map[netip.AddrPort]*path{peerEP: peer},
	})
	f := &dataPathFixture{r: r, send: pc.NewSender(batch), sink: sink, sinkRd: sink.NewReader(batch)}
	pkt := tuntest.Ping(netip.MustParseAddr("10.40.0.2"), netip.MustParseAddr("10.40.0.1"))
	reply := tuntest.Ping(netip.MustParseAddr("10.40.0.1"), netip.MustParseAddr("10.40.0.2"))
	for range batch {
		buf := make([]byte, proto.DataHeaderLen+maxDatagram)
		copy(buf[proto.DataHeaderLen:], pkt)
		f.bufs = append(f.bufs, buf)
		f.sizes = append(f.sizes, len(pkt))
		in := make([]byte, proto.DataHeaderLen+maxDatagram)
		proto.PutDataHeader(in, 2, 1)
		copy(in[proto.DataHeaderLen:], reply)
		f.in = append(f.in, in)
		f.inSizes = append(f.inSizes, proto.DataHeaderLen+len(reply))
		f.inAddrs = append(f.inAddrs, conn.Endpoint{Remote: peerEP})
	}
	f.out = make([][]byte, 0, batch)
	return f
}

// forwardBatch does what tunToPeers does with one batch read from the TUN.
func (f *dataPathFixture) forwardBatch(t testing.TB) {
	f.r.forward(f.bufs, f.sizes, &f.b)
	for i := range f.b.n {
		g := &f.b.groups[i]
		if _, err := f.send.Send(g.bufs, g.p.ep); err != nil {
			t.Fatal(err)
		}
	}
	f.b.reset()
}

// drain reads n datagrams from the sink so its buffer never fills.
func (f *dataPathFixture) drain(t testing.TB, n int) {
	for got := 0; got < n; {
		k, err := f.sinkRd.Read(f.in[:min(len(f.in), n-got)], f.inSizes, f.inAddrs)
		if err != nil {
			t.Fatal(err)
		}
		got += k
	}
}

// TestDataPathAllocatesNothing: forwarding a batch from the TUN to a peer
// (route lookup, header in place, grouping, sendmmsg) and accepting a batch
// from a peer allocate nothing per packet or per batch.
func TestDataPathAllocatesNothing(t *testing.T) {
	const batch = 64
	f := newDataPathFixture(t, batch)
	f.forwardBatch(t) // warm up the batcher's slices
	f.drain(t, batch)
	if n := testing.AllocsPerRun(100, func() {
		f.forwardBatch(t)
		f.drain(t, batch)
	}); n != 0 {
		t.Errorf("TUN to peers: %v allocations per batch of %d", n, batch)
	}
	if got := f.r.stats.SentPackets.Load(); got != 101*batch+batch {
		t.Errorf("sent %d packets", got)
	}
	// The drain reused the receive buffers; rebuild them as data for us.
	f2 := newDataPathFixture(t, batch)
	if n := testing.AllocsPerRun(100, func() {
		f2.out = f2.r.receive(f2.in, f2.inSizes, f2.inAddrs, f2.out[:0], &f2.relay)
		if len(f2.out) != batch {
			t.Fatalf("accepted %d of %d", len(f2.out), batch)
		}
	}); n != 0 {
		t.Errorf("peers to TUN: %v allocations per batch of %d", n, batch)
	}
}

func BenchmarkForward(b *testing.B) {
	const batch = 64
	f := newDataPathFixture(b, batch)
	b.ReportAllocs()
	b.SetBytes(int64(batch * f.sizes[0]))
	for b.Loop() {
		f.forwardBatch(b)
		f.drain(b, batch)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*batch), "ns/packet")
}

func BenchmarkReceive(b *testing.B) {
	const batch = 64
	f := newDataPathFixture(b, batch)
	b.ReportAllocs()
	for b.Loop() {
		f.out = f.r.receive(f.in, f.inSizes, f.inAddrs, f.out[:0], &f.relay)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*batch), "ns/packet")
}

// fakePeer is a hand-driven peer on a plain socket: it does the handshake
// and then sends whatever the test wants.
type fakePeer struct {
	t    *testing.T
	pc   *conn.UDP
	send conn.Sender
	to   conn.Endpoint
	name proto.PeerName
	uid  uint64
}

func newFakePeer(t *testing.T, to *node, name proto.PeerName, uid uint64) *fakePeer {
	pc, err := conn.Listen(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	f := &fakePeer{t: t, pc: pc, send: pc.NewSender(64), name: name, uid: uid,
		to: conn.Endpoint{Remote: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), to.pc.LocalPort())}}
	f.datagram(proto.AppendHello(nil, proto.TypeHello, &proto.Hello{MinVersion: 1, MaxVersion: 1, Name: name,
		UID: uid, Port: pc.LocalPort(), Range: testRange, Nickname: "fake"}))
	bufs, sizes, eps := [][]byte{make([]byte, 2000)}, make([]int, 1), make([]conn.Endpoint, 1)
	var proof uint64
	for {
		if _, err := pc.NewReader(1).Read(bufs, sizes, eps); err != nil {
			t.Fatal(err)
		}
		if h, err := proto.ParseHello(bufs[0][:sizes[0]]); err == nil {
			proof = h.Proof
			break
		}
	}
	if proof == 0 {
		t.Fatal("the accept carries no proof")
	}
	f.datagram(proto.AppendHeartbeat(nil, proto.Heartbeat{Name: name, UID: uid, Established: true, Proof: proof}))
	return f
}

func (f *fakePeer) datagram(bs ...[]byte) {
	if _, err := f.send.Send(bs, f.to); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakePeer) gossip(g proto.Gossip) []byte {
	b, err := proto.AppendGossip(nil, &g)
	if err != nil {
		f.t.Fatal(err)
	}
	return b
}

// TestBadGossipIsRefused: gossip that claims another origin, a topology
// entry of the sender with a forged UID, malformed topology payloads and
// chunks that never complete are all refused and counted; memory for
// partial messages stays bounded; the router keeps working.
func TestBadGossipIsRefused(t *testing.T) {
	a := startNode(t, 0xa, "a")
	f := newFakePeer(t, a, 0xf, 77)
	eventually(t, "fake peer established", func() bool {
		cs := a.status(t).Connections
		return len(cs) == 1 && cs[0].State == "established"
	})
	topo := func(m proto.TopoMsg) []byte {
		b, err := proto.AppendTopoMsg(nil, &m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	forged := topo(proto.TopoMsg{Kind: proto.TopoEntries, Entries: []proto.TopoPeer{{Name: 0xf, UID: 666, Version: 9}}})
	f.datagram(
		f.gossip(proto.Gossip{Channel: proto.ChannelTopology, Src: 0xb, Dst: 0xa, Payload: forged}),                // another origin
		f.gossip(proto.Gossip{Channel: proto.ChannelTopology, Src: 0xf, Dst: 0xa, Payload: forged}),                // its own entry, forged UID
		f.gossip(proto.Gossip{Channel: proto.ChannelTopology, Src: 0xf, Dst: 0xa, Payload: []byte{4, 0, 9, 1, 2}}), // malformed
		f.gossip(proto.Gossip{Channel: proto.ChannelTopology, Src: 0xf, Dst: 0xa, Payload: []byte{77}}),            // unknown kind
	)
	// Chunks that never complete, far more than the limits.
	var chunks [][]byte
	for id := range uint32(2000) {
		chunks = append(chunks, f.gossip(proto.Gossip{Channel: proto.ChannelTopology, Src: 0xf, Dst: 0xa,
			Chunk: &proto.Chunk{MsgID: id, Index: 0, Count: 3}, Payload: make([]byte, 1000)}))
		if len(chunks) == 64 {
			f.datagram(chunks...)
			chunks = chunks[:0]
			time.Sleep(time.Millisecond) // let the control loop keep up
		}
	}
	eventually(t, "refusals counted", func() bool { return a.r.Stats().GossipRejected.Load() >= 4 })
	st := a.status(t)
	if st.GossipPartial > 8 { // one origin may keep gossip.MaxPartialPerSrc
		t.Errorf("%d partial messages kept", st.GossipPartial)
	}
	for _, p := range st.Peers {
		if p.Name == 0xf && p.UID == 666 {
			t.Error("the forged entry was taken")
		}
	}
	// Still working: a keeps the connection and answers a good hash.
	if cs := st.Connections; len(cs) != 1 || cs[0].State != "established" {
		t.Errorf("connections after the junk: %+v", cs)
	}
}

func loopback(n *node) string {
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), n.pc.LocalPort()).String()
}

// TestUnicastGossipRelayed: in a line a - b - c without discovery, a's
// unicast gossip to c, too big for one datagram, is relayed by b and
// arrives whole; a and c learn each other from the topology and route
// through b.
func TestUnicastGossipRelayed(t *testing.T) {
	ctx := context.Background()
	got := make(chan []byte, 1)
	noDiscovery := func(c *Config) { c.Discovery = false }
	testChannel := func(c *Config) {
		c.Channels = map[string]func(proto.PeerName, []byte){"test": func(proto.PeerName, []byte) {}}
	}
	a := startNode(t, 0xa, "a", noDiscovery, testChannel)
	b := startNode(t, 0xb, "b", noDiscovery)
	c := startNode(t, 0xc, "c", noDiscovery, func(c *Config) {
		c.Channels = map[string]func(proto.PeerName, []byte){"test": func(src proto.PeerName, p []byte) {
			if src == 0xa {
				got <- p
			}
		}}
	})
	a.r.Connect(ctx, []string{loopback(b)})
	c.r.Connect(ctx, []string{loopback(b)})
	eventually(t, "a knows c and routes through b", func() bool {
		return len(a.status(t).Peers) == 3 && len(c.status(t).Peers) == 3
	})
	if n := len(a.status(t).Connections); n != 1 {
		t.Errorf("a has %d connections without discovery", n)
	}
	payload := make([]byte, 5000)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	out := a.r.Outbox("test")
	eventually(t, "unicast delivered", func() bool {
		if !out.Send(0xc, payload) {
			return false
		}
		select {
		case p := <-got:
			if !bytes.Equal(p, payload) {
				t.Fatalf("c got %d bytes, not the payload", len(p))
			}
			return true
		case <-time.After(200 * time.Millisecond):
			return false
		}
	})
	// b counts a chunk just after it passes it on.
	eventually(t, "b counted the 5 chunks it relayed", func() bool { return b.r.Stats().GossipRelayed.Load() >= 5 })
	before := out.Unreachable()
	out.Send(0x99, payload)
	eventually(t, "a message to a stranger counted", func() bool { return out.Unreachable() == before+1 })
	// A broadcast reaches c too.
	out.Broadcast([]byte("to all"))
	select {
	case p := <-got:
		if string(p) != "to all" {
			t.Errorf("broadcast: c got %q", p)
		}
	case <-time.After(5 * time.Second):
		t.Error("broadcast: c got nothing")
	}
}

// TestOutboxFull: with the control loop not running, Send and Broadcast
// fill the outbox and then drop and count, never blocking; the queue is
// bounded in messages and in bytes; an oversize message is dropped.
func TestOutboxFull(t *testing.T) {
	r := newTestRouter(t, func(c *Config) {
		c.Channels = map[string]func(proto.PeerName, []byte){"IPallocation": func(proto.PeerName, []byte) {}, "nameserver": nil}
	})
	if r.Outbox("topology") != nil || r.Outbox("nope") != nil {
		t.Fatal("outboxes for channels not configured")
	}
	o := r.Outbox("IPallocation")
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range OutboxLen {
			var ok bool
			if i%2 == 0 {
				ok = o.Broadcast([]byte{byte(i)})
			} else {
				ok = o.Send(7, []byte{byte(i)})
			}
			if !ok {
				t.Errorf("message %d dropped with room left", i)
				return
			}
		}
		for range 100 {
			if o.Send(7, []byte("x")) || o.Broadcast([]byte("y")) {
				t.Error("a full outbox took a message")
				return
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Send blocked")
	}
	if got := o.Dropped(); got != 200 {
		t.Errorf("dropped %d, want 200", got)
	}
	// The other channel's outbox is its own, and bounded in bytes too.
	n := r.Outbox("nameserver")
	big := make([]byte, OutboxBytes/4)
	for i := range 4 {
		if !n.Send(7, big) {
			t.Fatalf("big message %d dropped", i)
		}
	}
	if n.Send(7, []byte{1}) || n.Dropped() != 1 {
		t.Errorf("an outbox over %d bytes took a message (dropped %d)", OutboxBytes, n.Dropped())
	}
	if n.Broadcast(make([]byte, 4<<20+1)) || n.Dropped() != 2 {
		t.Error("an oversize message was queued")
	}
	if n.Send(0, []byte{1}) {
		t.Error("a message for peer 0 was queued")
	}
	// The metric counts drops per channel.
	body := collect(t, r)
	for _, want := range []string{`overlayd_gossip_dropped_total{channel="IPallocation",reason="queue_full"} 200`,
		`overlayd_gossip_dropped_total{channel="nameserver",reason="queue_full"} 2`} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %s:\n%s", want, body)
		}
	}
}

// nopPlane is a DataPlane that takes every program.
type nopPlane struct{}

func (nopPlane) Program([]DataPeer) error { return nil }

// TestPlainDataSource: in password mode with trusted subnets, data in
// clear is taken only from a neighbour whose connection is plaintext, and
// only with a source address our routes send towards that neighbour, as
// WireGuard's allowed IPs would require: not another peer's address, not
// ours, not from an encrypted neighbour.
func TestPlainDataSource(t *testing.T) {
	pc, err := conn.Listen(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	div := NewDivert(tuntest.NewChannelTUN().TUN())
	r, err := New(Config{Name: 1, MTU: 1420, Rand: rand.New(rand.NewPCG(1, 1)), Log: zap.NewNop(),
		DataPlane: nopPlane{}, TrustedSubnets: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, Divert: div}, nil, pc)
	if err != nil {
		t.Fatal(err)
	}
	plainEP := netip.MustParseAddrPort("127.0.0.2:6783")
	encEP := netip.MustParseAddrPort("127.0.0.3:6783")
	plain := &path{name: 2, hop: 2, ep: conn.Endpoint{Remote: plainEP}, plain: true}
	enc := &path{name: 3, hop: 3, ep: conn.Endpoint{Remote: encEP}}
	self := &path{name: 1, local: true}
	r.snap.Store(&snapshot{
		routes: routes.New([]routes.Route[*path]{
			{Prefix: netip.MustParsePrefix("10.40.0.2/32"), Via: plain},
			{Prefix: netip.MustParsePrefix("10.40.0.3/32"), Via: enc},
			{Prefix: netip.MustParsePrefix("10.40.0.1/32"), Via: self},
		}),
		peers:  map[netip.AddrPort]*path{plainEP: plain, encEP: enc},
		byName: map[proto.PeerName]*path{2: plain, 3: enc},
	})
	us := netip.MustParseAddr("10.40.0.1")
	for _, c := range []struct {
		name     string
		from     netip.AddrPort
		src      proto.PeerName
		inner    string
		accepted bool
	}{
		{"the plaintext peer's own address", plainEP, 2, "10.40.0.2", true},
		{"another peer's address", plainEP, 2, "10.40.0.3", false},
		{"our own address", plainEP, 2, "10.40.0.1", false},
		{"an address nobody serves", plainEP, 2, "10.40.0.9", false},
		{"from an encrypted neighbour", encEP, 3, "10.40.0.3", false},
	} {
		before := r.stats.DropPlainData.Load()
		pkt := tuntest.Ping(us, netip.MustParseAddr(c.inner))
		msg := make([]byte, proto.DataHeaderLen+len(pkt))
		proto.PutDataHeader(msg, c.src, 1)
		copy(msg[proto.DataHeaderLen:], pkt)
		var relay batcher
		out := r.receive([][]byte{msg}, []int{len(msg)}, []conn.Endpoint{{Remote: c.from}}, nil, &relay)
		if got := len(out) == 1; got != c.accepted {
			t.Errorf("%s: accepted %v, want %v", c.name, got, c.accepted)
		}
		if dropped := r.stats.DropPlainData.Load() - before; dropped != 0 == c.accepted {
			t.Errorf("%s: %d counted as plaintext data refused", c.name, dropped)
		}
	}
}

// TestFloodKeepsPeers floods a router with hellos from one stranger's
// address, far more than its control loop takes, while a peer keeps its
// connection and a new peer connects: the peers' heartbeats have a queue of
// their own, which the flood never fills, and the flooding address has its
// share of the strangers' queue (strangerRate), not all of it, so the
// connection stays established, the new one is made, and only the
// flooder's datagrams are dropped.
func TestFloodKeepsPeers(t *testing.T) {
	ctx := context.Background()
	a := startNode(t, 0xa, "a")
	b := startNode(t, 0xb, "b")
	aAddr := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), a.pc.LocalPort())
	if err := b.r.Connect(ctx, []string{aAddr.String()}); err != nil {
		t.Fatal(err)
	}
	established := func() bool {
		for _, c := range a.status(t).Connections {
			if c.Name == 0xb && c.State == "established" {
				return true
			}
		}
		return false
	}
	eventually(t, "a and b connected", established)
	// From another address than the peers' (all on 127.0.0.1).
	flooder, err := net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.9:0")), net.UDPAddrFromAddrPort(aAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer flooder.Close()
	hello := proto.AppendHello(nil, proto.TypeHello, &proto.Hello{MinVersion: 1, MaxVersion: 1, Name: 0x77, UID: 7, Range: testRange, Nickname: "flood"})
	hello = append(hello, make([]byte, max(0, proto.HelloMinLen-len(hello)))...)
	stop := make(chan struct{})
	var sent atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			for range 64 {
				flooder.Write(hello)
			}
			sent.Add(64)
		}
	})
	// Four heartbeat time-outs under the flood, and a new peer meanwhile.
	c := startNode(t, 0xc, "c")
	if err := c.r.Connect(ctx, []string{aAddr.String()}); err != nil {
		t.Fatal(err)
	}
	var joined bool
	for end := time.Now().Add(4 * a.r.cfg.HeartbeatTimeout); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if !established() {
			close(stop)
			wg.Wait()
			t.Fatalf("a lost b under a flood of %d hellos: %+v", sent.Load(), a.status(t).Connections)
		}
		for _, conn := range a.status(t).Connections {
			joined = joined || conn.Name == 0xc && conn.State == "established"
		}
	}
	close(stop)
	wg.Wait()
	st := a.r.Stats()
	if !joined {
		t.Errorf("c could not connect to a under the flood: %+v", a.status(t).Connections)
	}
	if st.DropSourceRate.Load() == 0 {
		t.Errorf("%d hellos and none dropped beyond the flooder's rate", sent.Load())
	}
	if n := st.DropPeerQueue.Load() + st.DropPeerRate.Load(); n != 0 {
		t.Errorf("%d datagrams of the established peer dropped", n)
	}
	t.Logf("%d hellos sent in %v: %d dropped beyond the flooder's rate, %d from a full strangers' queue; the peer stayed established and another connected",
		sent.Load(), 4*a.r.cfg.HeartbeatTimeout, st.DropSourceRate.Load(), st.DropCtrlQueue.Load())
}

// TestControlShares: one source's control datagrams beyond its burst are
// dropped, for a stranger's address (whatever its port) and an established
// peer's endpoint alike, and another source still gets its own.
func TestControlShares(t *testing.T) {
	pc, err := conn.Listen(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	r, err := New(Config{Name: 1, MTU: 1420, Rand: rand.New(rand.NewPCG(1, 1)), Log: zap.NewNop()}, tuntest.NewChannelTUN().TUN(), pc)
	if err != nil {
		t.Fatal(err)
	}
	peerEP := netip.MustParseAddrPort("127.0.0.2:6783")
	peer := &path{name: 2, hop: 2, ep: conn.Endpoint{Remote: peerEP}}
	r.snap.Store(&snapshot{routes: routes.New[*path](nil), peers: map[netip.AddrPort]*path{peerEP: peer}, byName: map[proto.PeerName]*path{2: peer}})
	hello := proto.AppendHello(nil, proto.TypeHello, &proto.Hello{MinVersion: 1, MaxVersion: 1, Name: 0x77, UID: 7, Range: testRange})
	send := func(from netip.AddrPort, n int) {
		for range n {
			var relay batcher
			r.receive([][]byte{slices.Clone(hello)}, []int{len(hello)}, []conn.Endpoint{{Remote: from}}, nil, &relay)
		}
	}
	drain := func() (n int) {
		for {
			select {
			case <-r.ctrl:
			case <-r.peerCtrl:
			default:
				return n
			}
			n++
		}
	}
	for _, c := range []struct {
		name     string
		from     func(i int) netip.AddrPort // the i-th datagram's source
		burst    int
		dropped  *atomic.Uint64
		otherSrc netip.AddrPort
	}{
		{"a stranger, from many ports", func(i int) netip.AddrPort {
			return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.9"), uint16(1000+i))
		},
			strangerBurst, &r.stats.DropSourceRate, netip.MustParseAddrPort("127.0.0.10:6783")},
		{"an established peer", func(int) netip.AddrPort { return peerEP },
			peerBurst, &r.stats.DropPeerRate, netip.MustParseAddrPort("127.0.0.11:6783")},
	} {
		before := c.dropped.Load()
		sent, got := 0, 0
		// In rounds a queue's length, drained between them, so that only
		// the rate drops.
		for sent < c.burst+ctrlQueueLen {
			for range ctrlQueueLen {
				send(c.from(sent), 1)
				sent++
			}
			got += drain()
		}
		// The rate refills a few tokens while the test runs.
		if got < c.burst || got > c.burst+c.burst/10 {
			t.Errorf("%s: %d of %d datagrams queued, want its burst of %d", c.name, got, sent, c.burst)
		}
		if c.dropped.Load() == before {
			t.Errorf("%s: none counted as dropped beyond its rate", c.name)
		}
		send(c.otherSrc, 5)
		if n := drain(); n != 5 {
			t.Errorf("after %s spent its share, another source got %d of 5 queued", c.name, n)
		}
	}
}
