package conn

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"testing"
)

func pair(t *testing.T) (*UDP, *UDP) {
	t.Helper()
	a, err := Listen(0)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Listen(0)
	if err != nil {
		a.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// needOffloads skips the test where the kernel lacks UDP GSO (on a) or GRO
// (on b); with CI=true it fails instead.
func needOffloads(t *testing.T, a, b *UDP) {
	t.Helper()
	if a.GSO() && b.GRO() {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("this kernel lacks UDP GSO (%v) or GRO (%v) (CI=true: failing instead of skipping)", a.GSO(), b.GRO())
	}
	t.Skip("no UDP GSO or GRO here")
}

func TestBatchRoundTrip(t *testing.T) {
	a, b := pair(t)
	to := Endpoint{Remote: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), b.LocalPort())}
	var out [][]byte
	for i := range 40 { // more than one sendmmsg batch of 16
		out = append(out, []byte(fmt.Sprintf("datagram %d", i)))
	}
	if n, err := a.NewSender(16).Send(out, to); err != nil || n != len(out) {
		t.Fatal(n, err)
	}
	r := b.NewReader(64)
	bufs, sizes, addrs := make([][]byte, 64), make([]int, 64), make([]Endpoint, 64)
	for i := range bufs {
		bufs[i] = make([]byte, 100)
	}
	var got [][]byte
	for len(got) < len(out) {
		n, err := r.Read(bufs, sizes, addrs)
		if err != nil {
			t.Fatal(err)
		}
		for i := range n {
			want := Endpoint{Remote: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), a.LocalPort()),
				Local: netip.MustParseAddr("127.0.0.1")}
			if addrs[i] != want {
				t.Fatalf("from %+v, want %+v", addrs[i], want)
			}
			got = append(got, bytes.Clone(bufs[i][:sizes[i]]))
		}
	}
	for i := range out {
		if !bytes.Equal(got[i], out[i]) {
			t.Errorf("datagram %d: %q, want %q", i, got[i], out[i])
		}
	}
}

func TestTruncatedDatagramHasSizeZero(t *testing.T) {
	a, b := pair(t)
	to := Endpoint{Remote: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), b.LocalPort())}
	if _, err := a.NewSender(2).Send([][]byte{make([]byte, 50), []byte("ok")}, to); err != nil {
		t.Fatal(err)
	}
	bufs, sizes, addrs := [][]byte{make([]byte, 10), make([]byte, 10)}, make([]int, 2), make([]Endpoint, 2)
	r := b.NewReader(2)
	var seen []int
	for len(seen) < 2 {
		n, err := r.Read(bufs, sizes, addrs)
		if err != nil {
			t.Fatal(err)
		}
		seen = append(seen, sizes[:n]...)
	}
	if seen[0] != 0 || seen[1] != 2 {
		t.Errorf("sizes %v, want [0 2]", seen)
	}
}

func TestCloseUnblocksRead(t *testing.T) {
	a, _ := pair(t)
	r := a.NewReader(1)
	done := make(chan error)
	go func() {
		_, err := r.Read([][]byte{make([]byte, 10)}, make([]int, 1), make([]Endpoint, 1))
		done <- err
	}()
	a.Close()
	if err := <-done; err == nil {
		t.Fatal("Read after Close returned no error")
	}
}

func TestSendAndReadAllocateNothing(t *testing.T) {
	a, b := pair(t)
	to := Endpoint{Remote: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), b.LocalPort())}
	s, r := a.NewSender(8), b.NewReader(8)
	out := [][]byte{make([]byte, 1400), make([]byte, 1400), make([]byte, 1400), make([]byte, 1400)}
	bufs, sizes, addrs := make([][]byte, 8), make([]int, 8), make([]Endpoint, 8)
	for i := range bufs {
		bufs[i] = make([]byte, 2000)
	}
	allocs := testing.AllocsPerRun(200, func() {
		if _, err := s.Send(out, to); err != nil {
			t.Fatal(err)
		}
		for got := 0; got < len(out); {
			n, err := r.Read(bufs, sizes, addrs)
			if err != nil {
				t.Fatal(err)
			}
			got += n
		}
	})
	if allocs != 0 {
		t.Errorf("%v allocations per batch", allocs)
	}
}

