package dockerplugin

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/ipv4"
)

var (
	testRange = netip.MustParsePrefix("10.47.16.0/24")
	ctx       = context.Background()
)

// fakeIPAM is an allocator of one host: the lowest free address of the
// subnet, claims refused when another ID holds the address.
type fakeIPAM struct {
	mu      sync.Mutex
	held    map[netip.Addr]string
	block   chan struct{} // if set, Claim waits for it or the context
	calls   []string
	failAll error
}

func newIPAM() *fakeIPAM { return &fakeIPAM{held: map[netip.Addr]string{}} }

func (f *fakeIPAM) Alloc(ctx context.Context, id string, subnet netip.Prefix) (netip.Prefix, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "alloc "+id)
	for a := subnet.Masked().Addr().Next(); subnet.Contains(a) && a != ipv4.Last(subnet); a = a.Next() {
		if _, ok := f.held[a]; !ok {
			f.held[a] = id
			return netip.PrefixFrom(a, subnet.Bits()), nil
		}
	}
	return netip.Prefix{}, api.BadRequest("no free address in %v", subnet)
}

func (f *fakeIPAM) Claim(ctx context.Context, id string, cidr netip.Prefix) (netip.Prefix, error) {
	var gaveUp error
	if f.block != nil {
		select {
		case <-f.block:
		case <-ctx.Done():
			// The caller gave up; the allocator completes the
			// claim all the same, as overlayd's does.
			gaveUp = ctx.Err()
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "claim "+id+" "+cidr.String())
	if f.failAll != nil {
		return netip.Prefix{}, f.failAll
	}
	if other, ok := f.held[cidr.Addr()]; ok && other != id {
		return netip.Prefix{}, api.BadRequest("address %v is already owned by %s", cidr, other)
	}
	f.held[cidr.Addr()] = id
	return cidr, gaveUp
}

func (f *fakeIPAM) Release(ctx context.Context, id string, addr netip.Addr) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "release "+id)
	for a, h := range f.held {
		if h == id && (!addr.IsValid() || a == addr) {
			delete(f.held, a)
		}
	}
	return nil
}

func (f *fakeIPAM) Holder(ctx context.Context, addr netip.Addr) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	id, ok := f.held[addr]
	return id, ok
}

func (f *fakeIPAM) holder(s string) string {
	id, _ := f.Holder(ctx, netip.MustParseAddr(s))
	return id
}

type fakeNames struct {
	mu    sync.Mutex
	names map[string][]string // container → names
}

func (n *fakeNames) Register(ctx context.Context, name string, addr netip.Addr, container string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.names[container] = append(n.names[container], name+" "+addr.String())
	return nil
}

func (n *fakeNames) Forget(ctx context.Context, container string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.names, container)
	return nil
}

type fakeLinks struct {
	mu      sync.Mutex
	pairs   map[string]netip.Prefix // host end → address routed to it
	kept    map[string]netip.Prefix
	netns   map[string]bool
	failErr error
}

func (l *fakeLinks) Pair(host, inner string, mtu int, mac net.HardwareAddr, addr netip.Prefix) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.failErr != nil {
		return "", l.failErr
	}
	if !strings.HasPrefix(host, "vethwe") || inner != "vethwg"+host[6:] || mtu != 1410 {
		return "", fmt.Errorf("pair %s %s mtu %d", host, inner, mtu)
	}
	l.pairs[host] = addr
	if mac != nil {
		return mac.String(), nil
	}
	return "02:00:00:00:00:01", nil
}

func (l *fakeLinks) Keep(host string, addr netip.Prefix) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.kept[host] = addr
}

func (l *fakeLinks) Remove(host string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.pairs, host)
	delete(l.kept, host)
	return nil
}

func (l *fakeLinks) Exists(host string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, ok := l.pairs[host]
	return ok
}

func (l *fakeLinks) IsNetns(path string) bool { return l.netns[path] }

type fakeEngine struct {
	networks []EngineNetwork
	running  []Container
	created  []string
}

func (e *fakeEngine) Networks(ctx context.Context, driver string) ([]EngineNetwork, error) {
	return e.networks, nil
}

