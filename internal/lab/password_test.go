package lab_test

import (
	"bytes"
	"context"
	"fmt"
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
// names and carry traffic; no name or nickname crosses the underlay in
// clear; the other two are refused with a log line on both sides saying
// which side lacks or mismatches the password, and learn no peer, name or
// ring. A member restarted is back within 5 s.
func TestPassword(t *testing.T) {
	l := lab.New(t, bin, 5)
	pwFile := filepath.Join(l.Dir(), "password")
	if err := os.WriteFile(pwFile, []byte("correct horse\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A nickname and a name that would show in any plaintext gossip.
	const secretNick, secretName = "nick-9f3e1c", "name-7a5d2b"
	member := func(h *lab.Host, args ...string) *lab.Daemon {
		return h.Start(append([]string{"--range", testRange, "--init-peer-count", "3"}, args...)...)
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
	waitPing(t, l.Host(1), overlayAddr(3), 5*time.Second)
	if _, err := lab.TransferTCP(l.Host(1), l.Host(3), overlayAddr(3), 5001, 1<<20, 20*time.Second); err != nil {
		t.Fatalf("TCP h1 -> h3: %v", err)
	}
	if out := d2.MustCtl("status"); !strings.Contains(out, "Encryption: enabled for control traffic") {
		t.Errorf("status:\n%s", out)
	}
	if out := d5.MustCtl("status"); !strings.Contains(out, "Encryption: disabled") {
		t.Errorf("status without a password:\n%s", out)
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

	// Nothing of the control traffic crossed the underlay in clear.
	pcap := capture()
	if len(pcap) < 1<<19 {
		// tcpdump may lose some frames, not most.
		t.Fatalf("the capture holds %d bytes; the transfer alone is 1 MiB", len(pcap))
	}
	for _, s := range []string{secretNick, secretName} {
		if bytes.Contains(pcap, []byte(s)) {
			t.Errorf("%q crossed the underlay in clear", s)
		}
	}

	// A member that restarts is back within 5 s.
	if _, _, err := d2.Stop(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	restarted := time.Now()
	d2 = member(l.Host(2), "--password", "correct horse", "--peer", l.Host(1).Addr.String())
	waitConnected(t, d2, 2, 5*time.Second)
	t.Logf("a restarted member re-established both connections %v after its restart", time.Since(restarted).Round(time.Millisecond))
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
