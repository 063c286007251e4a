package link

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"

	"github.com/overlayd/overlayd/peering/handshake"
	"github.com/overlayd/overlayd/peering/secure"
	"github.com/overlayd/overlayd/proto"
)

var testRange = netip.MustParsePrefix("10.40.0.0/16")

// net is a deterministic in-memory network of Machines, one per address.
// Every datagram sent is delivered within the same step unless its link is
// cut; a step is one Tick of every Machine.
type net struct {
	t      *testing.T
	nodes  map[netip.Addr]*Machine
	order  []netip.Addr
	cut    map[[2]netip.Addr]bool // silent links, both ways
	log    []string               // events, for failure messages
	events map[netip.Addr][]Event // every event, by machine
	// tap, if set, sees every datagram delivered; false drops it.
	tap func(from, to netip.Addr, msg []byte) bool
}

func newNet(t *testing.T) *net {
	return &net{t: t, nodes: map[netip.Addr]*Machine{}, cut: map[[2]netip.Addr]bool{}, events: map[netip.Addr][]Event{}}
}

func addr(i int) netip.Addr { return netip.AddrFrom4([4]byte{192, 168, 0, byte(i)}) }

// add starts a Machine at addr(i) with the given name, uid and range.
func (n *net) add(i int, name proto.PeerName, uid uint64, rng netip.Prefix) *Machine {
	n.t.Helper()
	return n.addWith(i, name, uid, rng, nil)
}

// addWith is add with a password mode configuration (nil: plaintext).
func (n *net) addWith(i int, name proto.PeerName, uid uint64, rng netip.Prefix, sec *secure.Config) *Machine {
	n.t.Helper()
	m, err := New(Config{
		Self:   handshake.Config{Name: name, UID: uid, Nickname: fmt.Sprintf("h%d", i), Port: DefaultPort, Range: rng},
		Rand:   rand.New(rand.NewPCG(uint64(i), uid)),
		Secure: sec,
	})
	if err != nil {
		n.t.Fatal(err)
	}
	if _, ok := n.nodes[addr(i)]; !ok {
		n.order = append(n.order, addr(i))
	}
	n.nodes[addr(i)] = m
	return m
}

// deliver carries every pending datagram (and those they cause) until
// nobody has anything to send.
func (n *net) deliver() {
	for range 100 {
		moved := false
		for _, from := range n.order {
			m := n.nodes[from]
			rd := m.Ready()
			m.Advance()
			for _, e := range rd.Events {
				n.log = append(n.log, fmt.Sprintf("t=%d %v: %+v", m.Now(), from, e))
			}
			n.events[from] = append(n.events[from], rd.Events...)
			for _, d := range rd.Sends {
				to := d.To.Remote.Addr()
				if n.cut[[2]netip.Addr{from, to}] || n.cut[[2]netip.Addr{to, from}] || n.nodes[to] == nil {
					continue
				}
				if n.tap != nil && !n.tap(from, to, d.Msg) {
					continue
				}
				moved = true
				n.nodes[to].Step(Endpoint{Remote: netip.AddrPortFrom(from, DefaultPort), Local: to}, d.Msg)
			}
		}
		if !moved {
			return
		}
	}
	n.t.Fatal("messages still flowing after 100 rounds")
}

// run ticks every Machine k times, delivering after each tick.
func (n *net) run(k int) {
	for range k {
		for _, a := range n.order {
			n.nodes[a].Tick()
		}
		n.deliver()
	}
}

func (n *net) connState(m *Machine, address string) string {
	for _, c := range m.Status().Connections {
		if c.Address == address {
			return c.State
		}
	}
	return "none"
}

func (n *net) dump() string { return strings.Join(n.log, "\n") }

func targetOf(i int) string { return netip.AddrPortFrom(addr(i), DefaultPort).String() }

