package lab_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/lab"
	"github.com/overlayd/overlayd/proto"
)

var bin lab.Binaries

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "overlayd-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin, err = lab.Build(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// parallel: the long lab tests that mostly wait (for timeouts, gossip,
// back-offs) and use only namespaces of their own call t.Parallel, so
// that two run at once (go test's -parallel, GOMAXPROCS by default) and
// the suite stays within CI's budget. Tests that use the machine's own
// namespace (Docker) or measure throughput stay serial.

const testRange = "10.40.0.0/16"

func overlayAddr(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 40, 0, byte(i)}) }

func expose(t *testing.T, d *lab.Daemon, i int) {
	t.Helper()
	d.MustCtl("expose", netip.PrefixFrom(overlayAddr(i), 16).String())
}

// waitConnected waits until d has n established connections.
func waitConnected(t *testing.T, d *lab.Daemon, n int, timeout time.Duration) {
	t.Helper()
	lab.Eventually(t, timeout, fmt.Sprintf("%s: %d established connections", d.Host.NS, n), func() error {
		st, err := d.Status()
		if err != nil {
			return err
		}
		got := 0
		for _, c := range st.Router.Connections {
			if c.State == "established" {
				got++
			}
		}
		if got != n {
			return fmt.Errorf("%d established: %+v", got, st.Router.Connections)
		}
		return nil
	})
}

// cutApart makes a and b drop each other's underlay packets.
func cutApart(t *testing.T, a, b *lab.Host) {
	t.Helper()
	if err := a.Block(b.Addr); err != nil {
		t.Fatal(err)
	}
	if err := b.Block(a.Addr); err != nil {
		t.Fatal(err)
	}
}

func waitPing(t *testing.T, from *lab.Host, to netip.Addr, timeout time.Duration) {
	t.Helper()
	lab.Eventually(t, timeout, fmt.Sprintf("ping %v from %s", to, from.NS), func() error {
		return from.Ping(to, 1)
	})
}

