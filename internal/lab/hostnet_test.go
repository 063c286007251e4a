package lab_test

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/lab"
)

// reach checks that from reaches to's addr: a ping, then 256 KiB over TCP
// with the content checked.
func reach(t *testing.T, from, to *lab.Host, addr netip.Addr, port uint16) {
	t.Helper()
	waitPing(t, from, addr, 5*time.Second)
	if _, err := lab.TransferTCP(from, to, addr, port, 256<<10, 20*time.Second); err != nil {
		t.Fatalf("TCP %s -> %v in %s: %v", from.NS, addr, to.NS, err)
	}
}

// routeOf returns `ip route show DST` in h (one line, or "").
func routeOf(t *testing.T, h *lab.Host, dst string) string {
	t.Helper()
	out, err := h.Exec(t.Context(), "ip", "route", "show", dst)
	if err != nil {
		t.Fatalf("ip route show %s: %v: %s", dst, err, out)
	}
	return strings.TrimSpace(out)
}

// inet lists the IPv4 addresses of dev in h, as ip prints them.
func inet(t *testing.T, h *lab.Host, dev string) []string {
	t.Helper()
	out, err := h.Exec(t.Context(), "ip", "-4", "-o", "addr", "show", "dev", dev)
	if err != nil {
		t.Fatalf("ip addr show %s: %v: %s", dev, err, out)
	}
	var as []string
	for _, f := range strings.Split(out, "\n") {
		if fs := strings.Fields(f); len(fs) >= 4 && fs[2] == "inet" {
			as = append(as, fs[3])
		}
	}
	return as
}

