// Package lab builds test networks of hosts in Linux network namespaces and
// runs the real overlayd and overlayctl binaries in them.
//
// A lab is one "switch" namespace holding a bridge, and N host namespaces,
// each with an eth0 whose peer is a port of that bridge:
//
//	ovtPID-K-h1 (192.168.200.1/24, eth0) ──┐
//	ovtPID-K-h2 (192.168.200.2/24, eth0) ──┼── br0 in ovtPID-K-sw
//	ovtPID-K-h3 (192.168.200.3/24, eth0) ──┘
//
// The bridge lives in its own namespace, not the root one, where a container
// engine's firewall may drop bridged traffic. Traffic stays between the
// lab's own namespaces. Everything is removed in t.Cleanup, also when a test
// fails; namespaces left by a killed test process are swept the next time a
// lab is made.
package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// namePrefix starts the name of every namespace a lab makes.
const namePrefix = "ovt"

// Underlay is the subnet of the hosts' eth0 addresses.
var Underlay = netip.MustParsePrefix("192.168.200.0/24")

var labCount atomic.Int32

// Require fails (CI=true) or skips the test when labs cannot be built here:
// they need root, the ip command and /dev/net/tun.
func Require(t testing.TB) {
	t.Helper()
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		missing = append(missing, "the ip command (iproute2)")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		missing = append(missing, "/dev/net/tun")
	}
	if len(missing) == 0 {
		return
	}
	msg := "network namespace tests need " + strings.Join(missing, ", ")
	if os.Getenv("CI") == "true" {
		t.Fatal(msg + " (CI=true: failing instead of skipping)")
	}
	t.Skip(msg)
}

// Lab is a set of hosts on one switch.
type Lab struct {
	t          testing.TB
	id         string
	Switch     string
	Hosts      []*Host
	Containers []*Host // AddContainer's namespaces
	Aliases    []*Host // AddRoot's and Adopt's: names of namespaces the lab did not make
	Bin        Binaries
	dir        string
	rootLink   string // AddRoot's veth in the root namespace
}

// Host is one network namespace on the lab's switch.
type Host struct {
	lab   *Lab
	Index int // 1-based
	NS    string
	Addr  netip.Addr // underlay address on eth0
	port  string     // the host's port on the bridge, in the switch namespace
	// Env is added to the environment of the daemons started in the host
	// from then on.
	Env []string
}

// aliasNS reports whether a lab namespace name is only a name for a
// namespace the lab did not make (the machine's own, a Docker
// container's): its processes are never killed.
func aliasNS(name string) bool {
	i := strings.LastIndex(name, "-")
	return i >= 0 && (name[i+1:] == "root" || strings.HasPrefix(name[i+1:], "d"))
}

// New builds a lab of n hosts. bin must hold overlayd and overlayctl.
func New(t testing.TB, bin Binaries, n int) *Lab {
	t.Helper()
	Require(t)
	sweep()
	l := &Lab{
		t:   t,
		id:  fmt.Sprintf("%s%d-%d", namePrefix, os.Getpid(), labCount.Add(1)),
		Bin: bin,
		dir: t.TempDir(),
	}
	l.Switch = l.id + "-sw"
	t.Cleanup(l.destroy)
	l.must("ip", "netns", "add", l.Switch)
	l.must("ip", "-n", l.Switch, "link", "add", "br0", "type", "bridge")
	l.must("ip", "-n", l.Switch, "link", "set", "br0", "up")
	for i := 1; i <= n; i++ {
		l.AddHost()
	}
	return l
}

// AddHost adds one more host to the switch.
func (l *Lab) AddHost() *Host {
	i := len(l.Hosts) + 1
	h := &Host{lab: l, Index: i, NS: fmt.Sprintf("%s-h%d", l.id, i),
		Addr: netip.AddrFrom4([4]byte{192, 168, 200, byte(i)}), port: fmt.Sprintf("h%d", i)}
	l.must("ip", "netns", "add", h.NS)
	l.must("ip", "-n", h.NS, "link", "add", "eth0", "type", "veth", "peer", "name", h.port, "netns", l.Switch)
	l.must("ip", "-n", l.Switch, "link", "set", h.port, "master", "br0", "up")
	l.must("ip", "-n", h.NS, "addr", "add", netip.PrefixFrom(h.Addr, Underlay.Bits()).String(), "dev", "eth0")
	l.must("ip", "-n", h.NS, "link", "set", "eth0", "up")
	l.must("ip", "-n", h.NS, "link", "set", "lo", "up")
	l.Hosts = append(l.Hosts, h)
	return h
}