// TestTwoHosts: each host exposes an address; ping and a 1 MB TCP transfer
// (content checked) cross the overlay both ways.
func TestTwoHosts(t *testing.T) {
	l := lab.New(t, bin, 2)
	h1, h2 := l.Host(1), l.Host(2)
	d1 := h1.Start("--range", testRange)
	d2 := h2.Start("--range", testRange, "--peer", h1.Addr.String())
	waitConnected(t, d1, 1, 5*time.Second)
	waitConnected(t, d2, 1, 5*time.Second)
	expose(t, d1, 1)
	expose(t, d2, 2)

	waitPing(t, h1, overlayAddr(2), 5*time.Second)
	if err := h2.Ping(overlayAddr(1), 3); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []struct {
		from, to *lab.Host
		addr     netip.Addr
	}{{h1, h2, overlayAddr(2)}, {h2, h1, overlayAddr(1)}} {
		took, err := lab.TransferTCP(dir.from, dir.to, dir.addr, 5001, 1<<20, 20*time.Second)
		if err != nil {
			t.Fatalf("TCP %s -> %s: %v", dir.from.NS, dir.to.NS, err)
		}
		t.Logf("1 MiB over TCP %s -> %v in %v", dir.from.NS, dir.addr, took)
	}

	// The traffic went through the overlay: the daemons counted it.
	st, err := d1.Status()
	if err != nil {
		t.Fatal(err)
	}
	if s := st.Router.Stats; s.SentBytes < 1<<20 || s.ReceivedBytes < 1<<20 {
		t.Errorf("h1 counted too little traffic: %+v", s)
	}
	// Status reports what Weave's would.
	out := d2.MustCtl("status")
	for _, want := range []string{
		"Service: router", "Protocol: overlayd 1", fmt.Sprintf("Name: %v(h2)", mustStatus(t, d2).Router.Name),
		"Encryption: disabled", "Targets: 1", "Connections: 1 (1 established)",
		"Peers: 2 (with 2 established connections)", "Service: ipam", "Status: ready",
		"Range: 10.40.0.0/16", "DefaultSubnet: 10.40.0.0/16",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	conns := d2.MustCtl("status", "connections")
	if !strings.HasPrefix(conns, "-> "+h1.Addr.String()+":6783") || !strings.Contains(conns, "established udp") ||
		!strings.Contains(conns, "(h1) mtu=1456") {
		t.Errorf("status connections:\n%s", conns)
	}
	if got := d2.MustCtl("connections"); got != conns {
		t.Errorf("connections differs from status connections:\n%s", got)
	}
	peers := d2.MustCtl("peers")
	if !strings.Contains(peers, "(h1)") || !strings.Contains(peers, "(h2)") || strings.Count(peers, "established") != 2 {
		t.Errorf("peers:\n%s", peers)
	}
	if got := d2.MustCtl("status", "targets"); got != h1.Addr.String()+":6783\n" {
		t.Errorf("targets: %q", got)
	}
	// hide withdraws the address everywhere.
	d2.MustCtl("hide", netip.PrefixFrom(overlayAddr(2), 16).String())
	lab.Eventually(t, 5*time.Second, "route to a hidden address gone", func() error {
		if err := h1.Ping(overlayAddr(2), 1); err == nil {
			return fmt.Errorf("%v still answers", overlayAddr(2))
		}
		return nil
	})
}

func mustStatus(t *testing.T, d *lab.Daemon) api.Status {
	t.Helper()
	st, err := d.Status()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestLineRestart: h1 - h2 - h3 in a line (h1 and h3 peer with h2 only).
// Stopping h2 cuts traffic to it; after it starts again (same state
// directory, so the same name) traffic resumes on both links.
func TestLineRestart(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 3)
	h1, h2, h3 := l.Host(1), l.Host(2), l.Host(3)
	d2 := h2.Start("--range", testRange)
	d1 := h1.Start("--range", testRange, h2.Addr.String())
	d3 := h3.Start("--range", testRange, "--peer", h2.Addr.String())
	waitConnected(t, d2, 2, 5*time.Second)
	for i, d := range []*lab.Daemon{d1, d2, d3} {
		expose(t, d, i+1)
	}
	waitPing(t, h1, overlayAddr(2), 5*time.Second)
	waitPing(t, h3, overlayAddr(2), 5*time.Second)
	name := mustStatus(t, d2).Router.Name

	code, took, err := d2.Stop(2 * time.Second)
	if err != nil || code != 0 {
		t.Fatalf("stopping h2: exit %d after %v: %v", code, took, err)
	}
	t.Logf("h2 stopped in %v", took)
	if err := h1.Ping(overlayAddr(2), 1); err == nil {
		t.Fatal("h2's address answers while h2 is stopped")
	}
	// h1 notices within the heartbeat time-out and retries.
	lab.Eventually(t, 4*time.Second, "h1 sees the connection fail", func() error {
		for _, c := range mustStatus(t, d1).Router.Connections {
			if c.Address == h2.Addr.String()+":6783" && c.State == "established" {
				return fmt.Errorf("still established")
			}
		}
		return nil
	})

	start := time.Now()
	d2 = h2.Start("--range", testRange)
	if got := mustStatus(t, d2).Router.Name; got != name {
		t.Errorf("restarted h2 is %v, was %v: the name was not kept", got, name)
	}
	expose(t, d2, 2)
	waitPing(t, h1, overlayAddr(2), 20*time.Second)
	waitPing(t, h3, overlayAddr(2), 20*time.Second)
	t.Logf("traffic resumed %v after h2 restarted", time.Since(start).Round(time.Millisecond))
	if _, err := lab.TransferTCP(h1, h2, overlayAddr(2), 5002, 256<<10, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	// h1 and h3 were given only h2, and found each other through it.
	waitPing(t, h1, overlayAddr(3), 10*time.Second)
}

// TestRangeMismatch: a peer with another range is refused; both sides log
// Weave's line, keep running, and h2's status shows the failed target.
func TestRangeMismatch(t *testing.T) {
	l := lab.New(t, bin, 2)
	h1, h2 := l.Host(1), l.Host(2)
	d1 := h1.Start("--range", "10.40.0.0/16")
	d2 := h2.Start("--range", "10.50.0.0/16", h1.Addr.String())
	line1 := "Incompatible IP allocation ranges (received: 10.50.0.0/16, ours: 10.40.0.0/16)"
	line2 := "Incompatible IP allocation ranges (received: 10.40.0.0/16, ours: 10.50.0.0/16)"
	lab.Eventually(t, 5*time.Second, "both sides log the mismatch", func() error {
		if !strings.Contains(d1.Log(), line1) {
			return fmt.Errorf("h1 has not logged %q", line1)
		}
		if !strings.Contains(d2.Log(), line2) {
			return fmt.Errorf("h2 has not logged %q", line2)
		}
		return nil
	})
	lab.Eventually(t, 5*time.Second, "h2 shows the failed connection", func() error {
		out, _, _ := d2.Ctl("status")
		conns, _, _ := d2.Ctl("status", "connections")
		if !strings.Contains(out, "Connections: 1 (1 failed)") {
			return fmt.Errorf("status:\n%s", out)
		}
		if !strings.Contains(conns, "failed") || !strings.Contains(conns, line2+", retry: ") {
			return fmt.Errorf("status connections:\n%s", conns)
		}
		return nil
	})
	if !d1.Running() || !d2.Running() {
		t.Fatal("a daemon exited after the refusal")
	}
	if n := len(mustStatus(t, d1).Router.Connections); n != 0 {
		t.Errorf("h1 keeps %d connections to a refused peer", n)
	}
}

// TestNameCollision: a peer with our name is refused with a clear log; the
// dialler reports the refusal and backs off, but does not give up for
// good, as anyone could have sent that reject (only a collision it finds
// itself is permanent).
func TestNameCollision(t *testing.T) {
	l := lab.New(t, bin, 2)
	h1, h2 := l.Host(1), l.Host(2)
	d1 := h1.Start("--range", testRange, "--name", "12:d2:fe:7a:c1:f2")
	d2 := h2.Start("--range", testRange, "--name", "12:d2:fe:7a:c1:f2", h1.Addr.String())
	want := `local "12:d2:fe:7a:c1:f2(h1)" and remote "12:d2:fe:7a:c1:f2(h2)" peer names collision`
	lab.Eventually(t, 5*time.Second, "h1 logs the collision", func() error {
		if !strings.Contains(d1.Log(), want) {
			return fmt.Errorf("no %q in h1's log", want)
		}
		return nil
	})
	lab.Eventually(t, 5*time.Second, "h2 reports the refusal and backs off", func() error {
		conns, _, _ := d2.Ctl("status", "connections")
		if !strings.Contains(conns, "failed") || !strings.Contains(conns, "peer names collision, retry: 20") {
			return fmt.Errorf("status connections: %s", conns)
		}
		return nil
	})
}

// TestDeadPeerDetected: a peer that goes silent (SIGSTOP) is seen dead
// within 3 seconds, measured by the time stamp of h1's log line.
func TestDeadPeerDetected(t *testing.T) {
	l := lab.New(t, bin, 2)
	h1, h2 := l.Host(1), l.Host(2)
	d1 := h1.Start("--range", testRange)
	d2 := h2.Start("--range", testRange, h1.Addr.String())
	waitConnected(t, d1, 1, 5*time.Second)
	stopped := time.Now()
	if err := d2.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer d2.Signal(syscall.SIGCONT)
	var lost time.Time
	lab.Eventually(t, 6*time.Second, "h1 drops the silent peer", func() error {
		for _, line := range strings.Split(d1.Log(), "\n") {
			if strings.Contains(line, "timed out waiting for heartbeat") {
				ts, err := time.Parse("2006-01-02T15:04:05.000Z0700", strings.Fields(line)[0])
				if err != nil {
					return err
				}
				lost = ts
				return nil
			}
		}
		return fmt.Errorf("no time-out in h1's log")
	})
	took := lost.Sub(stopped)
	t.Logf("silent peer dropped %v after SIGSTOP", took.Round(time.Millisecond))
	if took > 3*time.Second {
		t.Errorf("dead peer detected after %v, want at most 3s", took)
	}
	if n := len(mustStatus(t, d1).Router.Connections); n != 0 {
		t.Errorf("h1 still lists %d connections", n)
	}
	// Once it wakes up, h2 reconnects by itself.
	d2.Signal(syscall.SIGCONT)
	waitConnected(t, d1, 1, 15*time.Second)
}

// TestJunkDatagrams: thousands of malformed datagrams at the port do not
// crash the router, and traffic keeps flowing meanwhile.
func TestJunkDatagrams(t *testing.T) {
	l := lab.New(t, bin, 3)
	h1, h2, h3 := l.Host(1), l.Host(2), l.Host(3)
	d1 := h1.Start("--range", testRange)
	d2 := h2.Start("--range", testRange, h1.Addr.String())
	waitConnected(t, d1, 1, 5*time.Second)
	expose(t, d1, 1)
	expose(t, d2, 2)
	waitPing(t, h2, overlayAddr(1), 5*time.Second)

	r := rand.New(rand.NewPCG(7, 7))
	name1, name2 := mustStatus(t, d1).Router.Name, mustStatus(t, d2).Router.Name
	var junk [][]byte
	valid := proto.AppendHello(nil, proto.TypeHello, &proto.Hello{MinVersion: 1, MaxVersion: 1, Name: 9, UID: 9,
		Range: netip.MustParsePrefix(testRange), Nickname: "junk"})
	for i := range 3000 {
		var b []byte
		switch i % 6 {
		case 0: // random bytes
			b = make([]byte, r.IntN(1500))
			for j := range b {
				b[j] = byte(r.Uint32())
			}
		case 1: // truncated valid hello
			b = valid[:r.IntN(len(valid))]
		case 2: // wrong wire version
			b = append([]byte{byte(2 + r.IntN(250))}, valid[1:]...)
		case 3: // unknown type
			b = []byte{1, byte(7 + r.IntN(249)), 0, 0, 1, 2, 3}
		case 4: // data claiming to be from h2's name, from the wrong endpoint
			b = make([]byte, proto.DataHeaderLen+20)
			proto.PutDataHeader(b, name2, name1)
			b[proto.DataHeaderLen] = 0x45
		case 5: // a valid header with a random body of each type
			b = append([]byte{1, byte(1 + r.IntN(6)), byte(r.Uint32()), 0}, make([]byte, r.IntN(80))...)
			for j := 4; j < len(b); j++ {
				b[j] = byte(r.Uint32())
			}
		}
		junk = append(junk, b)
	}
	if err := h3.SendUDP(netip.AddrPortFrom(h1.Addr, 6783), junk); err != nil {
		t.Fatal(err)
	}
	// Also straight from h2's own port's neighbour: an established peer's
	// address with a random port.
	if err := h2.SendUDP(netip.AddrPortFrom(h1.Addr, 6783), junk[:500]); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if !d1.Running() {
		t.Fatalf("h1 died:\n%s", d1.Log())
	}
	if err := h2.Ping(overlayAddr(1), 3); err != nil {
		t.Fatal(err)
	}
	if _, err := lab.TransferTCP(h2, h1, overlayAddr(1), 5003, 256<<10, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	st := mustStatus(t, d1)
	if st.Router.Stats.DropMalformed+st.Router.Stats.DropUnknownPeer < 1000 {
		t.Errorf("junk not counted: %+v", st.Router.Stats)
	}
	var byType uint64
	for _, v := range st.Router.Stats.DecodeErrors {
		byType += v
	}
	if byType != st.Router.Stats.DropMalformed || st.Router.Stats.DecodeErrors["header"] == 0 {
		t.Errorf("decode errors by type %v do not add up to %d", st.Router.Stats.DecodeErrors, st.Router.Stats.DropMalformed)
	}
	if n := len(st.Router.Connections); n != 1 {
		t.Errorf("junk changed the connections: %+v", st.Router.Connections)
	}
}

// TestConnectForget: targets added and removed at run time.
func TestConnectForget(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 2)
	h1, h2 := l.Host(1), l.Host(2)
	d1 := h1.Start("--range", testRange)
	d2 := h2.Start("--range", testRange)
	d2.MustCtl("connect", h1.Addr.String())
	waitConnected(t, d2, 1, 5*time.Second)
	if got := d2.MustCtl("status", "targets"); got != h1.Addr.String()+":6783\n" {
		t.Errorf("targets %q", got)
	}
	d2.MustCtl("forget", h1.Addr.String())
	if got := d2.MustCtl("status", "targets"); got != "" {
		t.Errorf("targets after forget: %q", got)
	}
	lab.Eventually(t, 5*time.Second, "h1 notices", func() error {
		if n := len(mustStatus(t, d1).Router.Connections); n != 0 {
			return fmt.Errorf("%d connections", n)
		}
		return nil
	})
	if _, errOut, code := d2.Ctl("forget", h1.Addr.String()); code == 0 || !strings.Contains(errOut, "not a target") {
		t.Errorf("forgetting an unknown target: exit %d, %q", code, errOut)
	}
	// Our own address is refused for good.
	d2.MustCtl("connect", h2.Addr.String())
	lab.Eventually(t, 5*time.Second, "self-connection refused", func() error {
		conns, _, _ := d2.Ctl("status", "connections")
		if !strings.Contains(conns, h2.Addr.String()+":6783") || !strings.Contains(conns, "cannot connect to ourself, retry: never") {
			return fmt.Errorf("connections: %s", conns)
		}
		return nil
	})
	// A target that does not answer shows as failed, then retrying.
	d2.MustCtl("connect", "192.168.200.99:6783")
	lab.Eventually(t, 10*time.Second, "unanswered target fails", func() error {
		conns, _, _ := d2.Ctl("status", "connections")
		if !strings.Contains(conns, "192.168.200.99:6783") || !strings.Contains(conns, "failed") ||
			!strings.Contains(conns, "no answer to 5 hellos, retry: ") {
			return fmt.Errorf("connections: %s", conns)
		}
		return nil
	})
}

// TestShutdown: SIGTERM ends overlayd with exit 0 within 2 s and removes
// the device, its route and the socket.
func TestShutdown(t *testing.T) {
	l := lab.New(t, bin, 1)
	h := l.Host(1)
	d := h.Start("--range", testRange, "--iface", "ovltest")
	expose(t, d, 1)
	ctx := t.Context()
	if out, _ := h.Exec(ctx, "ip", "route", "show", testRange); !strings.Contains(out, "dev ovltest") {
		t.Fatalf("no route for the range: %q", out)
	}
	code, took, err := d.Stop(2 * time.Second)
	if err != nil || code != 0 {
		t.Fatalf("exit %d after %v: %v", code, took, err)
	}
	t.Logf("stopped in %v", took)
	if out, _ := h.Exec(ctx, "ip", "link", "show", "ovltest"); !strings.Contains(out, "does not exist") {
		t.Errorf("device left behind: %s", out)
	}
	if out, _ := h.Exec(ctx, "ip", "route", "show", testRange); strings.TrimSpace(out) != "" {
		t.Errorf("route left behind: %s", out)
	}
	if _, err := os.Stat(d.Socket); err == nil {
		t.Error("socket left behind")
	}
}

// TestOverlaydBadFlags: bad values stop overlayd at start with one line and
// exit code 2, and leave nothing set up.
func TestOverlaydBadFlags(t *testing.T) {
	l := lab.New(t, bin, 1)
	h := l.Host(1)
	ro := l.Dir() + "/file-not-dir"
	if err := os.WriteFile(ro, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	corrupt := l.Dir() + "/corrupt-state"
	os.MkdirAll(corrupt, 0o700)
	os.WriteFile(corrupt+"/peer-name", []byte("not a name\n"), 0o600)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--range", "10.40.0.1/16"}, "bits after network prefix are not all zero"},
		{[]string{"--range", "banana"}, "invalid --range"},
		{[]string{"--range", "10.40.0.0/31"}, "smaller than minimum size 4"},
		{[]string{"--default-subnet", "10.99.0.0/24"}, "does not overlap with allocation range"},
		{[]string{"--port", "70000"}, "out of range"},
		{[]string{"--iface", "this-name-is-far-too-long"}, "1 to 15 bytes"},
		{[]string{"--name", "zz:zz"}, "invalid --name"},
		{[]string{"--peer", "host:notaport"}, "invalid peer"},
		{[]string{"--log-level", "chatty"}, "--log-level"},
		{[]string{"--dns-listen", "banana"}, "invalid --dns-listen"},
		{[]string{"--dns-domain", "a b"}, "invalid --dns-domain"},
		{[]string{"--dns-ttl", "-1"}, "--dns-ttl"},
		{[]string{"--no-such-flag"}, "unknown flag"},
		{[]string{"--state-dir", ro}, "state directory"},
		{[]string{"--state-dir", corrupt}, "is corrupt"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			args := append([]string{"--iface", "ovlbad"}, tc.args...)
			d := h.Spawn(args...)
			code, err := d.Wait(5 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			log := strings.TrimSpace(d.Log())
			if code != 2 || strings.Count(log, "\n") != 0 || !strings.Contains(log, tc.want) {
				t.Errorf("exit %d, output %q; want exit 2 and one line with %q", code, log, tc.want)
			}
			if out, _ := h.Exec(t.Context(), "ip", "link", "show", "ovlbad"); !strings.Contains(out, "does not exist") {
				t.Errorf("device left behind: %s", out)
			}
			if _, err := os.Stat(d.Socket); err == nil {
				t.Error("socket left behind")
			}
		})
	}
	// The peer-name file was not overwritten.
	if b, _ := os.ReadFile(corrupt + "/peer-name"); string(b) != "not a name\n" {
		t.Errorf("corrupt state file was changed to %q", b)
	}
	// A second daemon on the same socket or device is refused the same way.
	d := h.Start("--range", testRange)
	second := h.Spawn("--range", testRange, "--port", "6790")
	if code, err := second.Wait(5 * time.Second); err != nil || code != 2 {
		t.Errorf("second overlayd: exit %d, %v:\n%s", code, err, second.Log())
	}
	// One whose DNS port is taken stops, and removes its device.
	third := h.Spawn("--range", "10.41.0.0/16", "--port", "6791", "--iface", "ovl3", "--socket", d.Socket+".3")
	if code, err := third.Wait(5 * time.Second); err != nil || code != 2 ||
		!strings.Contains(third.Log(), "DNS server: listen udp 0.0.0.0:53") || !strings.Contains(third.Log(), "--dns-listen") {
		t.Errorf("overlayd on a busy DNS port: exit %d, %v:\n%s", code, err, third.Log())
	}
	if out, _ := h.Exec(t.Context(), "ip", "link", "show", "ovl3"); !strings.Contains(out, "does not exist") {
		t.Errorf("device left behind: %s", out)
	}
	if !d.Running() {
		t.Error("the first daemon died")
	}
}

// TestOverlayctlErrors: bad commands and an unreachable socket give one line
// on stderr and a non-zero exit; the daemon refuses bad requests.
func TestOverlayctlErrors(t *testing.T) {
	l := lab.New(t, bin, 1)
	h := l.Host(1)
	d := h.Start("--range", testRange)
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--socket", l.Dir() + "/nothing.sock", "status"}, 1, "cannot reach overlayd"},
		{[]string{"--socket", d.Socket, "bogus"}, 2, `unknown command "bogus"`},
		{[]string{"--socket", d.Socket, "status", "bogus"}, 2, "Invalid 'overlayctl status' sub-command: bogus"},
		{[]string{"--socket", d.Socket, "connect"}, 2, "at least one peer address"},
		{[]string{"--socket", d.Socket, "connect", "a b"}, 1, "bad host"},
		{[]string{"--socket", d.Socket, "connect", "1.2.3.4:0"}, 1, "port 0"},
		{[]string{"--socket", d.Socket, "expose", "10.40.0.1/16", "10.40.0.2/16"}, 2, "at most one address"},
		{[]string{"--socket", d.Socket, "expose", "10.40.0.1"}, 2, "not an address with a prefix length"},
		{[]string{"--socket", d.Socket, "expose", "fd00::1/64"}, 2, "not IPv4"},
		{[]string{"--socket", d.Socket, "expose", "0.0.0.0/8"}, 1, "cannot expose"},
		{[]string{"--socket", d.Socket, "hide", "10.40.0.9/16"}, 1, "is not exposed"},
		{[]string{"--socket", d.Socket, "alloc", "x", "10.99.0.0/24"}, 1, "range 10.99.0.0/24 out of bounds: 10.40.0.0/16"},
		{[]string{"--socket", d.Socket, "alloc", "x", "10.40.0.1/24"}, 1, "bits after network prefix are not all zero"},
		{[]string{"--socket", d.Socket, "alloc", "has\ttab"}, 1, "control character"},
		{[]string{"--socket", d.Socket, "release", "nobody"}, 1, "Delete: no addresses for nobody"},
		{[]string{"--socket", d.Socket, "rmpeer", "nonsense"}, 1, "is not a peer name"},
		{[]string{"--socket", d.Socket, "claim", "id", "10.40.0.1/33"}, 2, "not an address with a prefix length"},
		{[]string{"--socket", d.Socket, "peers", "extra"}, 2, "takes no arguments"},
		{[]string{"--socket", d.Socket, "--bogus"}, 2, "unknown flag"},
	} {
		t.Run(strings.Join(tc.args[2:], " "), func(t *testing.T) {
			out, errOut, code := h.Ctl(tc.args...)
			if code != tc.code || out != "" || strings.Count(errOut, "\n") != 1 || !strings.Contains(errOut, tc.want) {
				t.Errorf("exit %d (want %d), stdout %q, stderr %q (want one line with %q)", code, tc.code, out, errOut, tc.want)
			}
		})
	}
	// The socket is root's alone.
	if fi, err := os.Stat(d.Socket); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, %v", fi.Mode(), err)
	}
	// --json listings are valid JSON, and OVERLAY_SOCKET works.
	cmd := exec.Command("ip", "netns", "exec", h.NS, bin.Overlayctl, "peers", "--json")
	cmd.Env = append(os.Environ(), "OVERLAY_SOCKET="+d.Socket)
	out, err := cmd.Output()
	if err != nil || !bytes.HasPrefix(bytes.TrimSpace(out), []byte("[")) {
		t.Errorf("peers --json with OVERLAY_SOCKET: %v, %s", err, out)
	}
	v := d.MustCtl("version")
	if !strings.Contains(v, "overlayctl ") || !strings.Contains(v, "overlayd ") {
		t.Errorf("version: %q", v)
	}
}