func (e *fakeEngine) Running(ctx context.Context) ([]Container, error) { return e.running, nil }

func (e *fakeEngine) CreateNetwork(ctx context.Context, name, driver string, subnet netip.Prefix) (string, error) {
	e.created = append(e.created, name+" "+driver+" "+subnet.String())
	return "", nil
}

type rig struct {
	d      *Driver
	ipam   *fakeIPAM
	names  *fakeNames
	links  *fakeLinks
	engine *fakeEngine
	dir    string
}

func newRig(t *testing.T) *rig {
	t.Helper()
	r := &rig{ipam: newIPAM(), names: &fakeNames{names: map[string][]string{}},
		links:  &fakeLinks{pairs: map[string]netip.Prefix{}, kept: map[string]netip.Prefix{}, netns: map[string]bool{}},
		engine: &fakeEngine{}, dir: t.TempDir()}
	r.restart(t)
	return r
}

// restart makes a new Driver on the same state directory and fakes.
func (r *rig) restart(t *testing.T) {
	t.Helper()
	d, err := NewDriver(DriverConfig{Name: "weavemesh", Network: "weave", Range: testRange, DefaultSubnet: testRange, MTU: 1410,
		Domain: "weave.local.", StateDir: r.dir, Log: zap.NewNop()}, r.ipam, r.names, r.links, r.engine)
	if err != nil {
		t.Fatal(err)
	}
	r.d = d
}

// network creates a network on pool with our IPAM (space weavelocal) or
// Docker's (any other).
func (r *rig) network(t *testing.T, id, pool, space string) {
	t.Helper()
	if err := r.d.CreateNetwork(ctx, CreateNetworkRequest{NetworkID: id, IPv4Data: []IPAMData{{AddressSpace: space, Pool: pool}}}); err != nil {
		t.Fatal(err)
	}
}