// AddContainer adds a network namespace that stands for a container: only
// its loopback, up; overlayctl attach plumbs it in. It is removed with the
// lab. Its Index is 100 and more; it has no underlay address.
func (l *Lab) AddContainer() *Host {
	i := 100 + len(l.Containers) + 1
	c := &Host{lab: l, Index: i, NS: fmt.Sprintf("%s-c%d", l.id, i-100)}
	l.must("ip", "netns", "add", c.NS)
	l.must("ip", "-n", c.NS, "link", "set", "lo", "up")
	l.Containers = append(l.Containers, c)
	return c
}

// AddRoot joins the machine's own network namespace to the switch as a
// host with address .254, for daemons that need the machine's Docker
// engine. The host's NS is a name for the test's own namespace (ip netns
// attach), so what runs "in" it runs on the machine itself. The lab
// removes the link and the name, and never kills processes there.
func (l *Lab) AddRoot() *Host {
	h := &Host{lab: l, Index: 254, NS: l.id + "-root", Addr: netip.AddrFrom4([4]byte{192, 168, 200, 254}), port: "root"}
	l.rootLink = l.id + "r" // at most 15 bytes: ovt, a PID, -K, r
	l.must("ip", "netns", "attach", h.NS, strconv.Itoa(os.Getpid()))
	l.Aliases = append(l.Aliases, h)
	l.must("ip", "link", "add", l.rootLink, "type", "veth", "peer", "name", h.port, "netns", l.Switch)
	l.must("ip", "-n", l.Switch, "link", "set", h.port, "master", "br0", "up")
	l.must("ip", "addr", "add", netip.PrefixFrom(h.Addr, Underlay.Bits()).String(), "dev", l.rootLink)
	l.must("ip", "link", "set", l.rootLink, "up")
	return h
}

// Adopt names the network namespace of process pid (a Docker container's)
// so that tests can run in it like in a host; only the name is removed
// with the lab.
func (l *Lab) Adopt(pid int) *Host {
	i := len(l.Aliases) + 1
	h := &Host{lab: l, Index: 200 + i, NS: fmt.Sprintf("%s-d%d", l.id, i)}
	l.must("ip", "netns", "attach", h.NS, strconv.Itoa(pid))
	l.Aliases = append(l.Aliases, h)
	return h
}

// Host returns host i (1-based).
func (l *Lab) Host(i int) *Host { return l.Hosts[i-1] }

func (l *Lab) must(name string, args ...string) {
	l.t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		l.t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// destroy kills every process in the lab's namespaces and deletes them.
func (l *Lab) destroy() {
	for _, h := range append(slices.Clone(l.Containers), l.Hosts...) {
		killAll(h.NS)
		exec.Command("ip", "netns", "del", h.NS).Run()
		os.RemoveAll("/etc/netns/" + h.NS) // written by overlayctl attach
	}
	killAll(l.Switch)
	exec.Command("ip", "netns", "del", l.Switch).Run()
	if l.rootLink != "" {
		exec.Command("ip", "link", "del", l.rootLink).Run()
	}
	for _, h := range l.Aliases {
		exec.Command("ip", "netns", "del", h.NS).Run() // the name only
	}
}

// killAll SIGKILLs every process in namespace ns.
func killAll(ns string) {
	out, _ := exec.Command("ip", "netns", "pids", ns).Output()
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// sweep removes namespaces of labs whose test process is gone.
func sweep() {
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, namePrefix) {
			continue
		}
		pidStr, _, ok := strings.Cut(strings.TrimPrefix(name, namePrefix), "-")
		pid, err := strconv.Atoi(pidStr)
		if !ok || err != nil || pid == os.Getpid() {
			continue
		}
		if syscall.Kill(pid, 0) == nil {
			continue // its test is still running
		}
		if !aliasNS(name) {
			killAll(name)
		}
		exec.Command("ip", "netns", "del", name).Run()
	}
	// AddRoot's links in the root namespace: ovtPID-Kr.
	links, _ := os.ReadDir("/sys/class/net")
	for _, e := range links {
		name := e.Name()
		pidStr, _, ok := strings.Cut(strings.TrimPrefix(name, namePrefix), "-")
		pid, err := strconv.Atoi(pidStr)
		if !strings.HasPrefix(name, namePrefix) || !ok || err != nil || pid == os.Getpid() || syscall.Kill(pid, 0) == nil {
			continue
		}
		exec.Command("ip", "link", "del", name).Run()
	}
}

// Exec runs a command in the host's namespace and returns its combined
// output.
func (h *Host) Exec(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Ping sends count pings to addr from the host and fails unless all come
// back.
func (h *Host) Ping(addr netip.Addr, count int) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(count+5)*time.Second)
	defer cancel()
	out, err := h.Exec(ctx, "ping", "-c", strconv.Itoa(count), "-i", "0.2", "-W", "1", addr.String())
	if err != nil {
		return fmt.Errorf("ping %v from %s: %v\n%s", addr, h.NS, err, out)
	}
	return nil
}