func TestOversizedDatagramIsSkipped(t *testing.T) {
	a, b := pair(t)
	to := Endpoint{Remote: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), b.LocalPort())}
	n, err := a.NewSender(4).Send([][]byte{[]byte("one"), make([]byte, 70000), []byte("three")}, to)
	if n != 2 || err == nil {
		t.Fatalf("sent %d, err %v; want 2 and an error", n, err)
	}
	bufs, sizes, addrs := [][]byte{make([]byte, 10), make([]byte, 10)}, make([]int, 2), make([]Endpoint, 2)
	var got []string
	r := b.NewReader(2)
	for len(got) < 2 {
		k, err := r.Read(bufs, sizes, addrs)
		if err != nil {
			t.Fatal(err)
		}
		for i := range k {
			got = append(got, string(bufs[i][:sizes[i]]))
		}
	}
	if got[0] != "one" || got[1] != "three" {
		t.Errorf("got %q", got)
	}
}

// TestReplyFromLocalAddress: a datagram sent to one of several local
// addresses reports that address, and a send from it leaves from it.
func TestReplyFromLocalAddress(t *testing.T) {
	a, b := pair(t)
	for _, local := range []string{"127.0.0.2", "127.0.0.3"} {
		to := Endpoint{Remote: netip.AddrPortFrom(netip.MustParseAddr(local), b.LocalPort())}
		if _, err := a.NewSender(1).Send([][]byte{[]byte("hi")}, to); err != nil {
			t.Fatal(err)
		}
		bufs, sizes, eps := [][]byte{make([]byte, 10)}, make([]int, 1), make([]Endpoint, 1)
		if _, err := b.NewReader(1).Read(bufs, sizes, eps); err != nil {
			t.Fatal(err)
		}
		if eps[0].Local != netip.MustParseAddr(local) {
			t.Fatalf("local %v, want %s", eps[0].Local, local)
		}
		// Reply from the address the datagram came to.
		if _, err := b.NewSender(1).Send([][]byte{[]byte("back")}, eps[0]); err != nil {
			t.Fatal(err)
		}
		if _, err := a.NewReader(1).Read(bufs, sizes, eps); err != nil {
			t.Fatal(err)
		}
		if eps[0].Remote.Addr() != netip.MustParseAddr(local) {
			t.Fatalf("reply came from %v, want %s", eps[0].Remote, local)
		}
	}
}

func TestParsePktinfoRejectsGarbage(t *testing.T) {
	for _, b := range [][]byte{nil, {1, 2, 3}, make([]byte, 16), {255, 255, 255, 255, 255, 255, 255, 255, 41, 0, 0, 0, 50, 0, 0, 0}} {
		if a, seg := parseControl(b); a.IsValid() || seg != 0 {
			t.Errorf("% x -> %v", b, a)
		}
	}
}

// TestGSO sends runs of equal-sized datagrams, with shorter ones and more
// than a GSO message holds between them, with UDP GSO and without, to a
// socket with UDP GRO and without: every datagram arrives whole and in
// order; with GSO a run goes as one message, and with both it comes up as
// one too.
func TestGSO(t *testing.T) {
	for _, c := range []struct{ gso, gro bool }{{true, true}, {true, false}, {false, true}, {false, false}} {
		t.Run(fmt.Sprintf("gso=%v,gro=%v", c.gso, c.gro), func(t *testing.T) {
			gso := c.gso
			a, b := pair(t)
			needOffloads(t, a, b)
			if !gso {
				a.DisableGSO()
			}
			if !c.gro {
				if err := b.DisableGRO(); err != nil {
					t.Fatal(err)
				}
			}
			to := Endpoint{Remote: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), b.LocalPort())}
			var out [][]byte
			add := func(n, size int) {
				for range n {
					d := make([]byte, size)
					binary.BigEndian.PutUint32(d, uint32(len(out)))
					for j := 4; j < size; j++ {
						d[j] = byte(len(out) + j)
					}
					out = append(out, d)
				}
			}
			add(3, 1400)
			add(1, 300)   // ends the first run
			add(70, 1200) // more than maxSegments
			add(1, 1300)  // longer: a run of its own
			add(2, 40)
			s := a.NewSender(256).(udpSender)
			if n, err := s.Send(out, to); err != nil || n != len(out) {
				t.Fatalf("sent %d of %d: %v", n, len(out), err)
			}
			// Messages of the (one) call with GSO: 4 (a shorter one ends a
			// run) | 54 (64 KiB) | 16 | 2 | 1.
			want := len(out)
			if gso {
				want = 5
			}
			if s.count != want {
				t.Errorf("%d messages in the call, want %d (segments %v)", s.count, want, s.segs[:s.count])
			}
			r := b.NewReader(64)
			bufs, sizes, eps := make([][]byte, 64), make([]int, 64), make([]Endpoint, 64)
			for i := range bufs {
				bufs[i] = make([]byte, 2000)
			}
			coalesced := false
			for got := 0; got < len(out); {
				n, err := r.Read(bufs, sizes, eps)
				if err != nil {
					t.Fatal(err)
				}
				if gr, ok := r.(*groReader); ok {
					for m := range gr.n {
						coalesced = coalesced || gr.segs[m] > 0 && int(gr.hdrs[m].Len) > gr.segs[m]
					}
				}
				for i := range n {
					if want := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), a.LocalPort()); eps[i].Remote != want {
						t.Fatalf("datagram %d from %v, want %v", got, eps[i].Remote, want)
					}
					if !bytes.Equal(bufs[i][:sizes[i]], out[got]) {
						t.Fatalf("datagram %d: %d bytes, starting % x; want %d bytes", got, sizes[i], bufs[i][:min(8, sizes[i])], len(out[got]))
					}
					got++
				}
			}
			if coalesced != (c.gso && c.gro) {
				t.Errorf("runs came up as one message: %v", coalesced)
			}
		})
	}
}

