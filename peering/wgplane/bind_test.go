package wgplane

import (
	"errors"
	"net"
	"testing"
	"time"

	wgconn "golang.zx2c4.com/wireguard/conn"
)

// TestBind: datagrams in and out of the bind with their endpoints, one
// endpoint per path however many datagrams came along it, the endpoint
// cache bounded, and Close, reopening on the same port, and Send after
// Close as WireGuard's device does them.
func TestBind(t *testing.T) {
	b := newBind()
	fns, port, err := b.Open(0)
	if err != nil {
		t.Fatal(err)
	}
	if len(fns) != 1 || port == 0 {
		t.Fatalf("Open: %d receive functions, port %d", len(fns), port)
	}
	if _, _, err := b.Open(0); !errors.Is(err, wgconn.ErrBindAlreadyOpen) {
		t.Errorf("a second Open: %v", err)
	}
	peer, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	to := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(port)}

	bufs := make([][]byte, b.BatchSize())
	for i := range bufs {
		bufs[i] = make([]byte, 2048)
	}
	sizes := make([]int, len(bufs))
	eps := make([]wgconn.Endpoint, len(bufs))
	// receive reads until one datagram came.
	receive := func() (string, wgconn.Endpoint) {
		t.Helper()
		n, err := fns[0](bufs, sizes, eps)
		if err != nil || n < 1 {
			t.Fatalf("receive: %d, %v", n, err)
		}
		return string(bufs[0][:sizes[0]]), eps[0]
	}
	if _, err := peer.WriteTo([]byte("one"), to); err != nil {
		t.Fatal(err)
	}
	got, ep := receive()
	if got != "one" || ep.DstToString() != peer.LocalAddr().String() || ep.SrcIP().String() != "127.0.0.1" {
		t.Fatalf("received %q from %s (to %s), want \"one\" from %s", got, ep.DstToString(), ep.SrcIP(), peer.LocalAddr())
	}
	if _, err := peer.WriteTo([]byte("two"), to); err != nil {
		t.Fatal(err)
	}
	if _, ep2 := receive(); ep2 != ep {
		t.Error("a second datagram along the same path has an endpoint of its own")
	}
	if err := b.Send([][]byte{[]byte("back"), []byte("again")}, ep); err != nil {
		t.Fatal(err)
	}
	peer.SetReadDeadline(time.Now().Add(2 * time.Second))
	for _, want := range []string{"back", "again"} {
		buf := make([]byte, 64)
		n, _, err := peer.ReadFrom(buf)
		if err != nil || string(buf[:n]) != want {
			t.Fatalf("the peer read %q, %v; want %q", buf[:n], err, want)
		}
	}
	ep.ClearSrc()
	if ep.SrcIP().IsValid() || ep.SrcToString() != "" {
		t.Errorf("after ClearSrc the source is %s", ep.SrcIP())
	}
	if err := b.Send([][]byte{[]byte("cleared")}, ep); err != nil {
		t.Errorf("Send with the source cleared: %v", err)
	}

	// Datagrams from ever new ports never grow the cache past its bound.
	for i := range maxCachedEndpoints + 10 {
		c, err := net.DialUDP("udp4", nil, to)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte{byte(i)})
		c.Close()
	}
	for seen := 0; seen < maxCachedEndpoints+10; {
		n, err := fns[0](bufs, sizes, eps)
		if err != nil {
			t.Fatal(err)
		}
		seen += n
	}
	if n := b.cachedEndpoints(); n > maxCachedEndpoints || n == 0 {
		t.Errorf("%d endpoints cached, want 1 to %d", n, maxCachedEndpoints)
	}

	parsed, err := b.ParseEndpoint("192.0.2.1:6784")
	if err != nil || parsed.DstToString() != "192.0.2.1:6784" || parsed.SrcIP().IsValid() {
		t.Errorf("ParseEndpoint: %v, %v", parsed, err)
	}
	for _, bad := range []string{"", "192.0.2.1", "nonsense:1", "192.0.2.1:99999"} {
		if _, err := b.ParseEndpoint(bad); err == nil {
			t.Errorf("ParseEndpoint(%q) succeeded", bad)
		}
	}

	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := fns[0](bufs, sizes, eps); !errors.Is(err, net.ErrClosed) {
		t.Errorf("receive after Close: %v, want net.ErrClosed", err)
	}
	if err := b.Send([][]byte{[]byte("x")}, ep); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Send after Close: %v, want net.ErrClosed", err)
	}
	if err := b.Close(); err != nil {
		t.Errorf("a second Close: %v", err)
	}
	if _, again, err := b.Open(port); err != nil || again != port {
		t.Fatalf("reopening on port %d: %d, %v", port, again, err)
	}
	defer b.Close()
	if err := b.SetMark(0x51); err != nil {
		t.Errorf("SetMark: %v", err)
	}
}
