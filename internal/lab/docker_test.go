package lab_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/overlayd/overlayd/internal/lab"
)

// TestDocker runs overlayd with --docker-plugin beside the machine's
// Docker engine (in the root namespace, joined to the lab's switch) and a
// second overlayd in a lab host. It checks the seed's session: the
// weavemesh drivers in docker info, the weave network in docker network
// ls, containers started with --net=weave getting ethwe0 (MTU 1410, an
// address of the range with its mask) and reaching each other by address
// and by name; traffic between a Docker container and a plain namespace
// on the other host (ping, TCP with its content checked, names both
// ways); attach of a Docker container by name and by PID; a stopped
// container's name and address released; a subnet network; plugin errors
// in Docker's JSON; a kill -9 of overlayd recovered on restart; and the
// FORWARD rules removed on stop, no other rule touched.
func TestDocker(t *testing.T) {
	lab.RequireDocker(t)
	start := time.Now()
	step := func(what string) { t.Logf("%6.1fs %s", time.Since(start).Seconds(), what) }
	l := lab.New(t, bin, 1)
	h1 := l.Host(1)
	root := l.AddRoot()
	image := l.BusyboxImage()
	if out, err := l.TryDocker("network", "inspect", "weave", "--format", "{{.Driver}} {{len .Containers}}"); err == nil {
		// A weave network without containers, of our driver, is a
		// leftover of a killed run: anything else is not ours to touch.
		if out != "weavemesh 0" {
			t.Fatalf("a Docker network named weave exists (%s): this test creates its own", out)
		}
		l.Docker("network", "rm", "weave")
	}

	const rng = "10.47.16.0/24"
	iface := "ovtd" + strconv.Itoa(root.Index)
	// The machine's own underlay may be smaller than 1500; the path to
	// the lab host is 1500, so the overlay's MTU is set for it.
	rootArgs := []string{"--range", rng, "--docker-plugin", "--iface", iface, "--port", "16783", "--mtu", "1456",
		"--release-grace", "1s"}
	before := iptables(t)
	// Containers and networks go while the plugin still answers:
	// Docker waits long for a plugin that is gone. Cleanups run last
	// first, so this one follows each start of the daemon.
	var containers, networks []string
	removeAll := func() {
		if len(containers) > 0 {
			exec.Command("docker", append([]string{"rm", "-f"}, containers...)...).Run()
		}
		for _, n := range append(networks, "weave") {
			exec.Command("docker", "network", "rm", n).Run()
		}
	}
	dr := root.Start(rootArgs...)
	t.Cleanup(removeAll)
	d1 := h1.Start("--range", rng, "--peer", root.Addr.String()+":16783")
	waitConnected(t, d1, 1, 10*time.Second)

	step("started")
	// The seed's first look: the drivers and the network.
	lab.Eventually(t, 10*time.Second, "the weave network", func() error {
		out, err := l.TryDocker("network", "ls", "--format", "{{.Name}}  {{.Driver}}  {{.Scope}}")
		if err != nil || !strings.Contains(out, "weave  weavemesh  local") {
			return fmt.Errorf("docker network ls: %v\n%s", err, out)
		}
		return nil
	})
	if out := l.Docker("info", "--format", "{{.Plugins.Network}}"); !strings.Contains(out, "weavemesh") {
		t.Errorf("docker info lists network plugins %s", out)
	}
	if st := dr.MustCtl("status"); !strings.Contains(st, "        Service: plugin\n     DriverName: weavemesh\n") {
		t.Errorf("status lacks the plugin:\n%s", st)
	}
	during := iptables(t)
	chain := "OVERLAYD-" + iface
	for _, want := range []string{"-A FORWARD -j " + chain, "-A " + chain + " -i " + iface + " -o vethwe+ -j ACCEPT",
		"-A " + chain + " -i vethwe+ -o " + iface + " -j ACCEPT", "-A " + chain + " -i vethwe+ -o vethwe+ -j ACCEPT"} {
		if !strings.Contains(during, want+"\n") {
			t.Errorf("iptables lacks %q:\n%s", want, during)
		}
	}

	step("network seen")
	// Two containers on the weave network, started with dns-args.
	dnsArgs := strings.Fields(dr.MustCtl("dns-args"))
	web1, web2 := l.Name("web1"), l.Name("web2")
	run := func(name string, args ...string) string {
		containers = append(containers, name)
		a := append([]string{"--name", name}, args...)
		return l.RunContainer(append(a, image, "sleep", "600")...)
	}
	id1 := run(web1, append([]string{"--net=weave"}, dnsArgs...)...)
	id2 := run(web2, append([]string{"--net=weave"}, dnsArgs...)...)
	a1, a2 := ethwe0(t, l, web1), ethwe0(t, l, web2)
	for _, a := range []netip.Prefix{a1, a2} {
		if a.Bits() != 24 || !netip.MustParsePrefix(rng).Contains(a.Addr()) {
			t.Errorf("ethwe0 has %v: want an address of %s with its mask", a, rng)
		}
	}
	if ip := l.Docker("inspect", "--format", "{{.NetworkSettings.Networks.weave.IPAddress}}", web1); ip != a1.Addr().String() {
		t.Errorf("Docker says web1 has %s, ethwe0 has %v", ip, a1)
	}
	// Docker's gateway bridge carries the rest: a default route not
	// through ethwe0.
	if out := l.Docker("exec", web1, "ip", "route"); !strings.Contains(out, "default via") || strings.Contains(out, "default via "+a1.Addr().String()) {
		t.Errorf("routes in web1:\n%s", out)
	}
	pingIn(t, l, web1, a2.Addr().String(), a2.Addr())
	pingIn(t, l, web1, web2, a2.Addr())                // Docker's own DNS knows the containers of its network
	pingIn(t, l, web2, web1+".weave.local", a1.Addr()) // forwarded to overlayd
	// docker run --ip claims an address; one in use is refused.
	fixed := l.Name("fixed")
	run(fixed, "--net=weave", "--ip", "10.47.16.100")
	if fa := ethwe0(t, l, fixed); fa != netip.MustParsePrefix("10.47.16.100/24") {
		t.Errorf("docker run --ip 10.47.16.100 gave %v", fa)
	}
	if out, err := l.TryDocker("run", "-d", "--name", l.Name("dup"), "--net=weave", "--ip", "10.47.16.100", image, "sleep", "600"); err == nil {
		t.Errorf("a second container got the address in use: %s", out)
	} else if !strings.Contains(err.Error(), "IpamDriver.RequestAddress: address 10.47.16.100/24 is already owned by docker:") {
		t.Errorf("a second --ip 10.47.16.100: %v", err)
	}
	containers = append(containers, l.Name("dup")) // created, never started

	step("two containers")
	// The other host: a plain namespace there, and the Docker
	// container here, by address and name both ways, and TCP.
	far := l.AddContainer()
	fa := netip.MustParsePrefix(strings.TrimSpace(d1.MustCtl("attach", far.NS, "--name", "far")))
	pingIn(t, l, web1, "far", fa.Addr())
	waitPing(t, far, a1.Addr(), 10*time.Second)
	lab.Eventually(t, 5*time.Second, "web1's name on h1", func() error {
		out, _, code := d1.Ctl("dns-lookup", web1)
		if code != 0 || strings.TrimSpace(out) != a1.Addr().String() {
			return fmt.Errorf("dns-lookup %s on h1: exit %d %q", web1, code, out)
		}
		return nil
	})
	if out, err := far.Exec(t.Context(), "ping", "-c", "1", "-W", "2", web1); err != nil || !strings.Contains(out, "("+a1.Addr().String()+")") {
		t.Errorf("ping %s by name from a namespace on h1: %v\n%s", web1, err, out)
	}
	w1 := l.Adopt(pid(t, l, web1))
	if out, err := w1.Exec(t.Context(), "ethtool", "-k", "ethwe0"); err != nil || !strings.Contains(out, "\ntx-checksumming: off\n") {
		t.Errorf("TX checksum offload of ethwe0 in web1: %v\n%s", err, out)
	}
	for _, pair := range [][2]*lab.Host{{far, w1}, {w1, far}} {
		to := a1.Addr()
		if pair[1] == far {
			to = fa.Addr()
		}
		took, err := lab.TransferTCP(pair[0], pair[1], to, 7100, 1<<20, 20*time.Second)
		if err != nil {
			t.Fatalf("TCP %s -> %s: %v", pair[0].NS, pair[1].NS, err)
		}
		t.Logf("1 MiB %s -> %s in %v, content checked", pair[0].NS, pair[1].NS, took.Round(time.Millisecond))
	}

	step("cross-host")
	// overlayctl attach of Docker containers on Docker's own bridge:
	// by name (registered under its name) and by PID.
	plain, bypid := l.Name("plain"), l.Name("bypid")
	plainID := run(plain)
	run(bypid)
	pa := netip.MustParsePrefix(strings.TrimSpace(dr.MustCtl("attach", plain)))
	if again := strings.TrimSpace(dr.MustCtl("attach", plainID[:12])); again != pa.String() {
		t.Errorf("attaching %s again by ID gave %s, first %v", plain, again, pa)
	}
	bpid := pid(t, l, bypid)
	ba := netip.MustParsePrefix(strings.TrimSpace(dr.MustCtl("attach", strconv.Itoa(bpid), "10.47.16.200/24")))
	if ba.Addr() != netip.MustParseAddr("10.47.16.200") {
		t.Errorf("attach by PID with a CIDR gave %v", ba)
	}
	pingIn(t, l, web1, plain, pa.Addr())
	pingIn(t, l, plain, ba.Addr().String(), ba.Addr())
	if mtu := l.Docker("exec", plain, "cat", "/sys/class/net/ethwe0/mtu"); mtu != "1410" {
		t.Errorf("ethwe0 of an attached container has MTU %s", mtu)
	}
	_, errOut, code := dr.Ctl("attach", l.Name("nosuch"))
	if code == 0 || !strings.Contains(errOut, "is not a network namespace") {
		t.Errorf("attach of a missing container: exit %d %q", code, errOut)
	}

	step("attach")
	// ps: weave:expose, then each container: short ID, MAC, address.
	ps := dr.MustCtl("ps")
	mac1 := l.Docker("exec", web1, "cat", "/sys/class/net/ethwe0/address")
	for _, want := range []string{id1[:12] + " " + mac1 + " " + a1.String(), id2[:12] + " ", plainID[:12] + " ",
		"pid:" + strconv.Itoa(bpid) + " "} {
		if !strings.Contains(ps, want) {
			t.Errorf("ps lacks %q:\n%s", want, ps)
		}
	}
	if !strings.HasPrefix(ps, "weave:expose ") {
		t.Errorf("ps:\n%s", ps)
	}

	step("ps")
	// Another network of the range, and errors Docker shows as they are.
	net2 := l.Name("net2")
	l.Docker("network", "create", "-d", "weavemesh", "--ipam-driver", "weavemesh", "--subnet", "10.47.16.64/26", net2)
	networks = append(networks, net2)
	sub := l.Name("sub")
	run(sub, "--net="+net2)
	if sa := ethwe0(t, l, sub); !netip.MustParsePrefix("10.47.16.64/26").Contains(sa.Addr()) || sa.Bits() != 26 {
		t.Errorf("a container of %s has %v", net2, sa)
	}
	pingIn(t, l, sub, a1.Addr().String(), a1.Addr()) // the range's route through ethwe0
	// With Docker's own IPAM: the address Docker chose is claimed in
	// overlayd's (so no other host gets it) and given back with the
	// container.
	net3 := l.Name("net3")
	l.Docker("network", "create", "-d", "weavemesh", "--subnet", "10.47.16.128/26", net3)
	networks = append(networks, net3)
	d3 := l.Name("dockeripam")
	run(d3, "--net="+net3)
	da := ethwe0(t, l, d3)
	if !netip.MustParsePrefix("10.47.16.128/26").Contains(da.Addr()) || da.Bits() != 26 {
		t.Errorf("a container of %s (Docker's IPAM) has %v", net3, da)
	}
	if !held(t, dr, da.Addr()) {
		t.Errorf("%v, from Docker's IPAM, is not claimed in overlayd's", da)
	}
	pingIn(t, l, d3, a1.Addr().String(), a1.Addr())
	waitPing(t, far, da.Addr(), 10*time.Second) // from the other host
	l.Docker("rm", "-f", d3)
	if held(t, dr, da.Addr()) {
		t.Errorf("%v is still claimed after its container went", da)
	}
	dr.MustCtl("claim", "other", "10.47.16.140/24")
	taken := l.Name("taken")
	containers = append(containers, taken)
	if out, err := l.TryDocker("run", "-d", "--name", taken, "--net="+net3, "--ip", "10.47.16.140", image, "sleep", "600"); err == nil {
		t.Errorf("Docker's IPAM gave an address overlayd's holds: %s", out)
	} else if !strings.Contains(err.Error(), "claiming 10.47.16.140/26, which Docker's IPAM chose: address 10.47.16.140/26 is already owned by other") {
		t.Errorf("an address of Docker's IPAM held in overlayd's: %v", err)
	}
	if _, err := l.TryDocker("network", "create", "-d", "weavemesh", "--ipam-driver", "weavemesh", "--subnet", "10.99.0.0/24", l.Name("net4")); err == nil ||
		!strings.Contains(err.Error(), "subnet 10.99.0.0/24 is not inside overlayd's range "+rng) {
		t.Errorf("a subnet outside the range: %v", err)
	}
	status, body := pluginCall(t, "/NetworkDriver.Join", "{")
	if status != http.StatusBadRequest || !regexp.MustCompile(`^\{"Err":"the request is not valid JSON.*"\}\n$`).MatchString(body) {
		t.Errorf("a malformed Join: %d %s", status, body)
	}
	status, body = pluginCall(t, "/NetworkDriver.Join", `{"NetworkID":"n","EndpointID":"nosuch","SandboxKey":"/x"}`)
	if status != http.StatusNotFound || !strings.Contains(body, `"Err":"endpoint nosuch was never created here"`) {
		t.Errorf("a Join of an unknown endpoint: %d %s", status, body)
	}

	step("networks and errors")
	// A stopped container loses its name (everywhere) and its address.
	l.Docker("stop", "-t", "1", web2)
	for _, d := range []*lab.Daemon{dr, d1} {
		lab.Eventually(t, 5*time.Second, "web2's name gone", func() error {
			if out, _, code := d.Ctl("dns-lookup", web2); code == 0 {
				return fmt.Errorf("still %s", out)
			}
			return nil
		})
	}
	if held(t, dr, a2.Addr()) {
		t.Errorf("the stopped container's %v is still allocated", a2)
	}
	step("stopped one")
	// An attached container that goes away is released after the grace.
	l.Docker("rm", "-f", plain)
	lab.Eventually(t, 10*time.Second, "the removed container's address released", func() error {
		if held(t, dr, pa.Addr()) {
			return fmt.Errorf("%v still allocated", pa)
		}
		return nil
	})

	step("released")
	// kill -9 while containers run: the restarted overlayd knows its
	// endpoints, traffic flows, and Docker can stop the container.
	// A container stopped meanwhile: Docker cannot tell the plugin, so
	// the restart finds out and frees its endpoint, address and name.
	dr.Kill()
	stopped := time.Now()
	if out, err := l.TryDocker("stop", "-t", "1", fixed); err != nil {
		t.Logf("docker stop with the plugin down: %v (%s)", err, out)
	}
	t.Logf("docker stop with the plugin down took %v", time.Since(stopped).Round(100*time.Millisecond))
	dr = root.Start(rootArgs...)
	t.Cleanup(removeAll)
	// h1 backed off while Docker kept trying the dead plugin (over 45 s,
	// so its next try may be 15 s away): connect resets the back-off.
	d1.MustCtl("connect", root.Addr.String()+":16783")
	lab.Eventually(t, 10*time.Second, "the endpoint of the container stopped meanwhile forgotten", func() error {
		if held(t, dr, netip.MustParseAddr("10.47.16.100")) {
			return fmt.Errorf("10.47.16.100 still allocated")
		}
		if out, _, code := dr.Ctl("dns-lookup", fixed); code == 0 {
			return fmt.Errorf("its name is still there: %s", out)
		}
		return nil
	})
	waitConnected(t, dr, 1, 10*time.Second)
	waitPing(t, far, a1.Addr(), 10*time.Second)
	if ps := dr.MustCtl("ps"); !strings.Contains(ps, id1[:12]+" "+mac1+" "+a1.String()) {
		t.Errorf("ps after a restart:\n%s", ps)
	}
	if got := strings.Count(iptables(t), "-A FORWARD -j "+chain+"\n"); got != 1 {
		t.Errorf("after a restart FORWARD jumps to %s %d times", chain, got)
	}
	l.Docker("stop", "-t", "1", web1)
	if held(t, dr, a1.Addr()) {
		t.Errorf("web1's %v is still allocated after docker stop", a1)
	}
	if out, _ := exec.Command("ip", "-o", "link").Output(); bytes.Contains(out, []byte("vethwg")) {
		t.Errorf("a container end is left in the root namespace:\n%s", out)
	}

	step("restart")
	// Stopping overlayd takes its rules out and leaves every other one.
	removeAll()
	if out := l.Docker("network", "ls", "--filter", "driver=weavemesh", "--format", "{{.Name}}"); out != "" {
		t.Errorf("networks left: %s", out)
	}
	if code, _, err := dr.Stop(10 * time.Second); err != nil || code != 0 {
		t.Fatalf("stopping overlayd: exit %d %v", code, err)
	}
	step("stopped")
	after := iptables(t)
	if strings.Contains(after, "OVERLAYD") {
		t.Errorf("rules left after stop:\n%s", after)
	}
	for _, line := range strings.Split(before, "\n") {
		if !strings.Contains(after+"\n", line+"\n") && !strings.Contains(line, "DOCKER") {
			t.Errorf("rule %q was there before overlayd and is gone", line)
		}
	}
}