// Do runs fn on an OS thread that is in the host's network namespace:
// sockets fn creates belong to that namespace for their whole life.
func (h *Host) Do(fn func() error) error {
	var err error
	var wg sync.WaitGroup
	wg.Go(func() {
		runtime.LockOSThread()
		// The thread is not unlocked: if restoring the namespace failed
		// the thread must die with the goroutine, not be reused.
		orig, e := netns.Get()
		if e != nil {
			err = e
			return
		}
		defer orig.Close()
		target, e := netns.GetFromName(h.NS)
		if e != nil {
			err = fmt.Errorf("namespace %s: %w", h.NS, e)
			return
		}
		defer target.Close()
		if e := netns.Set(target); e != nil {
			err = e
			return
		}
		err = fn()
		if e := netns.Set(orig); e == nil {
			runtime.UnlockOSThread()
		}
	})
	wg.Wait()
	return err
}

// Loss drops pct percent of the packets leaving the host's eth0, at random
// (nftables numgen); 0 removes the rule. nftables rather than tc netem,
// because kernels built without CONFIG_NET_SCH_NETEM (this project's CI
// machines among them) have no netem.
func (h *Host) Loss(pct int) error {
	ctx := context.Background()
	h.Exec(ctx, "nft", "delete", "table", "inet", "ovtloss")
	if pct <= 0 {
		return nil
	}
	rules := fmt.Sprintf(`table inet ovtloss {
	chain out {
		type filter hook output priority 0; policy accept;
		oifname "eth0" numgen random mod 100 < %d drop
	}
}`, pct)
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", h.NS, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft loss rule: %v: %s", err, out)
	}
	return nil
}

// Block drops every packet from the host to addr and from addr to the host
// (nftables in the host's namespace), as if the underlay could not carry
// them.
func (h *Host) Block(addr netip.Addr) error {
	rules := fmt.Sprintf(`table inet ovtblock {
	chain out {
		type filter hook output priority 0; policy accept;
		ip daddr %[1]s drop
	}
	chain in {
		type filter hook input priority 0; policy accept;
		ip saddr %[1]s drop
	}
}`, addr)
	cmd := exec.Command("ip", "netns", "exec", h.NS, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft block rule: %v: %s", err, out)
	}
	return nil
}

// Partition cuts the switch into groups of hosts: a host reaches the hosts
// of its own group and no other (nftables on the bridge, in the switch
// namespace). Hosts in no group are cut off from all. Heal removes the
// cut; a second Partition replaces the first.
func (l *Lab) Partition(groups ...[]*Host) error {
	var b strings.Builder
	b.WriteString("table bridge ovtpart {\n\tchain cut {\n\t\ttype filter hook forward priority 0; policy drop;\n")
	for _, g := range groups {
		ports := make([]string, len(g))
		for i, h := range g {
			ports[i] = strconv.Quote(h.port)
		}
		set := "{ " + strings.Join(ports, ", ") + " }"
		fmt.Fprintf(&b, "\t\tiifname %s oifname %s accept\n", set, set)
	}
	b.WriteString("\t}\n}\n")
	l.Heal()
	cmd := exec.Command("ip", "netns", "exec", l.Switch, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(b.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft partition: %v: %s", err, out)
	}
	return nil
}

// Heal undoes Partition.
func (l *Lab) Heal() {
	exec.Command("ip", "netns", "exec", l.Switch, "nft", "delete", "table", "bridge", "ovtpart").Run()
}

// Dir is a scratch directory that lives as long as the lab.
func (l *Lab) Dir() string { return l.dir }

// Eventually calls fn until it returns nil or timeout passes, then fails the
// test with fn's last error.
func Eventually(t testing.TB, timeout time.Duration, what string, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %v", what, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Binaries locates overlayd and overlayctl.
type Binaries struct{ Overlayd, Overlayctl string }

// Build compiles overlayd and overlayctl from this module into dir, with the
// race detector when OVERLAYD_RACE=1.
func Build(dir string) (Binaries, error) {
	root, err := moduleRoot()
	if err != nil {
		return Binaries{}, err
	}
	args := []string{"build", "-o", dir + string(os.PathSeparator)}
	if os.Getenv("OVERLAYD_RACE") == "1" {
		args = append(args, "-race")
	}
	cmd := exec.Command("go", append(args, "./cmd/overlayd", "./cmd/overlayctl")...)
	cmd.Dir = root
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return Binaries{}, fmt.Errorf("go build: %v\n%s", err, stderr.String())
	}
	return Binaries{Overlayd: filepath.Join(dir, "overlayd"), Overlayctl: filepath.Join(dir, "overlayctl")}, nil
}

func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside the overlayd module")
	}
	return filepath.Dir(mod), nil
}
