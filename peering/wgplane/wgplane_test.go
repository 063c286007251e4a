package wgplane

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/tun/tuntest"

	"github.com/overlayd/overlayd/peering"
	"github.com/overlayd/overlayd/peering/secure"
)

// requireRoot fails (CI=true) or skips: the configuration socket lives in
// /var/run/wireguard.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("the WireGuard plane's tests need root (CI=true: failing instead of skipping)")
	}
	t.Skip("the WireGuard plane's tests need root")
}

// freePort is a UDP port nothing listens on right now.
func freePort(t *testing.T) uint16 {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return uint16(c.LocalAddr().(*net.UDPAddr).Port)
}

type side struct {
	id    secure.Identity
	port  uint16
	tun   *tuntest.ChannelTUN // nil when the plane runs on another device
	plane *Plane
	iface string
}

func open(t *testing.T, psk [32]byte) *side {
	t.Helper()
	c := tuntest.NewChannelTUN()
	s := openOn(t, psk, c.TUN())
	s.tun = c
	return s
}

// openOn starts a plane on dev.
func openOn(t *testing.T, psk [32]byte, dev tun.Device) *side {
	t.Helper()
	id, err := secure.NewIdentity(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s := &side{id: id, port: freePort(t), iface: fmt.Sprintf("ovwgt%d", os.Getpid()%100000)}
	s.iface += hex.EncodeToString(id.Public[:2])
	s.plane, err = Open(Config{Iface: s.iface, Port: s.port, Identity: id, PSK: psk, Log: zap.NewNop()}, dev)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.plane.Close)
	return s
}

func (s *side) peer(pfx string) peering.DataPeer {
	return peering.DataPeer{Key: s.id.Public, Endpoint: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), s.port),
		Prefixes: []netip.Prefix{netip.MustParsePrefix(pfx)}}
}

// deliver sends pkt into from's TUN and reports whether to's TUN got it.
func deliver(t *testing.T, from, to *side, pkt []byte) bool {
	t.Helper()
	select {
	case from.tun.Outbound <- pkt:
	case <-time.After(2 * time.Second):
		t.Fatal("the device does not read its TUN")
	}
	select {
	case got := <-to.tun.Inbound:
		if !bytes.Equal(got, pkt) {
			t.Fatalf("delivered %x, sent %x", got, pkt)
		}
		return true
	case <-time.After(2 * time.Second):
		return false
	}
}

var (
	addrA = netip.MustParseAddr("10.9.1.1")
	addrB = netip.MustParseAddr("10.9.2.1")
)

// TestPlanes: two planes programmed with each other's key, endpoint and
// prefixes carry a packet both ways; taken out of the program, a peer is
// reached no more; `wg`'s protocol on the socket lists the peer.
func TestPlanes(t *testing.T) {
	requireRoot(t)
	psk := [32]byte{1, 2, 3}
	a, b := open(t, psk), open(t, psk)
	if err := a.plane.Program([]peering.DataPeer{b.peer("10.9.2.0/24")}); err != nil {
		t.Fatal(err)
	}
	if err := b.plane.Program([]peering.DataPeer{a.peer("10.9.1.0/24")}); err != nil {
		t.Fatal(err)
	}
	if !deliver(t, a, b, tuntest.Ping(addrB, addrA)) {
		t.Fatal("a -> b: nothing arrived")
	}
	if !deliver(t, b, a, tuntest.Ping(addrA, addrB)) {
		t.Fatal("b -> a: nothing arrived")
	}
	// A packet whose source b did not give a is dropped by a (WireGuard's
	// check of the inner source against the sender's allowed IPs).
	if deliver(t, b, a, tuntest.Ping(addrA, netip.MustParseAddr("10.9.7.7"))) {
		t.Error("a took a packet from b with a source outside b's prefixes")
	}

	st, err := a.plane.Stats()
	if err != nil || len(st) != 1 || st[0].Key != b.id.Public || st[0].LastHandshake.IsZero() || st[0].TxBytes == 0 || st[0].RxBytes == 0 {
		t.Errorf("a's stats: %+v, %v", st, err)
	}

	// The configuration socket answers `wg show`'s query.
	c, err := net.Dial("unix", SocketPath(a.iface))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprint(c, "get=1\n\n")
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	var conf strings.Builder
	for sc := bufio.NewScanner(c); sc.Scan() && sc.Text() != ""; {
		conf.WriteString(sc.Text() + "\n")
	}
	for _, want := range []string{"public_key=" + hex.EncodeToString(b.id.Public[:]), fmt.Sprintf("listen_port=%d", a.port),
		"allowed_ip=10.9.2.0/24", "errno=0"} {
		if !strings.Contains(conf.String(), want) {
			t.Errorf("the socket's configuration lacks %q:\n%s", want, conf.String())
		}
	}

	// A second plane with the same interface name is refused.
	if _, err := Open(Config{Iface: a.iface, Port: freePort(t), Identity: a.id, Log: zap.NewNop()}, tuntest.NewChannelTUN().TUN()); !errors.Is(err, ErrSocketInUse) {
		t.Errorf("a second plane on %s: %v", a.iface, err)
	}

	// Out of the program, b is no longer reached.
	if err := a.plane.Program(nil); err != nil {
		t.Fatal(err)
	}
	if deliver(t, a, b, tuntest.Ping(addrB, addrA)) {
		t.Error("a still reaches b after b was taken out")
	}
}

