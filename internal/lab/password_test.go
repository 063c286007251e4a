package lab_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/overlayd/overlayd/internal/lab"
)

// TestPassword: three hosts share a password (from a file and from the
// flag), a fourth has another and a fifth none. The three connect, gossip
// names and carry traffic, by WireGuard, between exposed addresses and
// between attached containers, directly and through a relay; `wg show`
// lists their peers; neither a name nor a known payload crosses the
// underlay in clear; the other two are refused with a log line on both
// sides saying which side lacks or mismatches the password, and learn no
// peer, name or ring; a member that spoofs another's name is refused. A
// member restarted is back within 5 s.
func TestPassword(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 5)
	pwFile := filepath.Join(l.Dir(), "password")
	if err := os.WriteFile(pwFile, []byte("correct horse\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A nickname and a name that would show in any plaintext gossip.
	const secretNick, secretName = "nick-9f3e1c", "name-7a5d2b"
	// WireGuard's configuration sockets are shared by every namespace of
	// the machine: each encrypted host needs an interface name of its own.
	iface := func(h *lab.Host) string { return fmt.Sprintf("ovpw%d", h.Index) }
	member := func(h *lab.Host, args ...string) *lab.Daemon {
		d := h.Start(append([]string{"--range", testRange, "--init-peer-count", "3", "--iface", iface(h)}, args...)...)
		// A clean stop removes the WireGuard socket; the lab's SIGKILL
		// would leave it behind (harmless, but the machine's).
		t.Cleanup(func() { d.Stop(5 * time.Second) })
		return d
	}

	capture := startCapture(t, l)
	d1 := member(l.Host(1), "--password-file", pwFile)
	d2 := member(l.Host(2), "--password", "correct horse", "--peer", l.Host(1).Addr.String())
	d3 := member(l.Host(3), "--password-file", pwFile, "--nickname", secretNick, "--peer", l.Host(1).Addr.String())
	d4 := member(l.Host(4), "--password", "battery staple", "--peer", l.Host(1).Addr.String())
	d5 := member(l.Host(5), "--peer", l.Host(1).Addr.String())
	members := []*lab.Daemon{d1, d2, d3}
	for _, d := range members {
		waitConnected(t, d, 2, 10*time.Second)
	}
	for i, d := range members {
		expose(t, d, i+1)
	}
	d3.MustCtl("dns-add", overlayAddr(3).String(), secretName, "--container", "c3")
	lab.Eventually(t, 5*time.Second, "h1 resolves the name h3 registered", func() error {
		if out := d1.MustCtl("dns"); !strings.Contains(out, secretName) {
			return fmt.Errorf("dns on h1:\n%s", out)
		}
		return nil
	})
	started := time.Now()
	waitPing(t, l.Host(1), overlayAddr(3), 5*time.Second)
	t.Logf("first ping h1 -> h3 answered %v after both sides were up (WireGuard handshake included)", time.Since(started).Round(time.Millisecond))
	// A payload that would be seen in any plaintext datagram.
	marker := []byte("overlayd-plaintext-marker-5c1e")
	payload := bytes.Repeat(marker, (1<<20)/len(marker))
	if _, err := lab.SendTCP(l.Host(1), l.Host(3), overlayAddr(3), 5001, payload, 20*time.Second); err != nil {
		t.Fatalf("TCP h1 -> h3: %v", err)
	}
	// Attached containers talk through the encrypted plane too.
	c1, c3 := l.AddContainer(), l.AddContainer()
	a1 := attachedAddr(t, d1.MustCtl("attach", c1.NS))
	a3 := attachedAddr(t, d3.MustCtl("attach", c3.NS))
	waitPing(t, c1, a3, 5*time.Second)
	if _, err := lab.TransferTCP(c3, c1, a1, 5002, 1<<20, 20*time.Second); err != nil {
		t.Fatalf("TCP between containers c3 -> c1: %v", err)
	}
	for _, d := range members {
		out := d.MustCtl("status")
		if !strings.Contains(out, "Encryption: enabled\n") || !strings.Contains(out, "TrustedSubnets: none") {
			t.Errorf("%s status:\n%s", d.Host.NS, out)
		}
	}
	if out := d5.MustCtl("status"); !strings.Contains(out, "Encryption: disabled") {
		t.Errorf("status without a password:\n%s", out)
	}
	// `wg show` reads overlayd's WireGuard device: h1's two peers, with
	// the keys they proved in the handshake and a completed handshake.
	wg, err := l.Host(1).Exec(context.Background(), "wg", "show", iface(l.Host(1)))
	if err != nil {
		t.Fatalf("wg show: %v\n%s", err, wg)
	}
	for _, d := range []*lab.Daemon{d2, d3} {
		pub, err := exec.Command("sh", "-c", "wg pubkey <"+filepath.Join(d.StateDir, "identity.key")).Output()
		if err != nil {
			t.Fatalf("wg pubkey: %v", err)
		}
		if !strings.Contains(wg, "peer: "+strings.TrimSpace(string(pub))) {
			t.Errorf("wg show on h1 does not list %s's key %s:\n%s", d.Host.NS, pub, wg)
		}
	}
	if strings.Count(wg, "latest handshake") < 1 || !strings.Contains(wg, "listening port: 6784") {
		t.Errorf("wg show on h1:\n%s", wg)
	}
	// A second encrypted overlayd with h1's interface name, in another
	// namespace, would share its configuration socket: refused.
	clash := l.Host(4).Spawn("--password", "x", "--iface", iface(l.Host(1)), "--socket", l.Dir()+"/clash.sock",
		"--state-dir", l.Dir()+"/clash-state", "--port", "6790", "--wg-port", "6791")
	if code, err := clash.Wait(10 * time.Second); err != nil || code != 2 ||
		!strings.Contains(clash.Log(), "give each encrypted overlayd its own --iface") {
		t.Errorf("an interface name clash was not refused: exit %d, %v\n%s", code, err, clash.Log())
	}

	// Both sides of each refusal say which side lacks or mismatches it.
	for _, c := range []struct {
		d    *lab.Daemon
		want string
	}{
		{d1, "password: the peer's password differs from ours"},
		{d1, "password: the peer has none and ours is set"},
		{d4, "password: the peer's password differs from ours"},
		{d5, "password: the peer uses one and we have none"},
	} {
		lab.Eventually(t, 5*time.Second, fmt.Sprintf("%s logs %q", c.d.Host.NS, c.want), func() error {
			if !strings.Contains(c.d.Log(), c.want) {
				return fmt.Errorf("not in the log")
			}
			return nil
		})
	}
	// The refused learn nothing: no peer but themselves, no name, no ring.
	for _, d := range []*lab.Daemon{d4, d5} {
		st := mustStatus(t, d)
		if n := len(st.Router.Peers); n != 1 {
			t.Errorf("%s knows %d peers: %+v", d.Host.NS, n, st.Router.Peers)
		}
		if len(st.IPAM.Entries) != 0 {
			t.Errorf("%s holds a ring: %+v", d.Host.NS, st.IPAM.Entries)
		}
		if out := d.MustCtl("dns"); strings.TrimSpace(out) != "" {
			t.Errorf("%s has names:\n%s", d.Host.NS, out)
		}
		for _, f := range []string{"h1", "h2", secretNick} {
			if strings.Contains(d.MustCtl("peers"), "("+f+")") {
				t.Errorf("%s learnt of %s", d.Host.NS, f)
			}
		}
	}
	if st := mustStatus(t, d1); len(st.Router.Peers) != 3 || st.Router.PasswordRefused["password"] == 0 {
		t.Errorf("h1: %d peers, refusals %v", len(st.Router.Peers), st.Router.PasswordRefused)
	}

	// A member that spoofs another's name (it has the password, not the
	// key) is refused; the real one keeps its connection.
	name3 := mustStatus(t, d3).Router.Name
	if _, _, err := d4.Stop(5 * time.Second); err != nil { // the spoofer takes its place (and its range route)
		t.Fatal(err)
	}
	spoof := l.Host(4).Spawn("--password", "correct horse", "--name", name3.String(), "--iface", "ovpw6",
		"--socket", l.Dir()+"/spoof.sock", "--state-dir", l.Dir()+"/spoof-state", "--port", "6792", "--wg-port", "6793",
		"--range", testRange, "--peer", l.Host(1).Addr.String())
	t.Cleanup(func() { spoof.Stop(5 * time.Second) })
	lab.Eventually(t, 10*time.Second, "h1 refuses the spoofed name", func() error {
		if !strings.Contains(d1.Log(), "is connected with another identity key") {
			return errors.New("not in h1's log")
		}
		return nil
	})
	for _, c := range mustStatus(t, d1).Router.Connections {
		if c.Name == name3 && (c.State != "established" || !strings.HasPrefix(c.Address, l.Host(3).Addr.String()+":")) {
			t.Errorf("h1's connection to h3's name: %+v", c)
		}
	}
	waitPing(t, l.Host(1), overlayAddr(3), 5*time.Second)

	// Nothing crossed the underlay in clear: no name, no nickname, not
	// the payload, on either port.
	pcap := capture()
	if len(pcap) < 2<<20 {
		// tcpdump may lose some frames, not most.
		t.Fatalf("the capture holds %d bytes; the transfers alone are 2 MiB", len(pcap))
	}
	for _, s := range [][]byte{[]byte(secretNick), []byte(secretName), marker} {
		if bytes.Contains(pcap, s) {
			t.Errorf("%q crossed the underlay in clear", s)
		}
	}

	// h2 and h3 lose their direct path: h1 relays between them, decrypting
	// and re-encrypting (hop by hop).
	cutApart(t, l.Host(2), l.Host(3))
	waitConnected(t, d2, 1, 10*time.Second)
	lab.Eventually(t, 10*time.Second, "TCP h2 -> h3 through h1", func() error {
		_, err := lab.TransferTCP(l.Host(2), l.Host(3), overlayAddr(3), 5003, 1<<20, 10*time.Second)
		return err
	})

	// A member that restarts is back within 5 s.
	if _, _, err := d2.Stop(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat("/var/run/wireguard/" + iface(l.Host(2)) + ".sock"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("h2's WireGuard socket is still there after a clean stop: %v", err)
	}
	restarted := time.Now()
	d2 = member(l.Host(2), "--password", "correct horse", "--peer", l.Host(1).Addr.String())
	waitConnected(t, d2, 1, 5*time.Second)
	waitPing(t, l.Host(2), overlayAddr(1), 5*time.Second)
	t.Logf("a restarted member re-established its connection and carried a ping %v after its restart", time.Since(restarted).Round(time.Millisecond))
}

// attachedAddr is the address `overlayctl attach` printed.
func attachedAddr(t *testing.T, out string) netip.Addr {
	t.Helper()
	p, err := netip.ParsePrefix(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("attach printed %q: %v", out, err)
	}
	return p.Addr()
}

// startCapture records every frame on the lab's switch until the function
// it returns is called; that returns the capture file's bytes.
func startCapture(t *testing.T, l *lab.Lab) func() []byte {
	t.Helper()
	path := filepath.Join(l.Dir(), "underlay.pcap")
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", l.Switch, "tcpdump", "-i", "br0", "-U", "-s", "0", "-w", path, "udp")
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGINT) }
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("tcpdump: %v", err)
	}
	t.Cleanup(func() { cancel(); cmd.Wait() })
	lab.Eventually(t, 5*time.Second, "tcpdump listening", func() error {
		// The file's header is written once the capture is open.
		if fi, err := os.Stat(path); err != nil || fi.Size() < 24 {
			return fmt.Errorf("no capture file yet: %v", err)
		}
		return nil
	})
	return func() []byte {
		cancel()
		cmd.Wait()
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
}

