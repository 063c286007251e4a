package lab_test

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/ipv4"
	"github.com/overlayd/overlayd/internal/lab"
	"github.com/overlayd/overlayd/proto"
)

// The chaos suite (issue 16): real daemons under crashes, partitions,
// loss and churn, with the same invariants checked at the end of every
// scenario (world.check). Each runs in its short form here; -chaos.long
// runs the long forms that RELIABILITY.md reports:
//
//	go test ./internal/lab -run Chaos -chaos.long -timeout 60m -v
var chaosLong = flag.Bool("chaos.long", false, "run the chaos scenarios' long forms (minutes each)")

const chaosRange = "10.44.0.0/16"

// world is what a scenario did, to check every host's view against.
type world struct {
	t *testing.T

	mu       sync.Mutex
	ds       map[*lab.Host]*lab.Daemon // each host's daemon now
	ids      map[string]netip.Prefix   // allocations answered and not released: ID → address
	names    map[string]netip.Addr     // names registered and not removed
	where    map[string]*lab.Host      // the host an ID or a name is on
	gone     map[string]bool           // names removed: found nowhere at the end
	attached map[*lab.Host]*lab.Host   // container namespace → the host it is attached on
	caddr    map[*lab.Host]netip.Addr  // container namespace → the address attach gave it
	ops      int                       // operations answered
}

func newWorld(t *testing.T, ds ...*lab.Daemon) *world {
	w := &world{t: t, ds: map[*lab.Host]*lab.Daemon{}, ids: map[string]netip.Prefix{}, names: map[string]netip.Addr{},
		where: map[string]*lab.Host{}, gone: map[string]bool{}, attached: map[*lab.Host]*lab.Host{}, caddr: map[*lab.Host]netip.Addr{}}
	for _, d := range ds {
		w.ds[d.Host] = d
	}
	return w
}

func (w *world) daemon(h *lab.Host) *lab.Daemon {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.ds[h]
}

func (w *world) setDaemon(d *lab.Daemon) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.ds[d.Host] = d
}

func (w *world) daemons() []*lab.Daemon {
	w.mu.Lock()
	defer w.mu.Unlock()
	var ds []*lab.Daemon
	for _, d := range w.ds {
		ds = append(ds, d)
	}
	slices.SortFunc(ds, func(a, b *lab.Daemon) int { return a.Host.Index - b.Host.Index })
	return ds
}