// TestPSKMismatch: a peer with the right key but another password's
// preshared key gets no packet through.
func TestPSKMismatch(t *testing.T) {
	requireRoot(t)
	a, b := open(t, [32]byte{1}), open(t, [32]byte{2})
	if err := a.plane.Program([]peering.DataPeer{b.peer("10.9.2.0/24")}); err != nil {
		t.Fatal(err)
	}
	if err := b.plane.Program([]peering.DataPeer{a.peer("10.9.1.0/24")}); err != nil {
		t.Fatal(err)
	}
	if deliver(t, a, b, tuntest.Ping(addrB, addrA)) {
		t.Error("a packet crossed between planes with different preshared keys")
	}
}

// countTUN is a TUN device that allocates nothing: each token on send
// makes Read return pkt once, and Write reports on got how many packets
// it was given.
type countTUN struct {
	pkt       []byte
	send      chan struct{}
	got       chan int
	closed    chan struct{}
	closeOnce sync.Once
	events    chan tun.Event
}

func newCountTUN(pkt []byte) *countTUN {
	return &countTUN{pkt: pkt, send: make(chan struct{}), got: make(chan int, 1024), closed: make(chan struct{}), events: make(chan tun.Event)}
}

func (c *countTUN) File() *os.File { return nil }

func (c *countTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	select {
	case <-c.closed:
		return 0, os.ErrClosed
	case <-c.send:
		sizes[0] = copy(bufs[0][offset:], c.pkt)
		return 1, nil
	}
}

func (c *countTUN) Write(bufs [][]byte, offset int) (int, error) {
	select {
	case <-c.closed:
		return 0, os.ErrClosed
	case c.got <- len(bufs):
		return len(bufs), nil
	}
}

func (c *countTUN) BatchSize() int           { return 1 }
func (c *countTUN) MTU() (int, error)        { return tuntest.DefaultMTU, nil }
func (c *countTUN) Name() (string, error)    { return "counttun", nil }
func (c *countTUN) Events() <-chan tun.Event { return c.events }
func (c *countTUN) Close() error {
	c.closeOnce.Do(func() { close(c.closed); close(c.events) })
	return nil
}

// TestEncryptedPathAllocatesNothing: in steady state, a packet encrypted by
// one plane and decrypted by the other costs no allocation (wireguard-go's
// own bind cost 3 per packet: an address and an endpoint per datagram). The whole
// process's count is read (WireGuard's goroutines do the work), over
// enough packets that one allocation per packet would be seen 20 times
// over the bound.
func TestEncryptedPathAllocatesNothing(t *testing.T) {
	requireRoot(t)
	psk := [32]byte{4}
	ta, tb := newCountTUN(tuntest.Ping(addrB, addrA)), newCountTUN(nil)
	a, b := openOn(t, psk, ta), openOn(t, psk, tb)
	if err := a.plane.Program([]peering.DataPeer{b.peer("10.9.2.0/24")}); err != nil {
		t.Fatal(err)
	}
	if err := b.plane.Program([]peering.DataPeer{a.peer("10.9.1.0/24")}); err != nil {
		t.Fatal(err)
	}
	// carry sends n packets a -> b, one at a time, and waits for each
	// (one timer for all: a timer per packet would allocate).
	carry := func(n int) {
		t.Helper()
		timeout := time.After(time.Minute)
		for range n {
			select {
			case ta.send <- struct{}{}:
			case <-timeout:
				t.Fatal("a's device does not read its TUN")
			}
			select {
			case <-tb.got:
			case <-timeout:
				t.Fatal("b's TUN got nothing")
			}
		}
	}
	carry(2000) // handshake, pools and timers warmed up
	const packets = 20000
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	carry(packets)
	runtime.ReadMemStats(&after)
	perPacket := float64(after.Mallocs-before.Mallocs) / packets
	t.Logf("%d packets encrypted, sent, received and decrypted: %.4f allocations per packet (%d in all)", packets, perPacket, after.Mallocs-before.Mallocs)
	if raceEnabled {
		// WireGuard's pools lose buffers on purpose under the detector:
		// the path ran for races, and scripts/test.sh runs this test
		// without it for the count.
		return
	}
	if perPacket > 0.05 {
		t.Errorf("%.3f allocations per packet on the encrypted path, want none in steady state", perPacket)
	}
}

func TestParseStats(t *testing.T) {
	key := strings.Repeat("ab", 32)
	got, err := parseStats("private_key=00\nlisten_port=1\npublic_key=" + key + "\nrx_bytes=10\ntx_bytes=20\n" +
		"last_handshake_time_sec=5\nlast_handshake_time_nsec=6\nallowed_ip=10.0.0.0/8\nerrno=0\n")
	if err != nil || len(got) != 1 || got[0].RxBytes != 10 || got[0].TxBytes != 20 || !got[0].LastHandshake.Equal(time.Unix(5, 6)) {
		t.Errorf("got %+v, %v", got, err)
	}
	for _, bad := range []string{"public_key=zz\n", "public_key=" + key + "\nrx_bytes=-1\n"} {
		if _, err := parseStats(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}