// TestDeviceDeleted: if the TUN device is deleted under overlayd, it stops
// with an error (exit 1) instead of running on without a data path.
func TestDeviceDeleted(t *testing.T) {
	l := lab.New(t, bin, 1)
	h := l.Host(1)
	d := h.Start("--range", testRange)
	if out, err := h.Exec(t.Context(), "ip", "link", "del", "ovl0"); err != nil {
		t.Fatalf("ip link del: %v: %s", err, out)
	}
	code, err := d.Wait(5 * time.Second)
	if err != nil || code != 1 {
		t.Fatalf("exit %d, %v:\n%s", code, err, d.Log())
	}
	if !strings.Contains(d.Log(), "TUN device") {
		t.Errorf("no reason in the log:\n%s", d.Log())
	}
}

// TestNotRoot: without root overlayd refuses to start, exit code 2.
func TestNotRoot(t *testing.T) {
	l := lab.New(t, bin, 1)
	h := l.Host(1)
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Fatal("setpriv (util-linux) is needed to run overlayd as another user")
	}
	// The binary must be reachable by an unprivileged user.
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	b, err := os.ReadFile(bin.Overlayd)
	if err != nil {
		t.Fatal(err)
	}
	exe := dir + "/overlayd"
	if err := os.WriteFile(exe, b, 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := h.Exec(t.Context(), "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
		exe, "--state-dir", dir+"/state", "--socket", dir+"/sock")
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(out, "must run as root") ||
		strings.Count(strings.TrimSpace(out), "\n") != 0 {
		t.Errorf("as nobody: %v, output %q", err, out)
	}
}