// TestPasswordNewKey: h2 and h3 cannot reach each other on the underlay,
// so h1 relays between them. h3 loses its keys (its identity and signing
// keys are deleted) and restarts: h2, which never talks to h3 directly,
// takes h3's entry and names under the new key (h1, connected to h3,
// vouches for it), resolves a name h3 registers then, and reaches it again
// through h1.
func TestPasswordNewKey(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 3)
	h1, h2, h3 := l.Host(1), l.Host(2), l.Host(3)
	cutApart(t, h2, h3)
	start := func(h *lab.Host) *lab.Daemon {
		d := h.Start("--range", testRange, "--init-peer-count", "3", "--iface", fmt.Sprintf("ovpk%d", h.Index),
			"--password", "correct horse", "--peer", h1.Addr.String())
		t.Cleanup(func() { d.Stop(5 * time.Second) })
		return d
	}
	d1, d2, d3 := start(h1), start(h2), start(h3)
	waitConnected(t, d1, 2, 10*time.Second)
	for i, d := range []*lab.Daemon{d1, d2, d3} {
		expose(t, d, i+1)
	}
	d3.MustCtl("dns-add", overlayAddr(3).String(), "k3", "--container", "c3")
	reached := func(what string) {
		t.Helper()
		lab.Eventually(t, 15*time.Second, what, func() error {
			if out, errOut, _ := d2.Ctl("dns-lookup", "k3"); !strings.Contains(out, overlayAddr(3).String()) {
				return fmt.Errorf("h2 does not resolve k3: %q %q", out, errOut)
			}
			_, err := lab.TransferTCP(h2, h3, overlayAddr(3), 5004, 256<<10, 5*time.Second)
			return err
		})
	}
	reached("h2 resolves and reaches h3 through h1")

	if _, _, err := d3.Stop(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"identity.key", "signing.key"} {
		if err := os.Remove(filepath.Join(d3.StateDir, f)); err != nil {
			t.Fatal(err)
		}
	}
	restarted := time.Now()
	d3 = start(h3)
	if !strings.Contains(d3.Log(), "created a new signing key") {
		t.Fatalf("h3 did not make new keys:\n%s", d3.Log())
	}
	reached("h2 resolves and reaches h3, back with new keys")
	t.Logf("h3 back with new keys: resolved and reached from h2 through h1 %v after its restart", time.Since(restarted).Round(time.Millisecond))
	// A name registered under the new key resolves on h2, and h2 knows
	// h3's new incarnation (not its old entry, under the old key).
	d3.MustCtl("dns-add", overlayAddr(3).String(), "k3new", "--container", "c3new")
	uid3 := mustStatus(t, d3).Router.UID
	lab.Eventually(t, 10*time.Second, "h2 takes h3's new entry and names", func() error {
		if out, errOut, _ := d2.Ctl("dns-lookup", "k3new"); !strings.Contains(out, overlayAddr(3).String()) {
			return fmt.Errorf("h2 does not resolve k3new: %q %q", out, errOut)
		}
		for _, p := range mustStatus(t, d2).Router.Peers {
			if p.Name == mustStatus(t, d3).Router.Name && p.UID != uid3 {
				return fmt.Errorf("h2 holds h3 at UID %d, h3 runs as %d", p.UID, uid3)
			}
		}
		return nil
	})
}