// retry runs op against h's daemon until it succeeds or ctx ends: the
// daemon may be killed and restarted under it. Every op is idempotent.
func (w *world) retry(ctx context.Context, h *lab.Host, op func(*api.Client) error) error {
	for {
		c := api.NewClient(w.daemon(h).Socket)
		octx, cancel := context.WithTimeout(ctx, 15*time.Second)
		err := op(c)
		cancel()
		c.Close()
		if err == nil {
			w.mu.Lock()
			w.ops++
			w.mu.Unlock()
			return nil
		}
		_ = octx
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w (last error: %v)", h.NS, ctx.Err(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// allocate asks h's daemon for n addresses, IDs prefix-0..., each with a
// name (when named); every third is released again, with its name.
func (w *world) allocate(ctx context.Context, h *lab.Host, prefix string, n int, named bool) error {
	for i := range n {
		id := fmt.Sprintf("%s-%d", prefix, i)
		var p netip.Prefix
		if err := w.retry(ctx, h, func(c *api.Client) (err error) {
			p, err = c.Alloc(ctx, id, netip.Prefix{})
			return err
		}); err != nil {
			return err
		}
		w.mu.Lock()
		w.ids[id], w.where[id] = p, h
		w.mu.Unlock()
		if named {
			if err := w.retry(ctx, h, func(c *api.Client) error {
				_, err := c.DNSAdd(ctx, api.DNSRequest{Addresses: []netip.Addr{p.Addr()}, Name: id, ContainerID: id})
				return err
			}); err != nil {
				return err
			}
			w.mu.Lock()
			w.names[id] = p.Addr()
			w.mu.Unlock()
		}
		if i%3 != 2 {
			continue
		}
		if err := w.retry(ctx, h, func(c *api.Client) error {
			err := c.Release(ctx, id, p.Addr())
			if err != nil && strings.Contains(err.Error(), fmt.Sprintf("Free: address %v not found for %s", p.Addr(), id)) {
				return nil // released before a kill took the answer (ipalloc.NotHeldError)
			}
			return err
		}); err != nil {
			return err
		}
		w.mu.Lock()
		delete(w.ids, id)
		if named {
			delete(w.names, id)
			w.gone[id] = true
		}
		w.mu.Unlock()
	}
	return nil
}

// attach plumbs container c into h's overlay with name, at the CIDRs
// given or an address from IPAM (overlayctl attach, again after a failure:
// attaching twice gives the same address).
func (w *world) attach(ctx context.Context, h, c *lab.Host, name string, cidrs ...string) error {
	for {
		out, errOut, code := w.daemon(h).Ctl(append(append([]string{"attach", c.NS}, cidrs...), "--name", name)...)
		if code == 0 {
			p, err := netip.ParsePrefix(strings.TrimSpace(out))
			if err != nil {
				return fmt.Errorf("attach printed %q", out)
			}
			w.mu.Lock()
			w.attached[c], w.caddr[c] = h, p.Addr()
			w.names[name], w.where[name] = p.Addr(), h
			w.ops++
			w.mu.Unlock()
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("attach %s on %s: %s", c.NS, h.NS, errOut)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// settleLost takes into account the addresses the hosts gave up after a
// partition (status ipam's lost): each was allocated on both sides, and
// the loser's allocation, name and container no longer count. It returns
// them by address, with the host that gave each up.
func (w *world) settleLost() map[netip.Addr]*lab.Host {
	w.t.Helper()
	lost := map[netip.Addr]*lab.Host{}
	for _, d := range w.daemons() {
		for _, l := range mustStatus(w.t, d).IPAM.Lost {
			lost[l.Address.Addr()] = d.Host
		}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for key, h := range w.where {
		a, isID := w.ids[key].Addr(), true
		if _, ok := w.ids[key]; !ok {
			a, isID = w.names[key], false
		}
		if lost[a] != h {
			continue
		}
		if isID {
			delete(w.ids, key)
		}
		if _, named := w.names[key]; named && w.names[key] == a {
			delete(w.names, key)
			w.gone[key] = true
		}
	}
	for c, h := range w.attached {
		if lost[w.caddr[c]] == h {
			delete(w.attached, c)
		}
	}
	return lost
}

// attachEach attaches a new container of l to each of hosts, named prefix
// and the host's index; the test fails if one cannot be.
func (w *world) attachEach(ctx context.Context, l *lab.Lab, hosts []*lab.Host, prefix string) {
	w.t.Helper()
	for _, h := range hosts {
		if err := w.attach(ctx, h, l.AddContainer(), fmt.Sprintf("%s%d", prefix, h.Index)); err != nil {
			w.t.Fatal(err)
		}
	}
}

// procKiB reads a field of /proc/PID/status given in kB (VmRSS, VmHWM).
func procKiB(pid int, field string) (int, error) {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(status)) {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == field+":" {
			return strconv.Atoi(f[1])
		}
	}
	return 0, fmt.Errorf("/proc/%d/status has no %s", pid, field)
}

// containerAddr is the address of ethwe0 in container c.
func containerAddr(c *lab.Host) (netip.Addr, error) {
	out, err := c.Exec(context.Background(), "ip", "-4", "-o", "addr", "show", "dev", "ethwe0")
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%s: %v: %s", c.NS, err, out)
	}
	f := strings.Fields(out)
	if len(f) < 4 {
		return netip.Addr{}, fmt.Errorf("%s: ethwe0 has no address: %q", c.NS, out)
	}
	p, err := netip.ParsePrefix(f[3])
	return p.Addr(), err
}

// violations lists what is wrong with the hosts' views now; none when
// they agree with the world:
//   - every host holds the same ring (so every range has one owner);
//   - no address is allocated twice, on one host or across hosts;
//   - every answered allocation is held by its ID, at its address;
//   - every attached namespace has its own address, held on its host;
//   - every live name resolves to its address on every host, and no
//     removed name resolves anywhere.
func (w *world) violations(ctx context.Context) []string {
	var bad []string
	ds := w.daemons()
	w.mu.Lock()
	ids, names, gone := cloneMap(w.ids), cloneMap(w.names), cloneMap(w.gone)
	attached := cloneMap(w.attached)
	w.mu.Unlock()

	held := map[netip.Addr]string{} // address → host/ID
	heldBy := map[string]netip.Prefix{}
	var ring []api.IPAMEntry
	for i, d := range ds {
		c := api.NewClient(d.Socket)
		st, err := c.Status(ctx)
		c.Close()
		if err != nil {
			return []string{fmt.Sprintf("%s: %v", d.Host.NS, err)}
		}
		if i == 0 {
			ring = st.IPAM.Entries
		} else if !slices.Equal(st.IPAM.Entries, ring) {
			bad = append(bad, fmt.Sprintf("%s holds another ring than %s: %s", d.Host.NS, ds[0].Host.NS, ringDiff(ring, st.IPAM.Entries)))
		}
		for _, o := range st.IPAM.Owned {
			where := d.Host.NS + "/" + o.ID
			if other, dup := held[o.Address.Addr()]; dup {
				bad = append(bad, fmt.Sprintf("%v allocated twice: %s and %s", o.Address.Addr(), other, where))
			}
			held[o.Address.Addr()] = where
			heldBy[o.ID] = o.Address
		}
	}
	for id, p := range ids {
		if heldBy[id] != p {
			bad = append(bad, fmt.Sprintf("%s was given %v and holds %v", id, p, heldBy[id]))
		}
	}
	seen := map[netip.Addr]string{}
	for c, h := range attached {
		a, err := containerAddr(c)
		if err != nil {
			bad = append(bad, err.Error())
			continue
		}
		if other, dup := seen[a]; dup {
			bad = append(bad, fmt.Sprintf("%s and %s both have %v", other, c.NS, a))
		}
		seen[a] = c.NS
		if where := held[a]; !strings.HasPrefix(where, h.NS+"/") {
			bad = append(bad, fmt.Sprintf("%s has %v, which %s does not hold (held: %q)", c.NS, a, h.NS, where))
		}
	}
	for _, d := range ds {
		c := api.NewClient(d.Socket)
		for name, a := range names {
			r, err := c.DNSLookup(ctx, name)
			if err != nil || !slices.Contains(r.Addresses, a) {
				bad = append(bad, fmt.Sprintf("%s: %s does not resolve to %v: %v %v", d.Host.NS, name, a, r.Addresses, err))
			}
		}
		for name := range gone {
			if _, live := names[name]; live {
				continue
			}
			if r, err := c.DNSLookup(ctx, name); err == nil && len(r.Addresses) > 0 {
				bad = append(bad, fmt.Sprintf("%s: removed name %s still resolves to %v", d.Host.NS, name, r.Addresses))
			}
		}
		c.Close()
	}
	return bad
}

func cloneMap[K comparable, V any](m map[K]V) map[K]V {
	c := make(map[K]V, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

// converge waits up to timeout for no violations and returns how long that
// took; the test fails with the violations left if it takes longer.
func (w *world) converge(timeout time.Duration) time.Duration {
	w.t.Helper()
	start := time.Now()
	var bad []string
	for time.Since(start) < timeout {
		// The hosts agreed when the check that finds no violation began.
		began := time.Since(start)
		if bad = w.violations(w.t.Context()); len(bad) == 0 {
			w.logPeak()
			return began
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(bad) > 12 {
		bad = append(bad[:12], fmt.Sprintf("and %d more", len(bad)-12))
	}
	w.t.Errorf("invariants violated %v after the faults ended:\n\t%s", timeout, strings.Join(bad, "\n\t"))
	return time.Since(start)
}

// logPeak logs the largest peak resident memory (VmHWM) of the daemons
// running now, each over its own life.
func (w *world) logPeak() {
	peak, who := 0, ""
	for _, d := range w.daemons() {
		if kib, err := procKiB(d.Pid(), "VmHWM"); err == nil && kib > peak {
			peak, who = kib, d.Host.NS
		}
	}
	w.t.Logf("peak memory: %.1f MiB resident at most (VmHWM of %s)", float64(peak)/1024, who)
}

// transfers moves 256 KiB of TCP, content checked, from every attached
// container to the next one (in a ring), through the overlay.
func (w *world) transfers(timeout time.Duration) {
	w.t.Helper()
	w.mu.Lock()
	var cs []*lab.Host
	for c := range w.attached {
		cs = append(cs, c)
	}
	w.mu.Unlock()
	slices.SortFunc(cs, func(a, b *lab.Host) int { return strings.Compare(a.NS, b.NS) })
	for i, from := range cs {
		to := cs[(i+1)%len(cs)]
		a, err := containerAddr(to)
		if err != nil {
			w.t.Error(err)
			continue
		}
		if _, err := lab.TransferTCP(from, to, a, 7100, 256<<10, timeout); err != nil {
			w.t.Errorf("TCP %s -> %s (%v): %v", from.NS, to.NS, a, err)
		}
	}
}

// chaosArgs are the flags of h's daemon in a chaos lab: all point at h1,
// with --init-peer-count so that consensus needs a majority of them all.
func chaosArgs(l *lab.Lab, h *lab.Host, extra ...string) []string {
	args := append([]string{"--range", chaosRange, "--init-peer-count", fmt.Sprint(len(l.Hosts))}, extra...)
	if h.Index != 1 {
		args = append(args, "--peer", l.Host(1).Addr.String())
	}
	return args
}

// startChaos starts overlayd on every host of l (chaosArgs).
func startChaos(t *testing.T, l *lab.Lab, extra ...string) []*lab.Daemon {
	var ds []*lab.Daemon
	for _, h := range l.Hosts {
		ds = append(ds, h.Start(chaosArgs(l, h, extra...)...))
	}
	for _, d := range ds {
		waitConnected(t, d, len(ds)-1, 15*time.Second)
	}
	return ds
}

// TestChaosKill9 kill -9s a router while it and two others allocate,
// release, register names and attach containers, and restarts it: nothing
// answered is lost, nothing is given twice, and every container and name
// is back.
func TestChaosKill9(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 3)
	ds := startChaos(t, l)
	w := newWorld(t, ds...)
	h2 := l.Host(2)
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	w.attachEach(ctx, l, l.Hosts, "first")
	n := 30
	if *chaosLong {
		n = 200
	}
	late := []*lab.Host{l.AddContainer(), l.AddContainer()}
	var g errgroup.Group
	for _, h := range l.Hosts {
		g.Go(func() error { return w.allocate(ctx, h, fmt.Sprintf("k%d", h.Index), n, true) })
	}
	g.Go(func() error {
		for i, c := range late {
			if err := w.attach(ctx, h2, c, fmt.Sprintf("late%d", i)); err != nil {
				return err
			}
		}
		return nil
	})
	// Kill h2 once it is busy: some of its allocations answered, the
	// late attaches under way.
	lab.Eventually(t, 30*time.Second, "h2 busy", func() error {
		w.mu.Lock()
		defer w.mu.Unlock()
		if len(w.ids) < 10 {
			return fmt.Errorf("%d allocations", len(w.ids))
		}
		return nil
	})
	d2 := w.daemon(h2)
	d2.Signal(syscall.SIGKILL)
	if _, err := d2.Wait(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	w.setDaemon(h2.Start(chaosArgs(l, h2)...))
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	took := w.converge(10 * time.Second)
	w.transfers(20 * time.Second)
	t.Logf("kill -9 of h2 among %d answered operations on 3 hosts: converged %v after the last; %d addresses held, %d names live",
		w.ops, took.Round(time.Millisecond), len(w.ids), len(w.names))

	// A power cut: every router killed at once. Addresses, containers
	// and names are kept on disk, and all come back.
	for _, d := range w.daemons() {
		d.Kill()
	}
	for _, h := range l.Hosts {
		w.setDaemon(h.Start(chaosArgs(l, h)...))
	}
	took = w.converge(10 * time.Second)
	w.transfers(20 * time.Second)
	t.Logf("every router killed and restarted: converged %v after; %d addresses and %d names back", took.Round(time.Millisecond), len(w.ids), len(w.names))
}

// TestChaosPartition cuts 5 hosts into 2+3 in the switch, allocates and
// registers names on both sides, and heals: every host agrees within 10 s.
func TestChaosPartition(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 5)
	ds := startChaos(t, l)
	w := newWorld(t, ds...)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	// Every host allocates once, so that each owns space before the cut.
	for _, h := range l.Hosts {
		if err := w.allocate(ctx, h, fmt.Sprintf("pre%d", h.Index), 1, true); err != nil {
			t.Fatal(err)
		}
		if err := w.attach(ctx, h, l.AddContainer(), fmt.Sprintf("c%d", h.Index)); err != nil {
			t.Fatal(err)
		}
	}
	w.converge(10 * time.Second)
	a, b := l.Hosts[:2], l.Hosts[2:]
	if err := l.Partition(a, b); err != nil {
		t.Fatal(err)
	}
	cut := 8 * time.Second
	if *chaosLong {
		cut = 70 * time.Second
	}
	start := time.Now()
	// Heartbeats stop across the cut: the sides see each other go.
	for _, d := range ds {
		want := 1
		if d.Host.Index > 2 {
			want = 2
		}
		waitConnected(t, d, want, 10*time.Second)
	}
	var g errgroup.Group
	for _, h := range l.Hosts {
		g.Go(func() error { return w.allocate(ctx, h, fmt.Sprintf("cut%d", h.Index), 9, true) })
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(cut - time.Since(start))
	l.Heal()
	took := w.converge(10 * time.Second)
	w.transfers(20 * time.Second)
	t.Logf("2+3 partition of %v, %d operations on both sides: converged %v after the heal",
		cut, w.ops, took.Round(time.Millisecond))
}

// TestChaosSplitBeforeRing cuts 5 fresh hosts into 2+3 before the first
// allocation. With --init-peer-count 5 only the 3 form the ring; the 2
// wait and say so, and join it after the heal. Without it each side may
// form its own ring: then the two refuse each other loudly (Weave's
// "seeded by different peers") rather than merge two allocations.
func TestChaosSplitBeforeRing(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 5)
	ds := startChaos(t, l)
	w := newWorld(t, ds...)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	a, b := l.Hosts[:2], l.Hosts[2:]
	if err := l.Partition(a, b); err != nil {
		t.Fatal(err)
	}
	for _, d := range ds[:2] {
		waitConnected(t, d, 1, 10*time.Second)
	}
	if err := w.allocate(ctx, b[0], "major", 3, true); err != nil {
		t.Fatal(err)
	}
	minority := make(chan error, 1)
	go func() { minority <- w.allocate(ctx, a[0], "minor", 3, true) }()
	lab.Eventually(t, 5*time.Second, "the minority says it waits", func() error {
		st := ipam(t, ds[0])
		if !strings.HasPrefix(st.Status, "awaiting consensus (quorum: 3, known: 2)") {
			return fmt.Errorf("h1: %q", st.Status)
		}
		return nil
	})
	select {
	case err := <-minority:
		t.Fatalf("the minority allocated without a quorum: %v", err)
	case <-time.After(time.Second):
	}
	start := time.Now()
	l.Heal()
	if err := <-minority; err != nil {
		t.Fatal(err)
	}
	t.Logf("the minority's allocation waited for the heal and finished %v after it", time.Since(start).Round(time.Millisecond))
	w.converge(10 * time.Second)

	// Without --init-peer-count each host counts only itself and its
	// --peer: two pairs that have not met form a ring each. When they
	// meet, neither takes the other's ring.
	l2 := lab.New(t, bin, 4)
	var ds2 []*lab.Daemon
	for _, h := range l2.Hosts {
		args := []string{"--range", chaosRange}
		if h.Index%2 == 0 {
			args = append(args, "--peer", l2.Host(h.Index-1).Addr.String())
		}
		ds2 = append(ds2, h.Start(args...))
	}
	left, right := ctlAlloc(t, ds2[0], "left"), ctlAlloc(t, ds2[2], "right")
	if left != right {
		t.Logf("the two sides allocated %s and %s", left, right)
	}
	before := fmt.Sprint(ipam(t, ds2[0]).Entries)
	ds2[1].MustCtl("connect", l2.Host(3).Addr.String())
	lab.Eventually(t, 10*time.Second, "h2 connected to h3", func() error {
		for _, c := range mustStatus(t, ds2[1]).Router.Connections {
			if c.Address == netip.AddrPortFrom(l2.Host(3).Addr, 6783).String() && c.State == "established" {
				return nil
			}
		}
		return errors.New("not yet")
	})
	lab.Eventually(t, 10*time.Second, "both sides refuse the other's ring", func() error {
		for _, d := range ds2[1:3] {
			if st := ipam(t, d); st.Rejected == 0 {
				return fmt.Errorf("%s has refused no IPAM message", d.Host.NS)
			}
		}
		return nil
	})
	if after := fmt.Sprint(ipam(t, ds2[0]).Entries); after != before {
		t.Errorf("h1's ring changed on meeting the other ring:\n%s\n%s", before, after)
	}
	for _, d := range ds2 {
		st := ipam(t, d)
		if st.Duplicates != 0 || st.Conflicts != 0 {
			t.Errorf("%s: %d conflicts, %d duplicates: two rings merged", d.Host.NS, st.Conflicts, st.Duplicates)
		}
	}
	if !strings.Contains(ds2[1].Log(), "seeded by different peers") {
		t.Error("h2 did not log why it refused the other ring")
	}
}

// TestChaosDuplicates: h1 is cut off from h2 and h3, which take its
// space over with rmpeer (the operator's mistake: h1 is alive), and both
// sides allocate, some addresses on both. At the heal h1 gets its space
// back; each address allocated on both sides stays with one host and the
// other gives it up: it says so in its log and status, drops its names,
// marks its container lost in ps and stops routing the address to it, so
// that the address is served once.
func TestChaosDuplicates(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 3)
	ds := startChaos(t, l)
	w := newWorld(t, ds...)
	h1, h2, h3 := l.Host(1), l.Host(2), l.Host(3)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	for _, h := range l.Hosts {
		if err := w.allocate(ctx, h, fmt.Sprintf("pre%d", h.Index), 1, true); err != nil {
			t.Fatal(err)
		}
	}
	// The address both sides will give a container: the last but one of
	// h1's largest block, which allocations (lowest first) do not reach.
	var x netip.Prefix
	var largest uint64
	st1 := ipam(t, ds[0])
	for _, e := range st1.Entries {
		if e.Peer == st1.Owners[0].Peer && e.Size > largest {
			largest = e.Size
			x = netip.PrefixFrom(ipv4.Addr(ipv4.Value(e.Token)+uint32(e.Size)-2), st1.DefaultSubnet.Bits())
		}
	}
	if err := l.Partition([]*lab.Host{h1}, []*lab.Host{h2, h3}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	// rmpeer is refused while h2 still reaches h1, directly or (until h3
	// notices too) through h3.
	var out string
	lab.Eventually(t, 15*time.Second, "rmpeer of the cut-off h1 on h2", func() error {
		o, errOut, code := ds[1].Ctl("rmpeer", mustStatus(t, ds[0]).Router.Name.String())
		if code != 0 {
			return errors.New(errOut)
		}
		out = o
		return nil
	})
	t.Logf("rmpeer of the cut-off h1 on h2: %s", strings.TrimSpace(out))
	c1, c2 := l.AddContainer(), l.AddContainer()
	var g errgroup.Group
	g.Go(func() error { return w.allocate(ctx, h1, "left", 12, true) })
	g.Go(func() error { return w.allocate(ctx, h2, "right", 12, true) })
	// The same address on both sides (h2 may wait for the space it took
	// over to settle).
	g.Go(func() error { return w.attach(ctx, h1, c1, "dup1", x.String()) })
	g.Go(func() error { return w.attach(ctx, h2, c2, "dup2", x.String()) })
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	cut := time.Since(start)
	if *chaosLong && cut < 70*time.Second {
		time.Sleep(70*time.Second - cut)
		cut = time.Since(start)
	}
	// Both sides hold x now: the duplicate the heal must resolve.
	for _, d := range ds[:2] {
		if !slices.ContainsFunc(ipam(t, d).Owned, func(o api.IPAMAllocation) bool { return o.Address.Addr() == x.Addr() }) {
			t.Fatalf("%s does not hold %v during the cut", d.Host.NS, x)
		}
	}
	l.Heal()
	healed := time.Now()
	var lost map[netip.Addr]*lab.Host
	lab.Eventually(t, 20*time.Second, "the duplicate given up", func() error {
		lost = w.settleLost()
		if lost[x.Addr()] == nil {
			return fmt.Errorf("no host gave %v up", x)
		}
		return nil
	})
	took := w.converge(10 * time.Second)
	loser := lost[x.Addr()]
	lc := map[*lab.Host]*lab.Host{h1: c1, h2: c2}[loser]
	ld := w.daemon(loser)
	if ps := ld.MustCtl("ps"); !strings.Contains(ps, "lost:"+x.String()) {
		t.Errorf("ps on the loser %s does not mark %v lost:\n%s", loser.NS, x, ps)
	}
	if st := ld.MustCtl("status"); !strings.Contains(st, "AddressesLost") {
		t.Errorf("status on %s says nothing of the lost addresses:\n%s", loser.NS, st)
	}
	if !strings.Contains(ld.Log(), "address given up: another peer holds it after a partition") {
		t.Errorf("%s did not log the address it gave up", loser.NS)
	}
	if out, _ := loser.Exec(ctx, "ip", "route", "get", x.Addr().String()); strings.Contains(out, "vethwe") {
		t.Errorf("%s still routes %v to its container: %s", loser.NS, x, out)
	}
	if a, err := containerAddr(lc); err == nil {
		t.Errorf("%s still has %v on ethwe0", lc.NS, a)
	}
	// Served once: a third host's container reaches the winner's.
	winner := map[*lab.Host]*lab.Host{h1: c2, h2: c1}[loser]
	c3 := l.AddContainer()
	if err := w.attach(ctx, h3, c3, "third"); err != nil {
		t.Fatal(err)
	}
	if _, err := lab.TransferTCP(c3, winner, x.Addr(), 7200, 64<<10, 20*time.Second); err != nil {
		t.Errorf("TCP from h3 to the holder of %v: %v", x, err)
	}
	w.transfers(20 * time.Second)
	t.Logf("a cut of %v with rmpeer on one side: %d addresses allocated on both sides, given up by the other side; converged %v after the heal (%v after the duplicates were found); %s gave %v up, %s lost it",
		cut.Round(time.Second), len(lost), time.Since(healed).Round(time.Millisecond), took.Round(time.Millisecond), loser.NS, x, lc.NS)
}

// usage is one sample of a daemon's cost.
type usage struct {
	rssKiB, heapKiB, goroutines, fds int
}

func (u usage) String() string {
	return fmt.Sprintf("%.1f MiB RSS (%.1f MiB heap in use), %d goroutines, %d fds",
		float64(u.rssKiB)/1024, float64(u.heapKiB)/1024, u.goroutines, u.fds)
}

// sample reads a daemon's resident memory and open descriptors from /proc
// and its goroutines from its metrics (--metrics-addr 127.0.0.1:9783).
func sample(d *lab.Daemon) (usage, error) {
	var u usage
	var err error
	if u.rssKiB, err = procKiB(d.Pid(), "VmRSS"); err != nil {
		return u, err
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", d.Pid()))
	if err != nil {
		return u, err
	}
	u.fds = len(fds)
	body, err := d.Host.Get("127.0.0.1:9783", "/metrics")
	if err != nil {
		return u, err
	}
	for line := range strings.Lines(body) {
		line = strings.TrimSpace(line)
		if v, ok := strings.CutPrefix(line, "go_goroutines "); ok {
			u.goroutines, _ = strconv.Atoi(v)
		}
		if v, ok := strings.CutPrefix(line, "go_memstats_heap_inuse_bytes "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			u.heapKiB = int(f / 1024)
		}
	}
	return u, nil
}

// TestChaosChurn restarts h3 every second (alternately kill -9 and
// SIGTERM) while h1 and h2 carry on: afterwards their goroutines and
// descriptors return to their baseline and their memory stays near it.
func TestChaosChurn(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 3)
	metrics := []string{"--metrics-addr", "127.0.0.1:9783"}
	ds := startChaos(t, l, metrics...)
	w := newWorld(t, ds...)
	h3 := l.Host(3)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	w.attachEach(ctx, l, l.Hosts, "c")
	w.converge(10 * time.Second)
	time.Sleep(2 * time.Second)
	base := map[*lab.Daemon]usage{}
	for _, d := range ds[:2] {
		u, err := sample(d)
		if err != nil {
			t.Fatal(err)
		}
		base[d] = u
	}
	churn := 15 * time.Second
	if *chaosLong {
		churn = time.Minute
	}
	args := chaosArgs(l, h3, metrics...)
	restarts := 0
	d3 := ds[2]
	for end := time.Now().Add(churn); time.Now().Before(end); restarts++ {
		up := time.Now()
		if restarts%2 == 0 {
			d3.Kill()
		} else if _, _, err := d3.Stop(5 * time.Second); err != nil {
			t.Fatal(err)
		}
		d3 = h3.Start(args...)
		time.Sleep(time.Second - time.Since(up))
	}
	w.setDaemon(d3)
	took := w.converge(10 * time.Second)
	w.transfers(20 * time.Second)
	// Back to the baseline: the same goroutines and descriptors (a few
	// more for work in flight), memory within 50 % (the race detector's
	// shadow memory included).
	for _, d := range ds[:2] {
		var u usage
		lab.Eventually(t, 15*time.Second, d.Host.NS+" back to its baseline", func() error {
			var err error
			if u, err = sample(d); err != nil {
				return err
			}
			b := base[d]
			if u.goroutines > b.goroutines+4 || u.fds > b.fds+2 || u.rssKiB > b.rssKiB*3/2 {
				return fmt.Errorf("%v, baseline %v", u, b)
			}
			return nil
		})
		t.Logf("%s: before %v; after %d restarts of h3 %v", d.Host.NS, base[d], restarts, u)
	}
	t.Logf("%d restarts of h3 in %v; converged %v after the last", restarts, churn, took.Round(time.Millisecond))
}

// TestChaosImpaired runs 3 hosts over an underlay that loses 10 % of the
// packets, delays each by 50 ms ± 20 ms (so reorders them) and duplicates
// 2 %, on every host's link (Host.Impair, netem's work in user space):
// allocations, names and TCP transfers between containers all complete,
// and the hosts agree.
func TestChaosImpaired(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 3)
	ds := startChaos(t, l)
	w := newWorld(t, ds...)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	var stats []*lab.ImpairStats
	for _, h := range l.Hosts {
		st, _, err := h.Impair(lab.Impairment{Loss: 0.10, Delay: 50 * time.Millisecond, Jitter: 20 * time.Millisecond, Duplicate: 0.02, Seed: 16})
		if err != nil {
			t.Fatal(err)
		}
		stats = append(stats, st)
	}
	// The underlay's round trip is two delays: 60 to 140 ms.
	out, _ := l.Host(1).Exec(ctx, "ping", "-c", "10", "-i", "0.1", "-W", "1", l.Host(2).Addr.String())
	if m := regexp.MustCompile(`= ([0-9.]+)/([0-9.]+)/([0-9.]+)/`).FindStringSubmatch(out); m == nil {
		t.Errorf("underlay ping under the impairment:\n%s", out)
	} else if lo, _ := strconv.ParseFloat(m[1], 64); lo < 60 {
		t.Errorf("underlay round trip at least %s ms, want at least 60:\n%s", m[1], out)
	} else {
		t.Logf("underlay round trip under the impairment: min/avg/max %s/%s/%s ms", m[1], m[2], m[3])
	}
	start := time.Now()
	n := 6
	if *chaosLong {
		n = 60
	}
	var g errgroup.Group
	for _, h := range l.Hosts {
		c := l.AddContainer()
		g.Go(func() error {
			if err := w.attach(ctx, h, c, fmt.Sprintf("c%d", h.Index)); err != nil {
				return err
			}
			return w.allocate(ctx, h, fmt.Sprintf("i%d", h.Index), n, true)
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	took := w.converge(30 * time.Second)
	w.transfers(60 * time.Second)
	var seen, dropped, duplicated uint64
	for _, st := range stats {
		seen += st.Seen.Load()
		dropped += st.Dropped.Load()
		duplicated += st.Duplicated.Load()
	}
	if dropped == 0 || duplicated == 0 {
		t.Errorf("the impairment did nothing: %d packets, %d dropped, %d duplicated", seen, dropped, duplicated)
	}
	t.Logf("under 10%% loss, 50±20 ms delay, 2%% duplication: %d operations in %v, agreed %v after the last; %d underlay packets, %d dropped, %d duplicated",
		w.ops, time.Since(start).Round(time.Millisecond), took.Round(time.Millisecond), seen, dropped, duplicated)
}

var (
	soak     = flag.Duration("chaos.soak", 0, "run TestChaosSoak this long (RELIABILITY.md: 30m) instead of its 20 s short form")
	tombs    = flag.Duration("chaos.tombstones", 0, "TestChaosSoak's --dns-tombstone-lifetime (the daemon's default when 0); memory is compared from a minute past it")
	profiles = flag.String("chaos.profiles", "", "directory where TestChaosSoak keeps each daemon's heap profile, taken at the end, and its log")
)

// saveHeap writes a daemon's heap profile (GET /debug/pprof/heap on its
// control socket) to dir/NS.heap.pprof, for go tool pprof, and its log to
// dir/NS.log.
func saveHeap(d *lab.Daemon, dir string) error {
	if err := os.WriteFile(filepath.Join(dir, d.Host.NS+".log"), []byte(d.Log()), 0o644); err != nil {
		return err
	}
	c := http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", d.Socket)
		}}}
	resp, err := c.Get("http://overlayd/debug/pprof/heap")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("heap profile of %s: %s", d.Host.NS, resp.Status)
	}
	f, err := os.Create(filepath.Join(dir, d.Host.NS+".heap.pprof"))
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// ringDiff describes the first entries in which ring b differs from a.
func ringDiff(a, b []api.IPAMEntry) string {
	for i := range max(len(a), len(b)) {
		switch {
		case i >= len(a):
			return fmt.Sprintf("it has %+v more", b[i])
		case i >= len(b):
			return fmt.Sprintf("it lacks %+v", a[i])
		case a[i] != b[i]:
			return fmt.Sprintf("%+v against %+v", b[i], a[i])
		}
	}
	return "the same"
}

// release gives an allocation of the world's back, with its name.
func (w *world) release(ctx context.Context, id string) error {
	w.mu.Lock()
	p, h := w.ids[id], w.where[id]
	w.mu.Unlock()
	if err := w.retry(ctx, h, func(c *api.Client) error { return c.Release(ctx, id, p.Addr()) }); err != nil {
		return err
	}
	w.mu.Lock()
	delete(w.ids, id)
	delete(w.names, id)
	w.gone[id] = true
	w.mu.Unlock()
	return nil
}

// TestChaosSoak runs 5 hosts under mixed load: each host allocates named
// addresses and releases them again (a steady dozen live), containers
// exchange TCP transfers, and a sixth host sprays junk datagrams at all
// five. Each daemon's memory, goroutines and descriptors, sampled every
// 10 s (every 5 s in the short form), stay flat; then the hosts agree.
func TestChaosSoak(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	length, every := 20*time.Second, 5*time.Second
	if *soak > 0 {
		length, every = *soak, 10*time.Second
	}
	l := lab.New(t, bin, 5)
	args := []string{"--metrics-addr", "127.0.0.1:9783"}
	if *tombs > 0 {
		args = append(args, "--dns-tombstone-lifetime", tombs.String())
	}
	ds := startChaos(t, l, args...)
	hosts := slices.Clone(l.Hosts)
	junker := l.AddHost() // runs no daemon
	w := newWorld(t, ds...)
	ctx, cancel := context.WithTimeout(t.Context(), length+3*time.Minute)
	defer cancel()
	w.attachEach(ctx, l, hosts, "c")
	w.converge(10 * time.Second)

	load, stop := context.WithCancel(ctx)
	var g errgroup.Group
	for _, h := range hosts {
		g.Go(func() error {
			for round := 0; load.Err() == nil; round++ {
				if err := w.allocate(ctx, h, fmt.Sprintf("s%d-%d", h.Index, round), 4, true); err != nil {
					return err
				}
				for i := range 4 {
					id := fmt.Sprintf("s%d-%d-%d", h.Index, round-3, i)
					w.mu.Lock()
					_, held := w.ids[id]
					w.mu.Unlock()
					if held {
						if err := w.release(ctx, id); err != nil {
							return err
						}
					}
				}
				select {
				case <-load.Done():
				case <-time.After(time.Second):
				}
			}
			return nil
		})
	}
	g.Go(func() error {
		for load.Err() == nil {
			w.transfers(30 * time.Second)
		}
		return nil
	})
	r := rand.New(rand.NewPCG(6, 6))
	var junkSent int
	g.Go(func() error {
		for load.Err() == nil {
			var junk [][]byte
			for range 200 {
				b := make([]byte, 1+r.IntN(600))
				for j := range b {
					b[j] = byte(r.Uint32())
				}
				b[0] = 1 // our wire version: past the first check
				junk = append(junk, b)
			}
			for _, h := range hosts {
				if err := junker.SendUDP(netip.AddrPortFrom(h.Addr, 6783), junk); err != nil {
					return err
				}
				junkSent += len(junk)
			}
			time.Sleep(200 * time.Millisecond)
		}
		return nil
	})

	type row struct {
		at time.Duration
		u  []usage
	}
	var rows []row
	start := time.Now()
	for at := time.Duration(0); at <= length; at += every {
		time.Sleep(time.Until(start.Add(at)))
		rw := row{at: at}
		for _, d := range ds {
			u, err := sample(d)
			if err != nil {
				t.Fatal(err)
			}
			rw.u = append(rw.u, u)
		}
		rows = append(rows, rw)
	}
	stop()
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	took := w.converge(20 * time.Second)
	if *profiles != "" {
		for _, d := range ds {
			if err := saveHeap(d, *profiles); err != nil {
				t.Error(err)
			}
		}
	}

	var table strings.Builder
	table.WriteString("\n| t | " + strings.Repeat("RSS MiB (heap) / goroutines / fds | ", len(ds)) + "\n")
	for _, rw := range rows {
		fmt.Fprintf(&table, "| %v |", rw.at)
		for _, u := range rw.u {
			fmt.Fprintf(&table, " %.1f (%.1f) / %d / %d |", float64(u.rssKiB)/1024, float64(u.heapKiB)/1024, u.goroutines, u.fds)
		}
		table.WriteString("\n")
	}
	t.Logf("soak of %v on 5 hosts: %d operations, %d junk datagrams; agreed %v after the load stopped%s",
		length, w.ops, junkSent, took.Round(time.Millisecond), table.String())
	// Flat: the last sample against the one once the load has warmed up
	// (after a minute, or half the short form) and the names store holds
	// its steady number of tombstones (a minute past their lifetime, with
	// -chaos.tombstones): goroutines within a few of it (work in flight),
	// descriptors within two, memory within 25 %.
	ref := rows[int(min(max(time.Minute, *tombs+time.Minute), length/2)/every)]
	last := rows[len(rows)-1]
	for i, d := range ds {
		b, u := ref.u[i], last.u[i]
		if u.goroutines > b.goroutines+8 || u.fds > b.fds+2 || u.rssKiB > b.rssKiB*5/4 {
			t.Errorf("%s grew during the soak: %v at %v, %v at the end", d.Host.NS, b, ref.at, u)
		}
	}
}

// cpuTime is the CPU time a process has used (/proc/PID/stat, in clock
// ticks of 10 ms).
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	i := strings.LastIndexByte(string(b), ')')
	f := strings.Fields(string(b[i+1:]))
	if i < 0 || len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %q", pid, b)
	}
	utime, _ := strconv.Atoi(f[11])
	stime, _ := strconv.Atoi(f[12])
	return time.Duration(utime+stime) * 10 * time.Millisecond, nil
}

// TestChaosFlood sends h1 kinds of hostile datagrams from a host outside
// the overlay, as fast as one socket goes, while h1 keeps its connection
// to h2: random bytes, hellos of strangers (answered with accepts, at
// most 4 pending from one address), hellos with another range (rejects,
// a burst of 20 then one a tick) and 5-byte inits (nothing). For each it
// reports the rate, h1's CPU per 100,000 datagrams, and the bytes that
// came back per byte sent, which is never more than 1: no reply is larger
// than its request.
func TestChaosFlood(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 2)
	ds := startChaos(t, l)
	junker := l.AddHost()
	d1 := ds[0]
	n := 50_000
	if *chaosLong {
		n = 1_000_000
	}
	r := rand.New(rand.NewPCG(16, 16))
	hello := func(rng netip.Prefix) []byte {
		return proto.AppendHello(nil, proto.TypeHello, &proto.Hello{MinVersion: 1, MaxVersion: 1,
			Name: proto.PeerName(1 + r.Uint64N(1<<47)), UID: 1 + r.Uint64(), Range: rng, Nickname: "flood"})
	}
	other := netip.MustParsePrefix("10.99.0.0/16")
	kinds := []struct {
		name string
		make func() []byte
	}{
		{"random bytes", func() []byte {
			b := make([]byte, 1+r.IntN(600))
			for j := range b {
				b[j] = byte(r.Uint32())
			}
			b[0] = proto.Version
			return b
		}},
		{"hellos", func() []byte { return hello(netip.MustParsePrefix(chaosRange)) }},
		{"hellos of another range", func() []byte { return hello(other) }},
		{"5-byte inits", func() []byte { return []byte{proto.Version, byte(proto.TypeInit), 0, 0, 0} }},
	}
	var report strings.Builder
	for _, k := range kinds {
		msgs := make([][]byte, 1024)
		for i := range msgs {
			msgs[i] = k.make()
		}
		lost := make(chan struct{}, 1)
		watch, stopWatch := context.WithCancel(t.Context())
		var wg sync.WaitGroup
		wg.Go(func() {
			for watch.Err() == nil {
				st, err := api.NewClient(d1.Socket).Status(watch)
				if watch.Err() != nil {
					return
				}
				ok := false
				for _, c := range st.Router.Connections {
					ok = ok || c.State == "established" && c.Name != 0
				}
				if err != nil || !ok {
					select {
					case lost <- struct{}{}:
					default:
					}
				}
				time.Sleep(200 * time.Millisecond)
			}
		})
		cpu0, err := cpuTime(d1.Pid())
		if err != nil {
			t.Fatal(err)
		}
		var sentBytes, backBytes, backMax, back int
		start := time.Now()
		err = junker.Do(func() error {
			c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(d1.Host.Addr, 6783)))
			if err != nil {
				return err
			}
			defer c.Close()
			var rg sync.WaitGroup
			done := make(chan struct{})
			rg.Go(func() {
				buf := make([]byte, 2048)
				for {
					c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
					m, err := c.Read(buf)
					if err != nil {
						select {
						case <-done:
							return
						default:
							continue
						}
					}
					back++
					backBytes += m
					backMax = max(backMax, m)
				}
			})
			for i := range n {
				m := msgs[i%len(msgs)]
				if _, err := c.Write(m); err == nil {
					sentBytes += len(m)
				}
			}
			time.Sleep(300 * time.Millisecond) // the last answers
			close(done)
			rg.Wait()
			return nil
		})
		took := time.Since(start)
		stopWatch()
		wg.Wait()
		if err != nil {
			t.Fatal(err)
		}
		cpu1, _ := cpuTime(d1.Pid())
		select {
		case <-lost:
			t.Errorf("%s: h1 lost its connection to h2 under the flood", k.name)
		default:
		}
		if backBytes > sentBytes {
			t.Errorf("%s: %d bytes came back for %d sent", k.name, backBytes, sentBytes)
		}
		fmt.Fprintf(&report, "\n| %s | %d | %.0f/s | %.1f ms | %d (%d bytes, largest %d) | %.4f |", k.name, n,
			float64(n)/took.Seconds(), float64((cpu1-cpu0).Milliseconds())*100_000/float64(n), back, backBytes, backMax,
			float64(backBytes)/float64(max(sentBytes, 1)))
	}
	st := mustStatus(t, d1)
	t.Logf("floods of h1 from outside, h1-h2 kept throughout; dropped beyond the source's rate %d, from the strangers' queue %d, from the peers' %d; unproven %d\n"+
		"| kind | datagrams | rate | h1 CPU per 100k | replies | reply bytes per byte |%s",
		st.Router.Stats.DropSourceRate, st.Router.Stats.DropCtrlQueue, st.Router.Stats.DropPeerQueue, st.Router.Unproven, report.String())
	if st.Router.Stats.DropPeerQueue != 0 {
		t.Errorf("%d datagrams of the established peer dropped", st.Router.Stats.DropPeerQueue)
	}
}