func establish(t *testing.T) (*net, *Machine, *Machine) {
	n := newNet(t)
	a := n.add(1, 0xa, 1, testRange)
	b := n.add(2, 0xb, 2, testRange)
	if err := b.Connect([]string{addr(1).String()}); err != nil {
		t.Fatal(err)
	}
	n.run(1)
	if got := n.connState(b, targetOf(1)); got != "established" {
		t.Fatalf("b's connection is %s after one tick\n%s", got, n.dump())
	}
	if got := n.connState(a, targetOf(2)); got != "established" {
		t.Fatalf("a's connection is %s after one tick\n%s", got, n.dump())
	}
	return n, a, b
}

func TestHandshakeAndGossip(t *testing.T) {
	n, a, b := establish(t)
	st := b.Status()
	if len(st.Peers) != 2 || st.Peers[1].Name != 0xa || !st.Peers[1].Connections[0].Established {
		t.Errorf("b's peers: %+v", st.Peers)
	}
	// Gossip from a goes up to b's shell, checked.
	g, _ := proto.AppendGossip(nil, &proto.Gossip{Channel: "topology", Src: 0xa, Payload: []byte("x")})
	if err := b.Step(Endpoint{Remote: netip.AddrPortFrom(addr(1), DefaultPort)}, g); err != nil {
		t.Fatal(err)
	}
	if got := b.Ready().Gossip; len(got) != 1 || got[0].From != 0xa || got[0].FromUID != 1 || string(got[0].Msg.Payload) != "x" {
		t.Errorf("gossip handed up: %+v", got)
	}
	// Gossip claiming to come straight from another peer is refused.
	forged, _ := proto.AppendGossip(nil, &proto.Gossip{Channel: "topology", Src: 0xc, Payload: []byte("x")})
	if err := b.Step(Endpoint{Remote: netip.AddrPortFrom(addr(1), DefaultPort)}, forged); !errors.Is(err, ErrImpostor) || b.Impostors != 1 {
		t.Errorf("forged origin: %v", err)
	}
	if err := b.Step(Endpoint{Remote: netip.MustParseAddrPort("192.168.0.77:6783")}, g); !errors.Is(err, ErrStranger) {
		t.Errorf("stranger: %v", err)
	}
	_, _ = n, a
}

// TestTimeout: a silent peer is dropped exactly when TimeoutTicks have
// passed without a word, and its target is retried after a jittered wait.
func TestTimeout(t *testing.T) {
	n, a, b := establish(t)
	n.run(30)
	n.cut[[2]netip.Addr{addr(1), addr(2)}] = true
	for i := 1; ; i++ {
		n.run(1)
		if n.connState(b, targetOf(1)) != "established" {
			// The last heartbeat came at most 3 ticks before the cut; the
			// drop comes on the first tick more than 20 after it.
			if i < 18 || i > 21 {
				t.Errorf("dropped %d ticks after the cut, want 18-21 (time-out 20 ticks)", i)
			}
			break
		}
		if i > 30 {
			t.Fatal("never dropped")
		}
	}
	st := b.Status()
	if len(st.Connections) != 1 || st.Connections[0].State != "failed" ||
		!errors.Is(st.Connections[0].Err, errTimeout) || st.Connections[0].RetryTicks < 10 || st.Connections[0].RetryTicks >= 30 {
		t.Errorf("b's target: %+v", st.Connections)
	}
	_ = a
	// Healed: b redials and both are established again.
	delete(n.cut, [2]netip.Addr{addr(1), addr(2)})
	n.run(31)
	if n.connState(b, targetOf(1)) != "established" {
		t.Errorf("not re-established\n%s", n.dump())
	}
}