// TestTrustedSubnets: three hosts with one password. h1 and h2 trust each
// other's underlay address, so their data goes in clear, by the routers
// (`status connections` says udp, `wg show` on h1 lists h3 only, and the
// capture holds the payload); h2 trusts h3 but h3 trusts no member, and
// h1 does not trust h3: those links go by WireGuard, and their payloads
// never show. Control traffic is sealed on every link: a name registered
// never crosses in clear. With h1 and h3 cut apart, h2 relays between
// them both ways, in clear on one side and encrypted on the other.
func TestTrustedSubnets(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 3)
	h1, h2, h3 := l.Host(1), l.Host(2), l.Host(3)
	one := func(h *lab.Host) string { return netip.PrefixFrom(h.Addr, 32).String() }
	start := func(h *lab.Host, trusted string, args ...string) *lab.Daemon {
		d := h.Start(append([]string{"--range", testRange, "--init-peer-count", "3", "--iface", fmt.Sprintf("ovts%d", h.Index),
			"--password", "correct horse", "--trusted-subnets", trusted}, args...)...)
		t.Cleanup(func() { d.Stop(5 * time.Second) })
		return d
	}
	capture := startCapture(t, l)
	d1 := start(h1, one(h2))
	d2 := start(h2, one(h1)+","+one(h3), "--peer", h1.Addr.String())
	d3 := start(h3, "192.0.2.0/24", "--peer", h1.Addr.String())
	ds := []*lab.Daemon{d1, d2, d3}
	for i, d := range ds {
		waitConnected(t, d, 2, 10*time.Second)
		expose(t, d, i+1)
	}
	if !strings.Contains(d1.Log(), "Communication between peers via untrusted networks is encrypted.") {
		t.Errorf("h1 does not log Weave's line about trusted subnets:\n%s", d1.Log())
	}
	if out := d2.MustCtl("status"); !strings.Contains(out, "TrustedSubnets: "+one(h1)+","+one(h3)+"\n") || !strings.Contains(out, "Encryption: enabled\n") {
		t.Errorf("h2 status:\n%s", out)
	}
	// Each side's view of each link: udp only where both trust.
	names := map[string]string{}
	for _, d := range ds {
		names[mustStatus(t, d).Router.Name.String()] = d.Host.NS
	}
	want := map[[2]string]string{
		{h1.NS, h2.NS}: "udp", {h2.NS, h1.NS}: "udp",
		{h1.NS, h3.NS}: "wg", {h3.NS, h1.NS}: "wg", {h2.NS, h3.NS}: "wg", {h3.NS, h2.NS}: "wg",
	}
	for _, d := range ds {
		for _, c := range mustStatus(t, d).Router.Connections {
			link := [2]string{d.Host.NS, names[c.Name.String()]}
			if c.State != "established" || c.Overlay != want[link] {
				t.Errorf("%s -> %s: %s over %q, want established over %q", link[0], link[1], c.State, c.Overlay, want[link])
			}
		}
	}
	wg, err := h1.Exec(context.Background(), "wg", "show", fmt.Sprintf("ovts%d", h1.Index), "peers")
	if err != nil {
		t.Fatalf("wg show: %v\n%s", err, wg)
	}
	keyOf := func(d *lab.Daemon) string {
		pub, err := exec.Command("sh", "-c", "wg pubkey <"+filepath.Join(d.StateDir, "identity.key")).Output()
		if err != nil {
			t.Fatalf("wg pubkey: %v", err)
		}
		return strings.TrimSpace(string(pub))
	}
	if !strings.Contains(wg, keyOf(d3)) || strings.Contains(wg, keyOf(d2)) {
		t.Errorf("WireGuard peers on h1 (want h3's key %s only):\n%s", keyOf(d3), wg)
	}

	const secretName = "trusted-name-41c9"
	d1.MustCtl("dns-add", overlayAddr(1).String(), secretName, "--container", "c1")
	lab.Eventually(t, 5*time.Second, "h2 resolves the name h1 registered", func() error {
		if out := d2.MustCtl("dns"); !strings.Contains(out, secretName) {
			return fmt.Errorf("dns on h2:\n%s", out)
		}
		return nil
	})
	markers := map[string][]byte{}
	for _, m := range []struct {
		from, to *lab.Host
		i        int
	}{{h1, h2, 2}, {h2, h1, 1}, {h2, h3, 3}, {h1, h3, 3}, {h3, h1, 1}} {
		marker := []byte(fmt.Sprintf("marker-%s-to-%s-6e0f", m.from.NS, m.to.NS))
		markers[m.from.NS+" -> "+m.to.NS] = marker
		waitPing(t, m.from, overlayAddr(m.i), 5*time.Second)
		if _, err := lab.SendTCP(m.from, m.to, overlayAddr(m.i), uint16(5100+len(markers)), bytes.Repeat(marker, (256<<10)/len(marker)), 20*time.Second); err != nil {
			t.Fatalf("TCP %s -> %s: %v", m.from.NS, m.to.NS, err)
		}
	}
	if st := mustStatus(t, d2); st.Router.Stats.ReceivedPackets == 0 || st.Router.Stats.SentPackets == 0 {
		t.Errorf("h2's router carried no data of its own: %+v", st.Router.Stats)
	}
	if st := mustStatus(t, d3); st.Router.Stats.ReceivedPackets != 0 || st.Router.Stats.SentPackets != 0 {
		t.Errorf("h3's router carried data in clear: %+v", st.Router.Stats)
	}
	pcap := capture()
	for link, m := range markers {
		clear := link == h1.NS+" -> "+h2.NS || link == h2.NS+" -> "+h1.NS
		if bytes.Contains(pcap, m) != clear {
			t.Errorf("%s: payload in clear on the underlay: %v, want %v", link, !clear, clear)
		}
	}
	if bytes.Contains(pcap, []byte(secretName)) {
		t.Errorf("the name %q crossed the underlay in clear: control traffic must stay sealed", secretName)
	}

	// h1 and h3 lose their direct path: h2 relays, in clear on the h1
	// side and by WireGuard on the h3 side, both ways.
	cutApart(t, h1, h3)
	waitConnected(t, d1, 1, 10*time.Second)
	waitConnected(t, d3, 1, 10*time.Second)
	for _, m := range []struct {
		from, to *lab.Host
		i        int
	}{{h1, h3, 3}, {h3, h1, 1}} {
		lab.Eventually(t, 30*time.Second, fmt.Sprintf("TCP %s -> %s through h2", m.from.NS, m.to.NS), func() error {
			_, err := lab.TransferTCP(m.from, m.to, overlayAddr(m.i), uint16(5110+m.i), 1<<20, 10*time.Second)
			return err
		})
	}
}
