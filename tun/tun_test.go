package tun

import (
	"net"
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// inNetns runs the rest of the test on this OS thread inside a network
// namespace of its own (what the test creates there stays there), and
// removes it at the end. Fails under CI=true without root, else skips.
func inNetns(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root for a network namespace and a TUN device (CI=true: failing instead of skipping)")
		}
		t.Skip("needs root for a network namespace and a TUN device")
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	ns, err := netns.New() // and this thread is in it
	if err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := netns.Set(orig); err != nil {
			t.Errorf("back to the original namespace: %v", err)
			return // the thread dies with the test's goroutine, locked
		}
		ns.Close()
		orig.Close()
		runtime.UnlockOSThread()
	})
}

// TestReadOn: datagrams queued on the device come up in one Read of
// Create's device, where the device of wireguard-go that it wraps returns
// one per Read; the packets are whole and in order.
func TestReadOn(t *testing.T) {
	inNetns(t)
	dev, err := Create("ovrdtest0", 1420)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	go func() {
		for range dev.Events() {
		}
	}()
	link, err := netlink.LinkByName("ovrdtest0")
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := netlink.ParseAddr("10.77.0.1/24")
	if err := netlink.AddrAdd(link, addr); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		t.Fatal(err)
	}
	sock, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(10, 77, 0, 2), Port: 9})
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	send := func(n int) {
		t.Helper()
		for i := range n {
			if _, err := sock.Write([]byte{byte(i), 'x', 'y'}); err != nil {
				t.Fatal(err)
			}
		}
	}

	bufs := make([][]byte, 128)
	for i := range bufs {
		bufs[i] = make([]byte, 1<<16)
	}
	sizes := make([]int, len(bufs))
	// read drops what the kernel sends on its own (IPv6 router
	// solicitations and the like) and returns our datagrams' first bytes.
	read := func(d Device) []byte {
		t.Helper()
		for {
			n, err := d.Read(bufs, sizes, 0)
			if err != nil {
				t.Fatal(err)
			}
			var got []byte
			for i := range n {
				p := bufs[i][:sizes[i]]
				if len(p) == 20+8+3 && p[0]>>4 == 4 && p[9] == 17 && p[22] == 0 && p[23] == 9 {
					got = append(got, p[28])
				}
			}
			if len(got) > 0 {
				return got
			}
		}
	}

	send(50)
	got := read(dev)
	if len(got) != 50 {
		t.Fatalf("one Read returned %d of the 50 datagrams waiting", len(got))
	}
	for i, b := range got {
		if b != byte(i) {
			t.Fatalf("datagram %d is #%d: out of order", i, b)
		}
	}

	// Reading on stops when half the buffers are filled.
	send(100)
	if got := read(dev); len(got) != 64 {
		t.Errorf("with 100 waiting, one Read returned %d, want 64 (half the buffers)", len(got))
	}
	if got := read(dev); len(got) != 36 {
		t.Errorf("the next Read returned %d, want the other 36", len(got))
	}

	// The device underneath returns one per read.
	send(5)
	if got := read(dev.(*readOn).Device); len(got) != 1 {
		t.Errorf("wireguard-go's Read returned %d", len(got))
	}
}