// TestBackoff: an unanswered target fails after HelloAttempts hellos and
// is retried after waits that grow by half each time, up to the cap.
func TestBackoff(t *testing.T) {
	n := newNet(t)
	b := n.add(2, 0xb, 2, testRange)
	b.Connect([]string{addr(9).String()})
	var fails []int64
	var retries []int
	prev := "none"
	for range 3000 {
		n.run(1)
		st := b.Status().Connections[0]
		if st.State == "failed" && prev != "failed" {
			fails = append(fails, b.Now())
			retries = append(retries, st.RetryTicks)
			if st.Err == nil || st.Err.Error() != "no answer to 5 hellos" {
				t.Fatalf("err %v", st.Err)
			}
		}
		prev = st.State
	}
	if len(fails) < 5 {
		t.Fatalf("failures at %v", fails)
	}
	if fails[0] != 51 { // hellos at ticks 1, 11, 21, 31, 41; given up at 51
		t.Errorf("first failure at tick %d, want 51", fails[0])
	}
	base := []int{20, 30, 45, 67}
	for i, d := range base {
		if retries[i] < d/2 || retries[i] >= d/2+d {
			t.Errorf("retry %d after %d ticks, want [%d, %d)", i, retries[i], d/2, d/2+d)
		}
	}
	for _, r := range retries {
		if r >= 900 {
			t.Errorf("retry after %d ticks: the cap is 600 (±50%%)", r)
		}
	}
}

func TestRangeMismatchRefusedOnBothSides(t *testing.T) {
	n := newNet(t)
	a := n.add(1, 0xa, 1, testRange)
	b := n.add(2, 0xb, 2, netip.MustParsePrefix("10.50.0.0/16"))
	b.Connect([]string{addr(1).String()})
	n.run(1)
	want := map[netip.Addr]string{
		addr(1): "Incompatible IP allocation ranges (received: 10.50.0.0/16, ours: 10.40.0.0/16)",
		addr(2): "Incompatible IP allocation ranges (received: 10.40.0.0/16, ours: 10.50.0.0/16)",
	}
	for _, ad := range []netip.Addr{addr(1), addr(2)} {
		if !strings.Contains(n.dump(), ad.String()+": {Kind:3") || !strings.Contains(n.dump(), want[ad]) {
			t.Errorf("%v did not report %q:\n%s", ad, want[ad], n.dump())
		}
	}
	if len(a.Status().Connections) != 0 {
		t.Errorf("a keeps %+v", a.Status().Connections)
	}
	st := b.Status().Connections
	var re *handshake.RangeError
	if len(st) != 1 || st[0].State != "failed" || !errors.As(st[0].Err, &re) || st[0].RetryNever {
		t.Errorf("b's target: %+v", st)
	}
}

// TestCollisionAndSelf: a target that is our own address is never
// retried; a peer that reports a name collision is retried with back-off,
// as anyone could have sent that reject.
func TestCollisionAndSelf(t *testing.T) {
	n := newNet(t)
	n.add(1, 0xa, 1, testRange)
	b := n.add(2, 0xa, 2, testRange) // same name, other process
	b.Connect([]string{addr(1).String(), addr(2).String()})
	n.run(3)
	for i, c := range b.Status().Connections {
		if c.State != "failed" || c.RetryNever != (i == 1) {
			t.Errorf("%s: %+v", c.Address, c)
		}
	}
	if got := b.Status().Connections[1].Err; !errors.Is(got, errCannotConnectToOurself) {
		t.Errorf("self: %v", got)
	}
}

func TestSimultaneousOpen(t *testing.T) {
	n := newNet(t)
	a := n.add(1, 0xa, 1, testRange)
	b := n.add(2, 0xb, 2, testRange)
	a.Connect([]string{addr(2).String()})
	b.Connect([]string{addr(1).String()})
	n.run(2)
	for _, m := range []*Machine{a, b} {
		cs := m.Status().Connections
		if len(cs) != 1 || cs[0].State != "established" || !cs[0].Outbound {
			t.Errorf("%+v\n%s", cs, n.dump())
		}
	}
}

// TestRestart: a peer that restarts (same name and address, new UID) is
// replaced cleanly.
func TestRestart(t *testing.T) {
	n, _, b := establish(t)
	n.run(5)
	n.add(1, 0xa, 99, testRange) // restarted a
	n.run(60)                    // b times out, redials and meets the new a
	if n.connState(b, targetOf(1)) != "established" {
		t.Fatalf("not re-established:\n%s", n.dump())
	}
	if uid := b.Status().Peers[1].UID; uid != 99 {
		t.Errorf("b knows UID %d, want the new incarnation's", uid)
	}
}