// TestGROCarriesOver: a Read with fewer buffers than a coalesced message
// holds gets the first datagrams; the next Reads get the rest, without
// waiting for the socket.
func TestGROCarriesOver(t *testing.T) {
	a, b := pair(t)
	needOffloads(t, a, b)
	to := Endpoint{Remote: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), b.LocalPort())}
	var out [][]byte
	for i := range 10 {
		out = append(out, bytes.Repeat([]byte{byte(i)}, 500))
	}
	if n, err := a.NewSender(16).Send(out, to); err != nil || n != len(out) {
		t.Fatal(n, err)
	}
	r := b.NewReader(16)
	bufs, sizes, eps := [][]byte{make([]byte, 600), make([]byte, 600), make([]byte, 100)}, make([]int, 3), make([]Endpoint, 3)
	var got []int
	for len(got) < len(out) {
		n, err := r.Read(bufs, sizes, eps)
		if err != nil {
			t.Fatal(err)
		}
		for i := range n {
			first := -1
			if sizes[i] > 0 {
				first = int(bufs[i][0])
			}
			got = append(got, first)
			if sizes[i] != 0 && sizes[i] != 500 {
				t.Fatalf("size %d", sizes[i])
			}
		}
	}
	if gr := r.(*groReader); gr.n != 1 || gr.segs[0] != 500 {
		t.Errorf("the run came up as %d messages (segment %d), want one", gr.n, gr.segs[0])
	}
	// Every third datagram lands in the 100-byte buffer: size 0, as a
	// datagram longer than its buffer always is.
	want := []int{0, 1, -1, 3, 4, -1, 6, 7, -1, 9}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

func TestRun(t *testing.T) {
	mk := func(sizes ...int) [][]byte {
		var bs [][]byte
		for _, s := range sizes {
			bs = append(bs, make([]byte, s))
		}
		return bs
	}
	for _, c := range []struct {
		sizes []int
		want  int
	}{
		{[]int{100}, 1},
		{[]int{100, 100, 100}, 3},
		{[]int{100, 100, 50, 100}, 3},   // a shorter one ends the run
		{[]int{100, 200}, 1},            // a longer one starts the next
		{[]int{0, 0}, 1},                // empty datagrams go alone
		{[]int{100, 0, 100}, 1},         //
		{[]int{30000, 30000, 30000}, 2}, // 64 KiB at most
	} {
		if got := run(mk(c.sizes...)); got != c.want {
			t.Errorf("run%v = %d, want %d", c.sizes, got, c.want)
		}
	}
	if got := run(mk(make([]int, 100)...)); got != 1 {
		t.Errorf("100 empty: %d", got)
	}
	many := make([]int, 100)
	for i := range many {
		many[i] = 10
	}
	if got := run(mk(many...)); got != maxSegments {
		t.Errorf("100 equal: %d, want %d", got, maxSegments)
	}
}