// ethwe0 is a Docker container's overlay address.
func ethwe0(t *testing.T, l *lab.Lab, name string) netip.Prefix {
	t.Helper()
	out := l.Docker("exec", name, "ip", "-4", "-o", "addr", "show", "ethwe0")
	m := regexp.MustCompile(`inet (\S+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("ethwe0 in %s: %s", name, out)
	}
	if mtu := l.Docker("exec", name, "cat", "/sys/class/net/ethwe0/mtu"); mtu != "1410" {
		t.Errorf("ethwe0 in %s has MTU %s, want 1410", name, mtu)
	}
	return netip.MustParsePrefix(m[1])
}

// pingIn pings target (an address or a name) from a Docker container
// until it answers from want.
func pingIn(t *testing.T, l *lab.Lab, container, target string, want netip.Addr) {
	t.Helper()
	lab.Eventually(t, 10*time.Second, "ping "+target+" in "+container, func() error {
		out, err := l.TryDocker("exec", container, "ping", "-c", "1", "-W", "1", target)
		if err != nil || !strings.Contains(out, "bytes from "+want.String()) {
			return fmt.Errorf("%v %s", err, out)
		}
		return nil
	})
}

func pid(t *testing.T, l *lab.Lab, container string) int {
	t.Helper()
	n, err := strconv.Atoi(l.Docker("inspect", "--format", "{{.State.Pid}}", container))
	if err != nil || n == 0 {
		t.Fatalf("PID of %s: %v", container, err)
	}
	return n
}

// held reports whether an address is allocated on the daemon's host.
func held(t *testing.T, d *lab.Daemon, a netip.Addr) bool {
	t.Helper()
	for _, o := range mustStatus(t, d).IPAM.Owned {
		if o.Address.Addr() == a {
			return true
		}
	}
	return false
}

func iptables(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("iptables", "-S").Output()
	if err != nil {
		t.Fatalf("iptables -S: %v", err)
	}
	return string(out)
}

// pluginCall POSTs body to the plugin's socket.
func pluginCall(t *testing.T, path, body string) (int, string) {
	t.Helper()
	c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", "/run/docker/plugins/weavemesh.sock")
	}}}
	resp, err := c.Post("http://plugin"+path, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	var v map[string]any
	if err := json.Unmarshal(b.Bytes(), &v); err != nil {
		t.Errorf("POST %s answered %q: not JSON", path, b.String())
	}
	return resp.StatusCode, b.String()
}
