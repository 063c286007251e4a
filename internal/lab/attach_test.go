package lab_test

import (
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/overlayd/overlayd/internal/lab"
)

// TestAttach plumbs containers (network namespaces) on three hosts into
// the overlay: addresses from IPAM and given ones, with and without
// names; ping and 1 MiB of TCP with its content checked between every
// pair, names in DNS, ps, detach freeing the address for the next attach,
// and bad targets.
func TestAttach(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 3)
	h1, h2, h3 := l.Host(1), l.Host(2), l.Host(3)
	d1 := h1.Start("--range", "10.32.0.0/12")
	d2 := h2.Start("--range", "10.32.0.0/12", "--peer", h1.Addr.String())
	d3 := h3.Start("--range", "10.32.0.0/12", "--peer", h1.Addr.String())
	waitConnected(t, d1, 2, 5*time.Second)
	waitConnected(t, d3, 2, 5*time.Second)
	c1, c2, c3, c4 := l.AddContainer(), l.AddContainer(), l.AddContainer(), l.AddContainer()

	addrOf := func(out string) netip.Addr {
		t.Helper()
		p, err := netip.ParsePrefix(strings.TrimSpace(out))
		if err != nil {
			t.Fatalf("attach printed %q: %v", out, err)
		}
		return p.Addr()
	}
	a1 := addrOf(d1.MustCtl("attach", c1.NS, "--name", "web1"))
	a2 := addrOf(d2.MustCtl("attach", c2.NS, "--name", "web2"))
	a3 := addrOf(d2.MustCtl("attach", c3.NS, "10.32.200.3/12"))
	if a3 != netip.MustParseAddr("10.32.200.3") {
		t.Errorf("attach with a CIDR gave %v", a3)
	}
	if again := addrOf(d1.MustCtl("attach", c1.NS)); again != a1 {
		t.Errorf("attaching c1 again gave %v, first %v", again, a1)
	}
	a4 := addrOf(d3.MustCtl("attach", c4.NS, "10.32.200.4/12", "--name", "web4"))
	addrs := map[*lab.Host]netip.Addr{c1: a1, c2: a2, c3: a3, c4: a4}
	var slowest time.Duration
	for _, from := range []*lab.Host{c1, c2, c3, c4} {
		for _, to := range []*lab.Host{c1, c2, c3, c4} {
			if from == to {
				continue
			}
			waitPing(t, from, addrs[to], 10*time.Second)
			took, err := lab.TransferTCP(from, to, addrs[to], 7000, 1<<20, 20*time.Second)
			if err != nil {
				t.Fatalf("TCP %s -> %s: %v", from.NS, to.NS, err)
			}
			slowest = max(slowest, took)
		}
	}
	t.Logf("ping and 1 MiB of TCP, content checked, between all 12 ordered pairs of 4 containers on 3 hosts; slowest transfer %v",
		slowest.Round(time.Millisecond))
	// A name registered on h3 resolves in a container of h1, by dig
	// and by ping.
	lab.Eventually(t, 5*time.Second, "web4 known on h1", func() error {
		if _, errOut, code := d1.Ctl("dns-lookup", "web4"); code != 0 {
			return fmt.Errorf("%s", errOut)
		}
		return nil
	})
	if out, err := c1.Exec(t.Context(), "ping", "-c", "1", "-W", "2", "web4"); err != nil || !strings.Contains(out, "web4.weave.local ("+a4.String()+")") {
		t.Errorf("ping web4 in c1: %v\n%s", err, out)
	}
	// The container's end: MTU 1410, TX checksum offload off.
	ctx := t.Context()
	if out, err := c1.Exec(ctx, "ip", "-o", "link", "show", "ethwe0"); err != nil || !strings.Contains(out, "mtu 1410") {
		t.Errorf("ethwe0 in c1: %v %s", err, out)
	}
	if out, err := c1.Exec(ctx, "ethtool", "-k", "ethwe0"); err != nil || !strings.Contains(out, "\ntx-checksumming: off\n") {
		t.Errorf("TX checksum offload of ethwe0 in c1: %v\n%s", err, out)
	}
	// Names registered with --name resolve on the other host.
	lab.Eventually(t, 5*time.Second, "web1 known on h2", func() error {
		out, errOut, code := d2.Ctl("dns-lookup", "web1")
		if code != 0 || strings.TrimSpace(out) != a1.String() {
			return fmt.Errorf("exit %d %q %q", code, out, errOut)
		}
		return nil
	})

	// In a named namespace attached with a name, the resolver is
	// overlayd's: ping by name (glibc, through /etc/netns/NAME).
	lab.Eventually(t, 5*time.Second, "web2 known on h1", func() error {
		_, errOut, code := d1.Ctl("dns-lookup", "web2")
		if code != 0 {
			return fmt.Errorf("%s", errOut)
		}
		return nil
	})
	if out, err := c1.Exec(ctx, "ping", "-c", "2", "-W", "2", "web2"); err != nil || !strings.Contains(out, "web2.weave.local ("+a2.String()+")") {
		t.Errorf("ping web2 in c1: %v\n%s", err, out)
	}
	if out, err := c1.Exec(ctx, "dig", "+short", "+time=2", "+tries=1", "web2.weave.local"); err != nil || strings.TrimSpace(out) != a2.String() {
		t.Errorf("dig web2 in c1: %v %q", err, out)
	}
	// A program that is not root reads the namespace's resolv.conf too.
	if out, err := c1.Exec(ctx, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", "/etc/resolv.conf"); err != nil || !strings.Contains(out, "search weave.local") {
		t.Errorf("resolv.conf as nobody in c1: %v %q", err, out)
	}

	ps := d2.MustCtl("ps")
	lines := strings.Split(strings.TrimSpace(ps), "\n")
	// h2 exposed an address of its own for the containers' DNS server.
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "weave:expose "+mustStatus(t, d2).Router.Name.String()+" 10.") {
		t.Fatalf("ps on h2:\n%s", ps)
	}
	for _, want := range []string{a2.String(), a3.String()} {
		if !strings.Contains(ps, want+"/12") {
			t.Errorf("ps lacks %s/12:\n%s", want, ps)
		}
	}

	// Detach: the veth goes, the address and the name are released, and
	// the next attach of the same container gets the address again.
	d2.MustCtl("detach", c2.NS)
	if out, _ := c2.Exec(ctx, "ip", "link", "show", "ethwe0"); !strings.Contains(out, "does not exist") {
		t.Errorf("ethwe0 left in c2 after detach: %s", out)
	}
	lab.Eventually(t, 5*time.Second, "web2 gone on h1", func() error {
		if _, _, code := d1.Ctl("dns-lookup", "web2"); code == 0 {
			return fmt.Errorf("still there")
		}
		return nil
	})
	if again := addrOf(d2.MustCtl("attach", c2.NS)); again != a2 {
		t.Errorf("re-attached after detach: %v, want the freed %v", again, a2)
	}
	waitPing(t, c1, a2, 10*time.Second)

	// State: a restarted overlayd still lists its containers.
	d2.Stop(5 * time.Second)
	d2 = h2.Start("--range", "10.32.0.0/12", "--peer", h1.Addr.String(), "--release-grace", "1s")
	if ps := d2.MustCtl("ps"); !strings.Contains(ps, a2.String()) || !strings.Contains(ps, a3.String()) {
		t.Errorf("ps after a restart:\n%s", ps)
	}

	// A container that goes away (its namespace deleted) loses its
	// address after the grace period.
	if out, err := exec.Command("ip", "netns", "del", c3.NS).CombinedOutput(); err != nil {
		t.Fatalf("deleting %s: %v %s", c3.NS, err, out)
	}
	gone := time.Now()
	lab.Eventually(t, 10*time.Second, "c3's address released", func() error {
		for _, o := range mustStatus(t, d2).IPAM.Owned {
			if o.Address.Addr() == a3 {
				return fmt.Errorf("%v still held", a3)
			}
		}
		if ps := d2.MustCtl("ps"); strings.Contains(ps, a3.String()) {
			return fmt.Errorf("ps still lists it:\n%s", ps)
		}
		return nil
	})
	if took := time.Since(gone); took < time.Second {
		t.Errorf("released %v after the namespace went, before the 1 s grace", took)
	} else {
		t.Logf("c3's address released %v after its namespace was deleted (grace 1 s)", took.Round(100*time.Millisecond))
	}

	// Bad targets: a clear error, nothing left behind.
	for _, bad := range []string{"no-such-netns", "/tmp/no/such/path", filepath.Join(l.Dir(), "h1.sock")} {
		_, errOut, code := d1.Ctl("attach", bad)
		if code != 1 || !strings.Contains(errOut, "is not a network namespace") {
			t.Errorf("attach %s: exit %d, %q", bad, code, errOut)
		}
	}
	if _, errOut, code := d1.Ctl("detach", c2.NS); code != 1 || !strings.Contains(errOut, "is not attached") {
		t.Errorf("detach of a container attached elsewhere: exit %d, %q", code, errOut)
	}
	if st := mustStatus(t, d1); len(st.IPAM.Owned) != 2 {
		t.Errorf("h1 holds %v after the bad attaches, want only c1's address and the one it exposed", st.IPAM.Owned)
	}

}