func (r *rig) endpoint(t *testing.T, network, id, addr string) CreateEndpointResponse {
	t.Helper()
	resp, err := r.d.CreateEndpoint(ctx, CreateEndpointRequest{NetworkID: network, EndpointID: id, Interface: &EndpointInterface{Address: addr}})
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// code is the status err is answered with; 200 for none.
func code(err error) int {
	if err == nil {
		return 200
	}
	return status(err)
}

// TestLifecycle: a container's life on a network of our IPAM: pool,
// address, endpoint, join, leave, delete, release; the state survives a
// restart.
func TestLifecycle(t *testing.T) {
	r := newRig(t)
	pool, err := r.d.RequestPool(ctx, RequestPoolRequest{AddressSpace: LocalSpace})
	if err != nil || pool.Pool != "10.47.16.0/24" || pool.PoolID != "weavemesh-10.47.16.0/24-" || pool.Data["com.docker.network.gateway"] != "10.47.16.0/24" {
		t.Fatalf("RequestPool: %+v %v", pool, err)
	}
	if gw, err := r.d.RequestAddress(ctx, RequestAddressRequest{PoolID: pool.PoolID, Options: map[string]string{RequestAddressType: GatewayRequest}}); err != nil || gw.Address != "10.47.16.0/24" {
		t.Fatalf("the gateway: %+v %v", gw, err)
	}
	r.network(t, "n1", pool.Pool, LocalSpace)
	a, err := r.d.RequestAddress(ctx, RequestAddressRequest{PoolID: pool.PoolID})
	if err != nil || a.Address != "10.47.16.1/24" || !strings.HasPrefix(r.ipam.holder("10.47.16.1"), DockerIPAMPrefix) {
		t.Fatalf("RequestAddress: %+v %v, held by %q", a, err, r.ipam.holder("10.47.16.1"))
	}
	resp := r.endpoint(t, "n1", "e1", a.Address)
	host, inner := pairNames("e1")
	if resp.Interface == nil || resp.Interface.MacAddress != "02:00:00:00:00:01" || r.links.pairs[host] != netip.MustParsePrefix(a.Address) {
		t.Fatalf("CreateEndpoint: %+v, pairs %v", resp.Interface, r.links.pairs)
	}
	// Docker retries: the same endpoint again is the same endpoint.
	if again := r.endpoint(t, "n1", "e1", a.Address); again.Interface.MacAddress != resp.Interface.MacAddress {
		t.Errorf("CreateEndpoint again: %+v", again.Interface)
	}
	if _, err := r.d.CreateEndpoint(ctx, CreateEndpointRequest{NetworkID: "n1", EndpointID: "e1", Interface: &EndpointInterface{Address: "10.47.16.9/24"}}); code(err) != 400 {
		t.Errorf("CreateEndpoint again with another address: %v", err)
	}
	j, err := r.d.Join(ctx, JoinRequest{NetworkID: "n1", EndpointID: "e1", SandboxKey: "/var/run/docker/netns/x"})
	if err != nil || j.InterfaceName.SrcName != inner || j.InterfaceName.DstPrefix != "ethwe" || len(j.StaticRoutes) != 0 {
		t.Fatalf("Join: %+v %v", j, err)
	}
	if _, err := r.d.Join(ctx, JoinRequest{NetworkID: "n1", EndpointID: "e9"}); code(err) != 404 {
		t.Errorf("Join of an unknown endpoint: %v", err)
	}
	if info, err := r.d.EndpointInfo(ctx, "n1", "e1"); err != nil || info["hostIface"] != host {
		t.Errorf("EndpointInfo: %v %v", info, err)
	}
	if ps := r.d.Attachments(); len(ps) != 1 || ps[0].NetNS != "/var/run/docker/netns/x" || ps[0].Addresses[0].String() != a.Address {
		t.Errorf("Attachments: %+v", ps)
	}
	// A restart keeps the endpoint, and has overlayd keep its route.
	r.restart(t)
	if r.links.kept[host] != netip.MustParsePrefix(a.Address) || r.d.Status().Endpoints != 1 || r.d.Status().Networks != 1 {
		t.Fatalf("after a restart: kept %v, status %+v", r.links.kept, r.d.Status())
	}
	if err := r.d.Leave(ctx, "n1", "e1"); err != nil {
		t.Fatal(err)
	}
	if err := r.d.DeleteEndpoint(ctx, "n1", "e1"); err != nil || r.links.Exists(host) {
		t.Fatalf("DeleteEndpoint: %v, pairs %v", err, r.links.pairs)
	}
	if err := r.d.ReleaseAddress(ctx, pool.PoolID, "10.47.16.1"); err != nil || r.ipam.holder("10.47.16.1") != "" {
		t.Fatalf("ReleaseAddress: %v, held by %q", err, r.ipam.holder("10.47.16.1"))
	}
	if err := r.d.ReleaseAddress(ctx, pool.PoolID, "10.47.16.1"); err != nil {
		t.Errorf("ReleaseAddress of a free address: %v", err)
	}
	if err := r.d.DeleteNetwork(ctx, "n1"); err != nil || r.d.Status().Networks != 0 {
		t.Fatalf("DeleteNetwork: %v", err)
	}
	if err := r.d.DeleteNetwork(ctx, "n1"); err != nil {
		t.Errorf("DeleteNetwork again: %v", err)
	}
}

// TestRequests: what the driver refuses, and the sub-pools and subnets it
// accepts.
func TestRequests(t *testing.T) {
	r := newRig(t)
	r.ipam.held[netip.MustParseAddr("10.47.16.77")] = "weave:expose"
	for _, tc := range []struct {
		name string
		call func() error
		want int
	}{
		{"IPv6 pool", func() error { _, err := r.d.RequestPool(ctx, RequestPoolRequest{V6: true}); return err }, 400},
		{"a pool outside the range", func() error { _, err := r.d.RequestPool(ctx, RequestPoolRequest{Pool: "10.0.0.0/24"}); return err }, 400},
		{"a pool with host bits", func() error { _, err := r.d.RequestPool(ctx, RequestPoolRequest{Pool: "10.47.16.1/26"}); return err }, 400},
		{"a sub-pool outside the pool", func() error {
			_, err := r.d.RequestPool(ctx, RequestPoolRequest{Pool: "10.47.16.0/26", SubPool: "10.47.16.64/28"})
			return err
		}, 400},
		{"a pool of the range", func() error { _, err := r.d.RequestPool(ctx, RequestPoolRequest{Pool: "10.47.16.64/26"}); return err }, 200},
		{"a pool not ours", func() error { return r.d.ReleasePool(ctx, "other-10.0.0.0/8-") }, 404},
		{"an address outside the pool", func() error {
			_, err := r.d.RequestAddress(ctx, RequestAddressRequest{PoolID: "weavemesh-10.47.16.0/26-", Address: "10.47.16.100"})
			return err
		}, 400},
		{"the broadcast address", func() error {
			_, err := r.d.RequestAddress(ctx, RequestAddressRequest{PoolID: "weavemesh-10.47.16.0/26-", Address: "10.47.16.63"})
			return err
		}, 400},
		{"an address held by a host", func() error {
			_, err := r.d.RequestAddress(ctx, RequestAddressRequest{PoolID: "weavemesh-10.47.16.0/24-", Address: "10.47.16.77"})
			return err
		}, 400},
		{"releasing a host's address", func() error { return r.d.ReleaseAddress(ctx, "weavemesh-10.47.16.0/24-", "10.47.16.77") }, 400},
		{"an IPv6 network", func() error {
			return r.d.CreateNetwork(ctx, CreateNetworkRequest{NetworkID: "n", IPv4Data: []IPAMData{{Pool: "10.47.16.0/24"}}, IPv6Data: []IPAMData{{}}})
		}, 400},
		{"an endpoint without an address", func() error {
			_, err := r.d.CreateEndpoint(ctx, CreateEndpointRequest{NetworkID: "n", EndpointID: "e", Interface: &EndpointInterface{}})
			return err
		}, 400},
		{"an endpoint with a bad MAC", func() error {
			_, err := r.d.CreateEndpoint(ctx, CreateEndpointRequest{NetworkID: "n", EndpointID: "e",
				Interface: &EndpointInterface{Address: "10.47.16.5/24", MacAddress: "nonsense"}})
			return err
		}, 400},
	} {
		if got := code(tc.call()); got != tc.want {
			t.Errorf("%s: status %d, want %d", tc.name, got, tc.want)
		}
	}
	// docker run --ip: the address claimed under an ID of its own; a
	// second request for it is refused with IPAM's reason.
	a, err := r.d.RequestAddress(ctx, RequestAddressRequest{PoolID: "weavemesh-10.47.16.0/24-", Address: "10.47.16.100"})
	if err != nil || a.Address != "10.47.16.100/24" {
		t.Fatalf("--ip: %+v %v", a, err)
	}
	id := r.ipam.holder("10.47.16.100")
	_, err = r.d.RequestAddress(ctx, RequestAddressRequest{PoolID: "weavemesh-10.47.16.0/24-", Address: "10.47.16.100"})
	if code(err) != 400 || !strings.Contains(err.Error(), "already owned by "+id) {
		t.Errorf("a second --ip for the address: %v", err)
	}
	// A sub-pool: addresses come from it.
	a, err = r.d.RequestAddress(ctx, RequestAddressRequest{PoolID: "weavemesh-10.47.16.0/24-10.47.16.64/26"})
	if err != nil || a.Address != "10.47.16.65/24" {
		t.Errorf("from a sub-pool: %+v %v", a, err)
	}
}

// TestDockerIPAM: on a network whose addresses Docker's own IPAM picks,
// each endpoint's address is claimed in ours while it lives, under an ID
// derived from the endpoint; a claim refused or abandoned leaves nothing.
func TestDockerIPAM(t *testing.T) {
	r := newRig(t)
	if err := r.d.CreateNetwork(ctx, CreateNetworkRequest{NetworkID: "far", IPv4Data: []IPAMData{{AddressSpace: "LocalDefault", Pool: "10.0.0.0/24"}}}); code(err) != 400 {
		t.Errorf("Docker's IPAM outside the range: %v", err)
	}
	r.network(t, "n2", "10.47.16.128/26", "LocalDefault")
	r.endpoint(t, "n2", "e1", "10.47.16.130/26")
	if got := r.ipam.holder("10.47.16.130"); got != claimID("e1") {
		t.Fatalf("held by %q, want %q", got, claimID("e1"))
	}
	if j, err := r.d.Join(ctx, JoinRequest{NetworkID: "n2", EndpointID: "e1"}); err != nil ||
		len(j.StaticRoutes) != 1 || j.StaticRoutes[0].Destination != testRange.String() {
		t.Errorf("Join on a subnet: %+v %v (want a route for the range)", j, err)
	}
	// Held elsewhere: refused with IPAM's reason, nothing made.
	r.ipam.held[netip.MustParseAddr("10.47.16.140")] = "other"
	_, err := r.d.CreateEndpoint(ctx, CreateEndpointRequest{NetworkID: "n2", EndpointID: "e2", Interface: &EndpointInterface{Address: "10.47.16.140/26"}})
	if code(err) != 400 || !strings.Contains(err.Error(), "claiming 10.47.16.140/26, which Docker's IPAM chose: address 10.47.16.140/26 is already owned by other") {
		t.Errorf("a claim refused: %v", err)
	}
	host2, _ := pairNames("e2")
	if r.links.Exists(host2) || r.d.Status().Endpoints != 1 {
		t.Errorf("a refused endpoint was made")
	}
	// The veth cannot be made: the claim is undone.
	r.links.failErr = errors.New("netlink: file exists")
	_, err = r.d.CreateEndpoint(ctx, CreateEndpointRequest{NetworkID: "n2", EndpointID: "e3", Interface: &EndpointInterface{Address: "10.47.16.150/26"}})
	if code(err) != 500 || r.ipam.holder("10.47.16.150") != "" {
		t.Errorf("a failed veth: %v, claim held by %q", err, r.ipam.holder("10.47.16.150"))
	}
	r.links.failErr = nil
	// Docker gives up while the claim waits: the claim, when it comes,
	// is undone, and no endpoint is made.
	r.ipam.block = make(chan struct{})
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err = r.d.CreateEndpoint(cctx, CreateEndpointRequest{NetworkID: "n2", EndpointID: "e4", Interface: &EndpointInterface{Address: "10.47.16.160/26"}})
	if err == nil || r.ipam.holder("10.47.16.160") != "" || r.d.Status().Endpoints != 1 {
		t.Errorf("an abandoned claim: %v, held by %q", err, r.ipam.holder("10.47.16.160"))
	}
	r.ipam.block = nil
	// The endpoint goes, and its claim with it.
	if err := r.d.DeleteEndpoint(ctx, "n2", "e1"); err != nil || r.ipam.holder("10.47.16.130") != "" {
		t.Errorf("DeleteEndpoint: %v, held by %q", err, r.ipam.holder("10.47.16.130"))
	}
	// A claim whose endpoint was never recorded goes when Docker
	// deletes the endpoint.
	r.ipam.held[netip.MustParseAddr("10.47.16.170")] = claimID("e5")
	if err := r.d.DeleteEndpoint(ctx, "n2", "e5"); err != nil || r.ipam.holder("10.47.16.170") != "" {
		t.Errorf("DeleteEndpoint of an unrecorded one: %v", err)
	}
}

// TestReconcile: after overlayd was down, endpoints whose container went
// away are forgotten (their veth removed, their address released), the
// others kept; networks of our driver Docker has are recorded; running
// containers get their names, and those of stopped ones are removed.
func TestReconcile(t *testing.T) {
	r := newRig(t)
	r.network(t, "n1", "10.47.16.0/24", LocalSpace)
	r.network(t, "n2", "10.47.16.128/26", "LocalDefault")
	for _, e := range []struct{ net, id, addr string }{
		{"n1", "live", "10.47.16.1/24"}, {"n1", "vethgone", "10.47.16.2/24"}, {"n1", "left", "10.47.16.3/24"},
		{"n1", "nsgone", "10.47.16.4/24"}, {"n2", "claimed", "10.47.16.130/26"}, {"n1", "connected", "10.47.16.5/24"},
	} {
		if e.net == "n1" {
			r.ipam.held[netip.MustParsePrefix(e.addr).Addr()] = DockerIPAMPrefix + e.id
		}
		r.endpoint(t, e.net, e.id, e.addr)
		r.d.Join(ctx, JoinRequest{NetworkID: e.net, EndpointID: e.id, SandboxKey: "/ns/" + e.id})
		r.links.netns["/ns/"+e.id] = true
	}
	r.d.setContainer("live", "c-live")
	r.d.setContainer("vethgone", "c-stopped")
	r.names.names["c-stopped"] = []string{"old.weave.local. 10.47.16.2"}
	r.names.names["c-other"] = []string{"not.ours. 1.1.1.1"}
	// What happened while overlayd was down.
	for _, gone := range []string{"vethgone", "claimed"} {
		h, _ := pairNames(gone)
		delete(r.links.pairs, h)
	}
	r.d.Leave(ctx, "n1", "left")
	delete(r.links.netns, "/ns/nsgone")
	h, _ := pairNames("connected")
	delete(r.links.pairs, h) // its veth is gone, but Docker lists it: kept
	r.engine.networks = []EngineNetwork{
		{ID: "n1", Subnet: netip.MustParsePrefix("10.47.16.0/24"), Endpoints: []string{"live", "connected"}},
		{ID: "n3", Subnet: netip.MustParsePrefix("10.47.16.192/26"), ForeignIPAM: true},
	}
	r.engine.running = []Container{{ID: "c-live", Name: "web1", Hostname: "web1", Domainname: "weave.local",
		Endpoints: []ContainerEndpoint{{NetworkID: "n1", EndpointID: "live", Addr: netip.MustParseAddr("10.47.16.1"), Aliases: []string{"www.weave.local", "outside.example"}}}}}
	r.restart(t)
	if err := r.d.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	var kept []string
	for _, a := range r.d.Attachments() {
		kept = append(kept, a.ID)
	}
	slices.Sort(kept)
	if want := []string{"c-live", "connected"}; !slices.Equal(kept, want) {
		t.Errorf("endpoints kept: %v, want %v", kept, want)
	}
	for _, a := range []string{"10.47.16.2", "10.47.16.3", "10.47.16.4", "10.47.16.130"} {
		if h := r.ipam.holder(a); h != "" {
			t.Errorf("%s still held by %q", a, h)
		}
	}
	if h := r.ipam.holder("10.47.16.1"); h == "" {
		t.Error("the live endpoint's address was released")
	}
	if !r.d.ours("n3") || r.d.Status().Networks != 3 {
		t.Errorf("the network Docker has was not recorded: %+v", r.d.Status())
	}
	got := r.names.names["c-live"]
	slices.Sort(got)
	if want := []string{"web1.weave.local. 10.47.16.1", "www.weave.local. 10.47.16.1"}; !slices.Equal(got, want) {
		t.Errorf("names of the running container: %v, want %v", got, want)
	}
	if _, ok := r.names.names["c-stopped"]; ok {
		t.Error("the stopped container's names are still there")
	}
	if _, ok := r.names.names["c-other"]; !ok {
		t.Error("names that are not the driver's were removed")
	}
	// The state saved says the same after another restart.
	r.restart(t)
	if r.d.Status().Endpoints != 2 {
		t.Errorf("after another restart: %+v", r.d.Status())
	}
}

func TestEnsureNetwork(t *testing.T) {
	r := newRig(t)
	if err := r.d.EnsureNetwork(ctx); err != nil || len(r.engine.created) != 1 || r.engine.created[0] != "weave weavemesh 10.47.16.0/24" {
		t.Errorf("EnsureNetwork: %v, created %v", err, r.engine.created)
	}
}

func TestStateDamaged(t *testing.T) {
	r := newRig(t)
	os.WriteFile(filepath.Join(r.dir, StateFile), []byte("{not json"), 0o600)
	_, err := NewDriver(DriverConfig{Name: "weavemesh", Range: testRange, DefaultSubnet: testRange, MTU: 1410, StateDir: r.dir,
		Log: zap.NewNop()}, r.ipam, nil, r.links, r.engine)
	if err == nil || !strings.Contains(err.Error(), "is corrupt") {
		t.Errorf("a damaged state: %v", err)
	}
	if _, err := NewDriver(DriverConfig{Name: "weavemesh", MTU: 1410, StateDir: r.dir, Log: zap.NewNop()}, r.ipam, nil, r.links, r.engine); err == nil {
		t.Error("a config without a range was accepted")
	}
}