// TestConnLimitAndDiscovery: discovered targets are dialled but not listed
// as targets; beyond the limit hellos are refused with Weave's text, while
// a tenth of the room stays for configured peers.
func TestConnLimitAndDiscovery(t *testing.T) {
	n := newNet(t)
	hub, err := New(Config{Self: handshake.Config{Name: 0xa, UID: 1, Range: testRange}, Rand: rand.New(rand.NewPCG(1, 1)), ConnLimit: 10})
	if err != nil {
		t.Fatal(err)
	}
	n.nodes[addr(1)], n.order = hub, append(n.order, addr(1))
	for i := 2; i <= 12; i++ {
		m := n.add(i, proto.PeerName(0xa+i), uint64(i), testRange)
		m.Discovered([]netip.AddrPort{netip.AddrPortFrom(addr(1), DefaultPort)})
	}
	n.run(3)
	if got := len(hub.conn); got != 9 {
		t.Errorf("hub has %d connections, want 9 (a tenth of 10 kept for configured peers)", got)
	}
	if !strings.Contains(n.dump(), "Connection limit reached (10)") {
		t.Errorf("no refusal:\n%s", n.dump())
	}
	last := n.nodes[addr(12)]
	if len(last.Status().Targets) != 0 {
		t.Errorf("discovered targets listed: %v", last.Status().Targets)
	}
	// A configured peer still gets in.
	m := n.add(13, 0x99, 13, testRange)
	m.Connect([]string{addr(1).String()})
	n.run(2)
	if n.connState(m, targetOf(1)) != "established" {
		t.Errorf("configured peer refused:\n%s", n.dump())
	}
	// Dropping a discovered target from the set forgets it.
	last.Discovered(nil)
	if len(last.targets) != 0 && last.targets[targetOf(1)].conn == nil {
		t.Errorf("stale discovered target kept: %+v", last.targets)
	}
}

// TestConnLimitBounded: no limit (0) is the ceiling, MaxConnLimit, and a
// limit above it is refused.
func TestConnLimitBounded(t *testing.T) {
	self := handshake.Config{Name: 0xa, UID: 1, Range: testRange}
	m, err := New(Config{Self: self, Rand: rand.New(rand.NewPCG(1, 1))})
	if err != nil {
		t.Fatal(err)
	}
	if m.cfg.ConnLimit != MaxConnLimit {
		t.Errorf("ConnLimit 0 became %d, want %d", m.cfg.ConnLimit, MaxConnLimit)
	}
	for range MaxConnLimit - 1 {
		m.conn[netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(len(m.conn) >> 8), byte(len(m.conn))}), 1)] = &connection{}
	}
	if !m.room(true) || m.room(false) {
		t.Errorf("with %d connections: room for a configured peer %v, a discovered one %v", len(m.conn), m.room(true), m.room(false))
	}
	m.conn[netip.MustParseAddrPort("10.1.0.1:1")] = &connection{}
	if m.room(true) {
		t.Errorf("room for connection %d", len(m.conn)+1)
	}
	if _, err := New(Config{Self: self, Rand: rand.New(rand.NewPCG(1, 1)), ConnLimit: MaxConnLimit + 1}); err == nil {
		t.Errorf("a limit of %d accepted", MaxConnLimit+1)
	}
}

func TestForgetDropsConnection(t *testing.T) {
	n, a, b := establish(t)
	if err := b.Forget([]string{"192.168.0.99"}); !errors.Is(err, ErrUnknownTarget) {
		t.Errorf("forgetting a stranger: %v", err)
	}
	if err := b.Forget([]string{addr(1).String()}); err != nil {
		t.Fatal(err)
	}
	if cs := b.Status().Connections; len(cs) != 0 || len(b.Status().Targets) != 0 {
		t.Errorf("after forget: %+v", b.Status())
	}
	n.run(25)
	if cs := a.Status().Connections; len(cs) != 0 {
		t.Errorf("a still has %+v", cs)
	}
}