// TestMTUFromUnderlay: the TUN MTU is the underlay's minus 44 bytes.
func TestMTUFromUnderlay(t *testing.T) {
	l := lab.New(t, bin, 1)
	h := l.Host(1)
	if out, err := h.Exec(t.Context(), "ip", "link", "set", "eth0", "mtu", "1400"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	h.Start("--range", testRange)
	out, err := h.Exec(t.Context(), "ip", "link", "show", "ovl0")
	if err != nil || !strings.Contains(out, "mtu 1356 ") || !strings.Contains(out, ",UP") {
		t.Errorf("ovl0 should be up with MTU 1356: %v\n%s", err, out)
	}
}

// TestLossyUnderlay: with 10% of the packets leaving each host dropped, the
// handshake still completes (hellos are resent) and TCP carries 1 MiB
// intact.
func TestLossyUnderlay(t *testing.T) {
	l := lab.New(t, bin, 2)
	h1, h2 := l.Host(1), l.Host(2)
	for _, h := range []*lab.Host{h1, h2} {
		if err := h.Loss(10); err != nil {
			t.Fatal(err)
		}
	}
	d1 := h1.Start("--range", testRange)
	d2 := h2.Start("--range", testRange, h1.Addr.String())
	waitConnected(t, d2, 1, 20*time.Second)
	expose(t, d1, 1)
	expose(t, d2, 2)
	waitPing(t, h2, overlayAddr(1), 15*time.Second)
	took, err := lab.TransferTCP(h2, h1, overlayAddr(1), 5004, 1<<20, 60*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("1 MiB over TCP with 10%% loss each way in %v", took.Round(time.Millisecond))
	// Loss really happened: a ping burst loses some.
	out, _ := h2.Exec(t.Context(), "ping", "-c", "50", "-i", "0.01", "-W", "1", "-q", overlayAddr(1).String())
	if !strings.Contains(out, "received") || strings.Contains(out, " 0% packet loss") {
		t.Errorf("no loss seen with the loss rules in place:\n%s", out)
	}
}

// TestSecondaryAddress: a peer dialled at one of several addresses of a host
// answers from that address (IP_PKTINFO), so the handshake completes and
// traffic flows.
func TestSecondaryAddress(t *testing.T) {
	l := lab.New(t, bin, 2)
	h1, h2 := l.Host(1), l.Host(2)
	if out, err := h1.Exec(t.Context(), "ip", "addr", "add", "192.168.200.101/24", "dev", "eth0"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	d1 := h1.Start("--range", testRange)
	d2 := h2.Start("--range", testRange, "192.168.200.101")
	waitConnected(t, d2, 1, 5*time.Second)
	expose(t, d1, 1)
	expose(t, d2, 2)
	waitPing(t, h2, overlayAddr(1), 5*time.Second)
	if _, err := lab.TransferTCP(h1, h2, overlayAddr(2), 5005, 256<<10, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	if conns := d2.MustCtl("connections"); !strings.HasPrefix(conns, "-> 192.168.200.101:6783 ") {
		t.Errorf("connections: %s", conns)
	}
}

// TestMetrics: --metrics-addr serves Prometheus metrics that follow the
// connections and the traffic.
func TestMetrics(t *testing.T) {
	l := lab.New(t, bin, 2)
	h1, h2 := l.Host(1), l.Host(2)
	d1 := h1.Start("--range", testRange, "--metrics-addr", "127.0.0.1:9783")
	d2 := h2.Start("--range", testRange, h1.Addr.String())
	waitConnected(t, d1, 1, 5*time.Second)
	expose(t, d1, 1)
	expose(t, d2, 2)
	waitPing(t, h1, overlayAddr(2), 5*time.Second)
	if err := h1.Ping(overlayAddr(2), 5); err != nil {
		t.Fatal(err)
	}
	d1.MustCtl("dns-add", overlayAddr(1).String(), "n1")
	d2.MustCtl("dns-add", overlayAddr(2).String(), "n2")
	lab.Eventually(t, 5*time.Second, "n2 known on h1", func() error {
		_, errOut, code := d1.Ctl("dns-lookup", "n2")
		if code != 0 {
			return fmt.Errorf("%s", errOut)
		}
		return nil
	})
	if a := query(t, h1, "n2.weave.local"); a.status != "NOERROR" {
		t.Fatalf("n2: %s", a.raw)
	}
	if a := query(t, h1, "n3.weave.local"); a.status != "NXDOMAIN" {
		t.Fatalf("n3: %s", a.raw)
	}
	body, err := h1.Get("127.0.0.1:9783", "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`overlayd_connections{state="established"} 1`,
		`overlayd_connections{state="failed"} 0`,
		`overlayd_gossip_bytes_total{channel="topology",direction="sent"}`,
		`overlayd_decode_errors_total{type="header"} 0`,
		"overlayd_peers 2",
		"overlayd_ipam_active_ips 1",
		"overlayd_ipam_max_ips 65536",
		`overlayd_ipam_pending{op="allocate"} 0`,
		"overlayd_ipam_conflicts_total 0",
		`overlayd_ipam_messages_total{result="rejected"} 0`,
		`overlayd_dns_entries{scope="all"} 2`,
		`overlayd_dns_entries{scope="local"} 1`,
		`overlayd_dns_queries_total{result="answered"} 1`,
		`overlayd_dns_queries_total{result="nxdomain"} 1`,
		`overlayd_dns_queries_total{result="servfail"} 0`,
		`overlayd_dns_messages_total{result="rejected"} 0`,
		"go_goroutines ",
		"process_resident_memory_bytes ",
	} {
		if !strings.Contains(body, want+"\n") && !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	for _, counter := range []string{`overlayd_forwarded_packets_total{direction="sent"} `, `overlayd_forwarded_packets_total{direction="received"} `} {
		i := strings.Index(body, counter)
		if i < 0 {
			t.Errorf("no %s", counter)
			continue
		}
		var v float64
		fmt.Sscan(body[i+len(counter):], &v)
		if v < 5 {
			t.Errorf("%s%v, want at least the 5 pings", counter, v)
		}
	}
	// A port in use stops the daemon at start, exit 2.
	other := h1.Spawn("--range", "10.41.0.0/16", "--no-dns", "--iface", "ovl9", "--port", "6799", "--socket", l.Dir()+"/other.sock",
		"--metrics-addr", "127.0.0.1:9783")
	if code, err := other.Wait(5 * time.Second); err != nil || code != 2 || !strings.Contains(other.Log(), "metrics") {
		t.Errorf("second daemon on the same metrics port: exit %d, %v: %s", code, err, other.Log())
	}
	if out, _ := h1.Exec(t.Context(), "ip", "link", "show", "ovl9"); !strings.Contains(out, "does not exist") {
		t.Errorf("device left behind: %s", out)
	}
	if out, _ := h1.Exec(t.Context(), "ip", "route", "show", "10.41.0.0/16"); strings.TrimSpace(out) != "" {
		t.Errorf("route left behind: %s", out)
	}
}

// TestMeshRelay: five hosts, each given only the previous one as its peer;
// hosts 1 and 5 cannot reach each other on the underlay. Within 10 s every
// host knows all five peers (discovery makes the rest of the mesh), traffic
// between hosts 1 and 5 flows through a relay, and when the relay host is
// killed it moves to another one within 5 s.
func TestMeshRelay(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 5)
	h := l.Hosts
	cutApart(t, h[0], h[4])
	ds := make([]*lab.Daemon, 5)
	ds[0] = h[0].Start("--range", testRange)
	for i := 1; i < 5; i++ {
		ds[i] = h[i].Start("--range", testRange, "--peer", h[i-1].Addr.String())
	}
	for i, d := range ds {
		expose(t, d, i+1)
	}
	start := time.Now()
	for _, d := range ds {
		lab.Eventually(t, 10*time.Second-time.Since(start), d.Host.NS+" knows 5 peers", func() error {
			st, err := d.Status()
			if err != nil {
				return err
			}
			if len(st.Router.Peers) != 5 {
				return fmt.Errorf("%d peers", len(st.Router.Peers))
			}
			return nil
		})
	}
	t.Logf("all hosts know 5 peers after %v", time.Since(start).Round(time.Millisecond))
	if out := ds[0].MustCtl("status"); !strings.Contains(out, "PeerDiscovery: enabled") || !strings.Contains(out, "Peers: 5") {
		t.Errorf("status:\n%s", out)
	}

	relayOf := func() (*lab.Daemon, error) {
		st, err := ds[0].Status()
		if err != nil {
			return nil, err
		}
		for _, r := range st.Router.Routes {
			if r.Prefix.Addr() == overlayAddr(5) {
				for _, d := range ds[1:4] {
					if d.Running() && mustStatus(t, d).Router.Name == r.NextHop {
						return d, nil
					}
				}
				return nil, fmt.Errorf("route to host 5 via %v, next hop %v: not a live middle host", r.Via, r.NextHop)
			}
		}
		return nil, fmt.Errorf("no route to %v: %+v", overlayAddr(5), st.Router.Routes)
	}
	var relay *lab.Daemon
	lab.Eventually(t, 10*time.Second, "a relayed route from host 1 to host 5", func() (err error) {
		relay, err = relayOf()
		return err
	})
	waitPing(t, h[0], overlayAddr(5), 5*time.Second)
	if _, err := lab.TransferTCP(h[0], h[4], overlayAddr(5), 5006, 1<<20, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if st := mustStatus(t, relay); st.Router.Stats.RelayedPackets < 100 {
		t.Errorf("the relay %s passed on only %d packets", relay.Host.NS, st.Router.Stats.RelayedPackets)
	}
	t.Logf("1 MiB from host 1 to host 5 through %s", relay.Host.NS)

	relay.Kill()
	killed := time.Now()
	lab.Eventually(t, 5*time.Second, "traffic from host 1 to host 5 after the relay died", func() error {
		return h[0].Ping(overlayAddr(5), 1)
	})
	t.Logf("traffic moved to another relay %v after the kill", time.Since(killed).Round(time.Millisecond))
	if next, err := relayOf(); err != nil || next == relay {
		t.Errorf("relay after the kill: %v, %v", next, err)
	}
	if _, err := lab.TransferTCP(h[4], h[0], overlayAddr(1), 5007, 256<<10, 30*time.Second); err != nil {
		t.Fatal(err)
	}
}