// metric returns the value of one Prometheus sample line (name with its
// labels) from the daemon's metrics.
func metric(t *testing.T, h *lab.Host, addr, sample string) float64 {
	t.Helper()
	body, err := h.Get(addr, "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	i := strings.Index(body, "\n"+sample+" ")
	if i < 0 {
		t.Fatalf("no %s in the metrics", sample)
	}
	var v float64
	fmt.Sscan(body[i+len(sample)+2:], &v)
	return v
}

// TestHideKeepsRange is issue 18: hiding a host's only exposed address
// made the kernel flush the range route (it does so for a device that
// loses its last address), cutting the host and its containers off the
// overlay until a restart. Now the route stays, whatever removes it, and
// so do the containers' /32 routes, the device's state and the exposed
// addresses: after hide, expose again, a second address, an address
// outside the range, `ip route del`, `ip link set down`, `ip addr del`, a
// detach and restarts, both hosts and a container still reach each other
// (ping and TCP with content checks).
func TestHideKeepsRange(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 2)
	h1, h2 := l.Host(1), l.Host(2)
	const rng = "172.16.16.0/24"
	d1 := h1.Start("--range", rng, "--no-dns")
	d2 := h2.Start("--range", rng, "--no-dns", "--peer", h1.Addr.String(), "--metrics-addr", "127.0.0.1:9783")
	waitConnected(t, d2, 1, 5*time.Second)
	a1, a2, a3 := netip.MustParseAddr("172.16.16.201"), netip.MustParseAddr("172.16.16.202"), netip.MustParseAddr("172.16.16.203")
	d1.MustCtl("expose", "172.16.16.201/24")
	d2.MustCtl("expose", "172.16.16.202/24")
	reach(t, h1, h2, a2, 7101)
	rangeRoute := "172.16.16.0/24 dev ovl0 scope link"
	if got := routeOf(t, h2, rng); got != rangeRoute {
		t.Fatalf("h2's range route: %q", got)
	}
	// A container on h2, from IPAM.
	c := l.AddContainer()
	p, err := netip.ParsePrefix(strings.TrimSpace(d2.MustCtl("attach", c.NS)))
	if err != nil {
		t.Fatal(err)
	}
	ca := p.Addr()
	reach(t, c, h1, a1, 7102)
	reach(t, h1, c, ca, 7103)

	// The sequence: hide, and the range route stays.
	d2.MustCtl("hide", "172.16.16.202/24")
	if got := routeOf(t, h2, rng); got != rangeRoute {
		t.Fatalf("after hide, h2's range route is %q", got)
	}
	// The container still reaches h1, and h1 it.
	reach(t, c, h1, a1, 7104)
	reach(t, h1, c, ca, 7105)
	d2.MustCtl("expose", "172.16.16.202/24")
	reach(t, h1, h2, a2, 7106)
	reach(t, h2, h1, a1, 7107)
	// The same address with another mask is refused, and the refusal
	// does not give the exposed address back to IPAM.
	if _, errOut, code := d2.Ctl("expose", "172.16.16.202/16"); code != 1 || !strings.Contains(errOut, "is already exposed as 172.16.16.202/24") {
		t.Fatalf("expose with another mask: exit %d, %q", code, errOut)
	}
	if owned := ipam(t, d2).Owned; !slices.ContainsFunc(owned, func(o api.IPAMAllocation) bool {
		return o.ID == "weave:expose" && o.Address.Addr() == a2
	}) {
		t.Fatalf("the exposed address is no longer held after a refused expose: %+v", owned)
	}

	// Three cycles more.
	for i := range 3 {
		d2.MustCtl("hide", "172.16.16.202/24")
		if got := routeOf(t, h2, rng); got != rangeRoute {
			t.Fatalf("cycle %d: after hide, h2's range route is %q", i, got)
		}
		if err := c.Ping(a1, 1); err != nil {
			t.Fatalf("cycle %d: the container, after hide: %v", i, err)
		}
		d2.MustCtl("expose", "172.16.16.202/24")
		if err := h2.Ping(a1, 1); err != nil {
			t.Fatalf("cycle %d: h2, after expose: %v", i, err)
		}
		waitPing(t, h1, a2, 5*time.Second)
	}

	// A second address, then the first hidden: the second stays (the
	// kernel drops a primary's secondaries unless told otherwise).
	d2.MustCtl("expose", "172.16.16.203/24")
	d2.MustCtl("hide", "172.16.16.202/24")
	if got := inet(t, h2, "ovl0"); len(got) != 1 || got[0] != "172.16.16.203/24" {
		t.Fatalf("after hiding the first of two addresses, ovl0 has %v", got)
	}
	if ps := d2.MustCtl("ps"); !strings.Contains(ps, " 172.16.16.203/24\n") || strings.Contains(ps, "172.16.16.202") {
		t.Fatalf("ps: %s", ps)
	}
	reach(t, h1, h2, a3, 7108)

	// An address outside the range, exposed and hidden as the last one.
	d2.MustCtl("hide", "172.16.16.203/24")
	d2.MustCtl("expose", "10.99.0.5/24")
	d2.MustCtl("hide", "10.99.0.5/24")
	if got := routeOf(t, h2, rng); got != rangeRoute {
		t.Fatalf("after hiding an address outside the range, h2's range route is %q", got)
	}
	reach(t, c, h1, a1, 7109)
	d2.MustCtl("expose", "172.16.16.202/24")

	// Removed by hand: put back within 2 s, traffic flows again.
	restored := func(what string, check func() error) {
		t.Helper()
		start := time.Now()
		lab.Eventually(t, 2*time.Second, what+" put back", check)
		t.Logf("%s put back in %v", what, time.Since(start).Round(time.Millisecond))
	}
	if out, err := h2.Exec(t.Context(), "ip", "route", "del", rng); err != nil {
		t.Fatalf("ip route del: %v: %s", err, out)
	}
	restored("the range route", func() error {
		if got := routeOf(t, h2, rng); got != rangeRoute {
			return fmt.Errorf("route %q", got)
		}
		return nil
	})
	reach(t, h1, h2, a2, 7110)
	reach(t, c, h1, a1, 7111)
	host32 := routeOf(t, h2, ca.String())
	if !strings.HasPrefix(host32, ca.String()+" dev vethwe") {
		t.Fatalf("the container's host route: %q", host32)
	}
	if out, err := h2.Exec(t.Context(), "ip", "route", "del", ca.String()); err != nil {
		t.Fatalf("ip route del: %v: %s", err, out)
	}
	restored("the container's /32 route", func() error {
		if got := routeOf(t, h2, ca.String()); got != host32 {
			return fmt.Errorf("route %q", got)
		}
		return nil
	})
	reach(t, h1, c, ca, 7112)
	if out, err := h2.Exec(t.Context(), "ip", "link", "set", "ovl0", "down"); err != nil {
		t.Fatalf("ip link set down: %v: %s", err, out)
	}
	restored("ovl0 up, with its route", func() error {
		if out, _ := h2.Exec(t.Context(), "ip", "link", "show", "ovl0"); !strings.Contains(out, ",UP") {
			return fmt.Errorf("%s", out)
		}
		if got := routeOf(t, h2, rng); got != rangeRoute {
			return fmt.Errorf("route %q", got)
		}
		return nil
	})
	if out, err := h2.Exec(t.Context(), "ip", "addr", "del", "172.16.16.202/24", "dev", "ovl0"); err != nil {
		t.Fatalf("ip addr del: %v: %s", err, out)
	}
	restored("the exposed address", func() error {
		if got := inet(t, h2, "ovl0"); len(got) != 1 || got[0] != "172.16.16.202/24" {
			return fmt.Errorf("ovl0 has %v", got)
		}
		return nil
	})
	reach(t, h1, h2, a2, 7113)
	reach(t, h1, c, ca, 7114)
	log := d2.Log()
	for _, want := range []string{
		"restored route 172.16.16.0/24 through ovl0, which was removed or changed",
		"restored route " + ca.String() + "/32 through vethwe",
		"restored ovl0 up",
		"restored 172.16.16.202/24 on ovl0",
	} {
		if !strings.Contains(log, want) {
			t.Errorf("h2's log lacks %q", want)
		}
	}
	for kind, least := range map[string]float64{"range_route": 3, "container_route": 1, "link_up": 1, "address": 1} {
		if v := metric(t, h2, "127.0.0.1:9783", `overlayd_netconf_restored_total{kind="`+kind+`"}`); v < least {
			t.Errorf("overlayd_netconf_restored_total{kind=%q} = %v, want at least %v", kind, v, least)
		}
	}

	// A restart keeps the exposed address (the device goes with the
	// process, the address's IPAM allocation does not); after SIGKILL too.
	for _, kill := range []bool{false, true} {
		if kill {
			d2.Kill()
		} else if code, _, err := d2.Stop(5 * time.Second); err != nil || code != 0 {
			t.Fatalf("stopping h2: %d %v", code, err)
		}
		d2 = h2.Start("--range", rng, "--no-dns", "--peer", h1.Addr.String())
		lab.Eventually(t, 5*time.Second, "h2's address exposed again", func() error {
			if got := inet(t, h2, "ovl0"); len(got) != 1 || got[0] != "172.16.16.202/24" {
				return fmt.Errorf("ovl0 has %v", got)
			}
			return nil
		})
		if ps := d2.MustCtl("ps"); !strings.HasPrefix(ps, "weave:expose ") || !strings.Contains(ps, " 172.16.16.202/24\n") {
			t.Fatalf("ps after a restart (kill %v): %s", kill, ps)
		}
		if got := routeOf(t, h2, rng); got != rangeRoute {
			t.Fatalf("after a restart, h2's range route is %q", got)
		}
		reach(t, h1, h2, a2, 7115)
		reach(t, h1, c, ca, 7116)
	}
	if !strings.Contains(d2.Log(), "exposed again after the restart") {
		t.Errorf("no log line for the address exposed again:\n%s", d2.Log())
	}

	// Detaching the last container leaves the rest alone.
	d2.MustCtl("detach", c.NS)
	if got := routeOf(t, h2, rng); got != rangeRoute {
		t.Fatalf("after the last detach, h2's range route is %q", got)
	}
	if got := routeOf(t, h2, ca.String()); got != rangeRoute && got != "" {
		t.Fatalf("the detached container's route is still there: %q", got)
	}
	reach(t, h1, h2, a2, 7117)
	// Hidden for good: not exposed again by the next start.
	d2.MustCtl("hide", "172.16.16.202/24")
	if code, _, err := d2.Stop(5 * time.Second); err != nil || code != 0 {
		t.Fatalf("stopping h2: %d %v", code, err)
	}
	if b, err := os.ReadFile(filepath.Join(d2.StateDir, "exposed.json")); err != nil || string(b) != "[]\n" {
		t.Fatalf("exposed.json after hiding all: %q %v", b, err)
	}
	d2 = h2.Start("--range", rng, "--no-dns", "--peer", h1.Addr.String())
	if ps := d2.MustCtl("ps"); strings.Contains(ps, "172.16.16.202") {
		t.Fatalf("a hidden address came back after a restart: %s", ps)
	}
}