// TestJunkLeavesStateAlone: malformed and unsolicited messages change
// nothing and are counted.
func TestJunkLeavesStateAlone(t *testing.T) {
	n, a, _ := establish(t)
	before := fmt.Sprintf("%+v", a.Status())
	from := Endpoint{Remote: netip.MustParseAddrPort("192.168.0.66:6783")}
	good := proto.AppendHello(nil, proto.TypeAccept, &proto.Hello{MinVersion: 1, MaxVersion: 1, Name: 7, UID: 7})
	for i, msg := range [][]byte{nil, {1}, {9, 1, 0, 0}, good[:10],
		proto.AppendHeartbeat(nil, proto.Heartbeat{Name: 0xb, UID: 2}), // right peer, wrong endpoint
		good, // accept nobody asked for
		proto.AppendReject(nil, &proto.Reject{Code: proto.RejectOther, Name: 7, Message: "go away"}),
	} {
		err := a.Step(from, msg)
		if (i < 4) != (err != nil) {
			t.Errorf("message %d: %v", i, err)
		}
	}
	n.deliver()
	if after := fmt.Sprintf("%+v", a.Status()); after != before {
		t.Errorf("state changed:\n%s\n%s", before, after)
	}
	if a.Malformed() != 4 {
		t.Errorf("malformed %d", a.Malformed())
	}
}

// TestHelloFloodIsBounded: spoofed hellos from many endpoints create at most
// MaxPendingInbound connections and at most RejectBurst rejects.
func TestHelloFloodIsBounded(t *testing.T) {
	n := newNet(t)
	a := n.add(1, 0xa, 1, testRange)
	wrong := proto.AppendHello(nil, proto.TypeHello, &proto.Hello{MinVersion: 1, MaxVersion: 1, Name: 7, UID: 7,
		Range: netip.MustParsePrefix("10.99.0.0/16")})
	for i := range 500 {
		from := Endpoint{Remote: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 1)}
		h := proto.AppendHello(nil, proto.TypeHello, &proto.Hello{MinVersion: 1, MaxVersion: 1,
			Name: proto.PeerName(1000 + i), UID: uint64(1000 + i), Range: testRange})
		a.Step(from, h)
		a.Step(Endpoint{Remote: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 1)}, wrong)
	}
	if got := len(a.Status().Connections); got != 64 {
		t.Errorf("%d pending connections, want the cap of 64", got)
	}
	rejects := 0
	for _, d := range a.Ready().Sends {
		if hd, _ := proto.ParseHeader(d.Msg); hd.Type == proto.TypeReject {
			rejects++
		}
	}
	if rejects != 20 {
		t.Errorf("%d rejects, want the burst of 20", rejects)
	}
}

// TestHelloFloodOneSource: hellos from one address, on many ports, take at
// most MaxPendingPerSource pending slots, and a peer elsewhere still gets
// one.
func TestHelloFloodOneSource(t *testing.T) {
	n := newNet(t)
	a := n.add(1, 0xa, 1, testRange)
	for i := range 200 {
		h := proto.AppendHello(nil, proto.TypeHello, &proto.Hello{MinVersion: 1, MaxVersion: 1,
			Name: proto.PeerName(1000 + i), UID: uint64(1000 + i), Range: testRange})
		a.Step(Endpoint{Remote: netip.AddrPortFrom(netip.MustParseAddr("10.9.9.9"), uint16(1000+i))}, h)
	}
	if got := len(a.Status().Connections); got != MaxPendingPerSource {
		t.Errorf("%d pending connections from one address, want %d", got, MaxPendingPerSource)
	}
	h := proto.AppendHello(nil, proto.TypeHello, &proto.Hello{MinVersion: 1, MaxVersion: 1, Name: 0x5, UID: 5, Range: testRange})
	a.Step(Endpoint{Remote: netip.MustParseAddrPort("10.8.8.8:6783")}, h)
	if got := len(a.Status().Connections); got != MaxPendingPerSource+1 {
		t.Errorf("a hello from elsewhere after the flood: %d connections, want %d", got, MaxPendingPerSource+1)
	}
}

func TestParseTarget(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"10.0.0.1", "10.0.0.1:6783"},
		{"10.0.0.1:7", "10.0.0.1:7"},
		{"[fd00::1]:7", "[fd00::1]:7"},
		{"fd00::1", "[fd00::1]:6783"},
		{"[fd00::1]", "[fd00::1]:6783"},
		{"::ffff:10.0.0.1", "10.0.0.1:6783"},
		{"node-1.example", "node-1.example:6783"},
		{"node:99", "node:99"},
		{"", "error"}, {"a b", "error"}, {"host:0", "error"}, {"host:x", "error"}, {"a:b:c", "error"},
		{"1.2.3.4:0", "error"}, {"[fe80::1%eth0]:1", "error"}, {":5", "error"},
	} {
		h, p, err := ParseTarget(tc.in)
		got := "error"
		if err == nil {
			got = JoinTarget(h, p)
		}
		if got != tc.want {
			t.Errorf("ParseTarget(%q) = %s, %v; want %s", tc.in, got, err, tc.want)
		}
	}
}

// TestForgedHelloOpensNothing: in plaintext mode, a hello and heartbeats
// from a forged source (the sender never sees our accept) leave the
// connection pending and its gossip refused, so nothing larger than the
// accept goes to that address; the heartbeat that brings back the
// accept's proof establishes it and lets its gossip in.
func TestForgedHelloOpensNothing(t *testing.T) {
	n := newNet(t)
	a := n.add(1, 0xa, 1, testRange)
	victim := Endpoint{Remote: netip.MustParseAddrPort("192.168.0.99:6783")}
	hello := proto.AppendHello(nil, proto.TypeHello, &proto.Hello{MinVersion: 1, MaxVersion: 1, Name: 0xf, UID: 15, Range: testRange})
	// Unpadded, it is not answered at all.
	short := hello[:proto.HelloMinLen-1]
	if err := a.Step(victim, short); !errors.Is(err, ErrShortHello) || len(a.Ready().Sends) != 0 || a.Unproven != 1 {
		t.Fatalf("a short hello: %v, %d answers", err, len(a.Ready().Sends))
	}
	if err := a.Step(victim, hello); err != nil {
		t.Fatal(err)
	}
	var proof uint64
	for _, d := range a.Ready().Sends {
		if h, err := proto.ParseHello(d.Msg); err == nil && d.To == victim {
			proof = h.Proof
			if len(d.Msg) > len(hello) {
				t.Errorf("the accept is %d bytes for a hello of %d", len(d.Msg), len(hello))
			}
		}
	}
	a.Advance()
	if proof == 0 {
		t.Fatal("the accept carries no proof")
	}
	gossip, _ := proto.AppendGossip(nil, &proto.Gossip{Channel: "topology", Src: 0xf, Payload: []byte("digest request")})
	for _, guess := range []uint64{0, proof + 1, proof ^ 1<<63} {
		a.Step(victim, proto.AppendHeartbeat(nil, proto.Heartbeat{Name: 0xf, UID: 15, Established: true, Proof: guess}))
		if err := a.Step(victim, gossip); !errors.Is(err, ErrStranger) {
			t.Errorf("gossip after a heartbeat with proof %#x: %v", guess, err)
		}
	}
	if got := n.connState(a, victim.Remote.String()); got != "pending" {
		t.Errorf("the forged connection is %s", got)
	}
	if a.Unproven != 4 || len(a.Ready().Gossip) != 0 {
		t.Errorf("unproven %d, gossip handed up %d", a.Unproven, len(a.Ready().Gossip))
	}
	// Unproven, it times out like any silent connection.
	for range 25 {
		a.Tick()
	}
	if got := n.connState(a, victim.Remote.String()); got != "none" {
		t.Errorf("after the timeout the forged connection is %s", got)
	}

	// A real dialler sends the proof back.
	a.Step(victim, hello)
	a.Step(victim, proto.AppendHeartbeat(nil, proto.Heartbeat{Name: 0xf, UID: 15, Established: true, Proof: proof}))
	if got := n.connState(a, victim.Remote.String()); got != "established" {
		t.Errorf("with the proof the connection is %s", got)
	}
	if err := a.Step(victim, gossip); err != nil || len(a.Ready().Gossip) != 1 {
		t.Errorf("gossip from a proven dialler: %v", err)
	}
}
