package dockerplugin

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/atomicfile"
	"github.com/overlayd/overlayd/internal/containers"
	"github.com/overlayd/overlayd/internal/ipv4"
	"github.com/overlayd/overlayd/internal/pluginstate"
)

// StateFile keeps the driver's networks and endpoints across restarts.
const StateFile = "docker-plugin.json"

// Address spaces of the IPAM driver (Weave's names).
const (
	LocalSpace  = "weavelocal"
	GlobalSpace = "weaveglobal"
)

// DockerIPAMPrefix starts the IPAM IDs of addresses handed to Docker: its
// IPAM requests name no container, so each address has an ID of its own.
const DockerIPAMPrefix = "docker:"

// containerPrefix is what Docker renames our interface to, plus a number
// (ethwe0).
const containerPrefix = "ethwe"

// IPAM is what the driver needs of overlayd's allocator. An error that is
// the request's fault is an *api.RequestError: the driver answers it with
// 400 and its text.
type IPAM interface {
	Alloc(ctx context.Context, id string, subnet netip.Prefix) (netip.Prefix, error)
	Claim(ctx context.Context, id string, cidr netip.Prefix) (netip.Prefix, error)
	// Release frees id's address addr, or all of id's when addr is
	// invalid; an ID that holds nothing is not an error.
	Release(ctx context.Context, id string, addr netip.Addr) error
	// Holder is the ID holding addr here, if any.
	Holder(ctx context.Context, addr netip.Addr) (id string, ok bool)
}

// Names is what the driver needs of the name service.
type Names interface {
	// Register registers name (a full name in the domain) for addr of
	// a container.
	Register(ctx context.Context, name string, addr netip.Addr, container string) error
	// Forget removes a container's names registered here.
	Forget(ctx context.Context, container string) error
}

// Links plumbs veth pairs on the host.
type Links interface {
	// Pair makes the pair host–inner (idempotent): inner, Docker's to
	// move into the container, gets the MTU, mac (if not nil) and TX
	// checksum offload off; host gets proxy ARP and a /32 route for addr
	// that overlayd keeps in place. It returns inner's MAC.
	Pair(host, inner string, mtu int, mac net.HardwareAddr, addr netip.Prefix) (string, error)
	// Keep tells overlayd that host, made before a restart, is the
	// driver's: its route for addr is kept in place.
	Keep(host string, addr netip.Prefix)
	// Remove removes a pair (gone already is not an error).
	Remove(host string) error
	// Exists reports whether host exists.
	Exists(host string) bool
	// IsNetns reports whether path is a network namespace.
	IsNetns(path string) bool
}

// Engine is what the driver asks of the Docker engine.
type Engine interface {
	// Networks lists Docker's networks of driver.
	Networks(ctx context.Context, driver string) ([]EngineNetwork, error)
	// Running lists the running containers.
	Running(ctx context.Context) ([]Container, error)
	// CreateNetwork creates network name with driver for both the
	// network and its IPAM, on subnet. If it exists already it returns
	// the driver of the existing one.
	CreateNetwork(ctx context.Context, name, driver string, subnet netip.Prefix) (existing string, err error)
}

// EngineNetwork is a Docker network as the engine reports it.
type EngineNetwork struct {
	ID          string
	Subnet      netip.Prefix // its first IPv4 subnet, if any
	ForeignIPAM bool         // its IPAM driver is not ours
	Endpoints   []string     // IDs of the endpoints connected to it
}

// Container is a running container as the engine reports it.
type Container struct {
	ID, Name             string // Name without Docker's leading slash
	Hostname, Domainname string
	Endpoints            []ContainerEndpoint
}

// ContainerEndpoint is a container's interface on a network.
type ContainerEndpoint struct {
	NetworkID, EndpointID string
	Addr                  netip.Addr
	Aliases               []string
}

// DriverConfig configures a Driver.
type DriverConfig struct {
	Name          string       // of the network and IPAM drivers (weavemesh)
	Socket        string       // where Docker finds it, for status
	Network       string       // created by EnsureNetwork; "" for none
	Range         netip.Prefix // overlayd's allocation range
	DefaultSubnet netip.Prefix
	MTU           int    // of the veths
	Domain        string // the DNS domain, with its final dot; "" when DNS is off
	StateDir      string // StateFile lives here
	Log           *zap.Logger
}

func (c *DriverConfig) validate() error {
	switch {
	case c.Name == "":
		return errors.New("dockerplugin: no driver name")
	case !c.Range.IsValid() || !c.DefaultSubnet.IsValid():
		return errors.New("dockerplugin: the driver needs IPAM's range")
	case c.MTU < 576:
		return fmt.Errorf("dockerplugin: MTU %d", c.MTU)
	case c.StateDir == "":
		return errors.New("dockerplugin: no state directory")
	case c.Log == nil:
		return errors.New("dockerplugin: no logger")
	}
	return nil
}

// Driver is the Docker network and IPAM driver: the policy behind the
// protocol's Backend. Its networks and endpoints are saved in StateFile.
// It is safe for concurrent use; mu is never held across a call to IPAM,
// Names or the Engine.
type Driver struct {
	cfg    DriverConfig
	log    *zap.Logger
	path   string
	ipam   IPAM
	names  Names // nil when DNS is off
	links  Links
	engine Engine

	mu sync.Mutex
	st *pluginstate.State // guarded by mu
}

var _ Backend = (*Driver)(nil)

// NewDriver makes a Driver with the state saved in cfg.StateDir. Damaged
// entries are skipped (logged); a file that is not the state's JSON is an
// error. names may be nil (DNS off).
func NewDriver(cfg DriverConfig, ipam IPAM, names Names, links Links, engine Engine) (*Driver, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	d := &Driver{cfg: cfg, log: cfg.Log, path: filepath.Join(cfg.StateDir, StateFile), ipam: ipam, names: names,
		links: links, engine: engine, st: pluginstate.New()}
	b, err := os.ReadFile(d.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return d, nil
	case err != nil:
		return nil, err
	}
	st, dropped, err := pluginstate.Decode(b)
	if err != nil {
		return nil, fmt.Errorf("%s is corrupt: %v: restore it, or remove it to forget the Docker endpoints it lists", d.path, err)
	}
	if dropped > 0 {
		d.log.Warn("skipped damaged entries of "+StateFile, zap.Int("entries", dropped))
	}
	for _, e := range st.Endpoints {
		// The interface names follow from the ID: a file never names
		// an interface for overlayd to delete.
		e.HostIface, e.Inner = pairNames(e.ID)
		links.Keep(e.HostIface, e.Address)
	}
	d.st = st
	return d, nil
}

// saveLocked writes the state; mu is held.
func (d *Driver) saveLocked() error {
	b, err := d.st.Encode()
	if err != nil {
		return err
	}
	return atomicfile.Write(d.path, b)
}

// pairNames are the host end's and the container end's names for an
// endpoint.
func pairNames(endpointID string) (host, inner string) {
	host = containers.HostIface(endpointID)
	return host, "vethwg" + strings.TrimPrefix(host, "vethwe")
}

// CreateNetwork accepts a network whose addresses come from our IPAM
// driver, in the range, or from Docker's own IPAM inside the range.
func (d *Driver) CreateNetwork(ctx context.Context, req CreateNetworkRequest) error {
	name := d.cfg.Name
	if len(req.IPv6Data) > 0 {
		return BadRequest("%s networks are IPv4 only: create the network without --ipv6", name)
	}
	if len(req.IPv4Data) != 1 {
		return BadRequest("a %s network has exactly one IPv4 subnet, not %d", name, len(req.IPv4Data))
	}
	data := req.IPv4Data[0]
	pool, err := netip.ParsePrefix(data.Pool)
	if err != nil || !pool.Addr().Is4() {
		return BadRequest("the network's subnet %q is not an IPv4 CIDR", data.Pool)
	}
	dockerIPAM := data.AddressSpace != LocalSpace && data.AddressSpace != GlobalSpace
	if dockerIPAM {
		// Docker's own IPAM (docker network create -d weavemesh
		// --subnet ...): each address it gives is claimed in ours when
		// its endpoint is made, so that no other host hands it out.
		if !d.inRange(pool) {
			return BadRequest("subnet %v is not inside overlayd's range %v", pool, d.cfg.Range)
		}
		d.log.Info("the network's addresses come from another IPAM driver: each is claimed in overlayd's as its container joins",
			zap.String("network", req.NetworkID), zap.String("space", data.AddressSpace), zap.Stringer("subnet", pool))
	}
	if generic, ok := req.Options["com.docker.network.generic"].(map[string]any); ok {
		for _, k := range slices.Sorted(maps.Keys(generic)) {
			d.log.Warn("ignoring a network option the driver does not know", zap.String("network", req.NetworkID), zap.String("option", k))
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.st.Networks[req.NetworkID] = &pluginstate.Network{ID: req.NetworkID, Pool: pool, DockerIPAM: dockerIPAM}
	d.log.Info("docker network created", zap.String("network", req.NetworkID), zap.Stringer("subnet", pool))
	return d.saveLocked()
}

// DeleteNetwork forgets a network; one we do not know is gone already.
func (d *Driver) DeleteNetwork(ctx context.Context, id string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.st.Networks[id]; !ok {
		return nil
	}
	delete(d.st.Networks, id)
	d.log.Info("docker network deleted", zap.String("network", id))
	return d.saveLocked()
}

// CreateEndpoint makes the veth pair with the address IPAM gave Docker.
func (d *Driver) CreateEndpoint(ctx context.Context, req CreateEndpointRequest) (CreateEndpointResponse, error) {
	if req.Interface == nil || req.Interface.Address == "" {
		return CreateEndpointResponse{}, BadRequest("the endpoint has no IPv4 address: create the network with --ipam-driver %s", d.cfg.Name)
	}
	if req.Interface.AddressIPv6 != "" {
		return CreateEndpointResponse{}, BadRequest("%s networks are IPv4 only", d.cfg.Name)
	}
	addr, err := netip.ParsePrefix(req.Interface.Address)
	if err != nil || !addr.Addr().Is4() {
		return CreateEndpointResponse{}, BadRequest("the endpoint's address %q is not an IPv4 CIDR", req.Interface.Address)
	}
	var mac net.HardwareAddr
	if req.Interface.MacAddress != "" {
		if mac, err = net.ParseMAC(req.Interface.MacAddress); err != nil {
			return CreateEndpointResponse{}, BadRequest("the endpoint's MAC address %q: %v", req.Interface.MacAddress, err)
		}
	}
	d.mu.Lock()
	if e, ok := d.st.Endpoints[req.EndpointID]; ok {
		// Docker sent it again (its client retries): the endpoint
		// stands as it was made.
		d.mu.Unlock()
		if e.Address != addr {
			return CreateEndpointResponse{}, BadRequest("endpoint %s exists with address %v", req.EndpointID, e.Address)
		}
		var resp CreateEndpointResponse
		if mac == nil {
			resp.Interface = &EndpointInterface{MacAddress: e.MAC}
		}
		return resp, nil
	}
	n := d.st.Networks[req.NetworkID]
	claimed := n != nil && n.DockerIPAM
	d.mu.Unlock()

	// An address of Docker's own IPAM is claimed in ours, not under
	// the lock: a claim may wait for the owner of the space.
	if claimed {
		if _, err := d.ipam.Claim(ctx, claimID(req.EndpointID), addr); err != nil {
			if ctx.Err() != nil {
				d.unclaim(req.EndpointID, addr) // the claim may yet complete
			}
			return CreateEndpointResponse{}, fromIPAM(fmt.Errorf("claiming %v, which Docker's IPAM chose: %w", addr, err))
		}
	}
	undo := func() {
		if claimed {
			d.unclaim(req.EndpointID, addr)
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if ctx.Err() != nil {
		// Docker gave up on this call and will not delete the
		// endpoint: none is made.
		undo()
		return CreateEndpointResponse{}, ctx.Err()
	}
	host, inner := pairNames(req.EndpointID)
	got, err := d.links.Pair(host, inner, d.cfg.MTU, mac, addr)
	if err != nil {
		undo()
		return CreateEndpointResponse{}, err
	}
	d.st.Endpoints[req.EndpointID] = &pluginstate.Endpoint{ID: req.EndpointID, NetworkID: req.NetworkID, Address: addr,
		HostIface: host, Inner: inner, MAC: got, Claimed: claimed}
	if err := d.saveLocked(); err != nil {
		d.links.Remove(host)
		delete(d.st.Endpoints, req.EndpointID)
		undo()
		return CreateEndpointResponse{}, err
	}
	d.log.Info("docker endpoint created", zap.String("endpoint", req.EndpointID), zap.Stringer("addr", addr), zap.String("veth", host))
	var resp CreateEndpointResponse
	if mac == nil {
		resp.Interface = &EndpointInterface{MacAddress: got}
	}
	return resp, nil
}

// claimID is the IPAM ID of an endpoint's address claimed from Docker's
// IPAM: derived from the endpoint, so that a repeated claim is the same
// claim, and never read from a file.
func claimID(endpointID string) string { return DockerIPAMPrefix + "endpoint-" + endpointID }

// unclaim gives an endpoint's claimed address back, whatever the caller's
// context: the address must not stay held by an endpoint that is gone.
func (d *Driver) unclaim(endpointID string, addr netip.Prefix) {
	var a netip.Addr // none: every address of the claim
	if addr.IsValid() {
		a = addr.Addr()
	}
	if err := d.ipam.Release(context.Background(), claimID(endpointID), a); err != nil {
		d.log.Warn("releasing the claim of an endpoint", zap.String("endpoint", endpointID), zap.Error(err))
	}
}

// DeleteEndpoint removes the veth pair; its address goes back when Docker
// releases it, or here when it came from Docker's IPAM.
func (d *Driver) DeleteEndpoint(ctx context.Context, networkID, endpointID string) error {
	d.mu.Lock()
	e, ok := d.st.Endpoints[endpointID]
	host, _ := pairNames(endpointID)
	if err := d.links.Remove(host); err != nil {
		if ok {
			d.links.Keep(host, e.Address)
		}
		d.mu.Unlock()
		return err
	}
	if !ok {
		d.mu.Unlock()
		// A claim whose endpoint was never recorded (a create that
		// failed after it) goes too.
		d.unclaim(endpointID, netip.Prefix{})
		return nil
	}
	delete(d.st.Endpoints, endpointID)
	d.log.Info("docker endpoint deleted", zap.String("endpoint", endpointID), zap.Stringer("addr", e.Address))
	err := d.saveLocked()
	d.mu.Unlock()
	if e.Claimed {
		d.unclaim(endpointID, e.Address)
	}
	return err
}

// EndpointInfo is what `docker network inspect` shows of the driver.
func (d *Driver) EndpointInfo(ctx context.Context, networkID, endpointID string) (map[string]any, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	e, ok := d.st.Endpoints[endpointID]
	if !ok {
		return nil, NotFound("endpoint %s", endpointID)
	}
	return map[string]any{"hostIface": e.HostIface, "mac": e.MAC}, nil
}

// Join hands the container's end to Docker, to be ethwe0, with a route for
// the whole range when the network is only part of it. No gateway: Docker
// gives the container its gateway bridge for the outside.
func (d *Driver) Join(ctx context.Context, req JoinRequest) (JoinResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	e, ok := d.st.Endpoints[req.EndpointID]
	if !ok {
		return JoinResponse{}, NotFound("endpoint %s was never created here", req.EndpointID)
	}
	resp := JoinResponse{InterfaceName: InterfaceName{SrcName: e.Inner, DstPrefix: containerPrefix}}
	if r := d.cfg.Range; e.Address.Masked() != r {
		resp.StaticRoutes = []StaticRoute{{Destination: r.String(), RouteType: RouteConnected}}
	}
	e.Sandbox, e.Left = req.SandboxKey, false
	if err := d.saveLocked(); err != nil {
		return JoinResponse{}, err
	}
	return resp, nil
}

// Leave: Docker takes the interface out of the container itself.
func (d *Driver) Leave(ctx context.Context, networkID, endpointID string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if e, ok := d.st.Endpoints[endpointID]; ok && !e.Left {
		e.Sandbox, e.Left = "", true
		return d.saveLocked()
	}
	return nil
}

// AddressSpaces are Weave's.
func (d *Driver) AddressSpaces() AddressSpaces {
	return AddressSpaces{LocalDefaultAddressSpace: LocalSpace, GlobalDefaultAddressSpace: GlobalSpace}
}

// poolID names a pool and the sub-pool addresses come from, as Weave
// does: weavemesh-172.16.16.0/24-172.16.16.64/26 (no sub-pool: nothing
// after the last dash).
func (d *Driver) poolID(pool, sub netip.Prefix) string {
	id := d.cfg.Name + "-" + pool.String() + "-"
	if sub.IsValid() {
		id += sub.String()
	}
	return id
}

func (d *Driver) parsePoolID(id string) (pool, sub netip.Prefix, err error) {
	notOurs := NotFound("pool %q is not one of ours", id)
	rest, ok := strings.CutPrefix(id, d.cfg.Name+"-")
	ps, ss, ok2 := strings.Cut(rest, "-")
	if !ok || !ok2 {
		return pool, sub, notOurs
	}
	if pool, err = netip.ParsePrefix(ps); err != nil {
		return pool, sub, notOurs
	}
	if ss != "" {
		if sub, err = netip.ParsePrefix(ss); err != nil {
			return pool, sub, notOurs
		}
	}
	return pool, sub, nil
}

// inRange reports whether subnet s lies inside the IPAM range.
func (d *Driver) inRange(s netip.Prefix) bool {
	r := d.cfg.Range
	return s.Addr().Is4() && s.Bits() >= r.Bits() && r.Contains(s.Addr())
}

// RequestPool gives the default subnet, or checks the one asked for: a
// subnet of the range, with an optional sub-pool addresses come from.
func (d *Driver) RequestPool(ctx context.Context, req RequestPoolRequest) (RequestPoolResponse, error) {
	if req.V6 {
		return RequestPoolResponse{}, BadRequest("%s is IPv4 only: create the network without --ipv6", d.cfg.Name)
	}
	pool := d.cfg.DefaultSubnet
	if req.Pool != "" {
		var err error
		if pool, err = netip.ParsePrefix(req.Pool); err != nil || pool.Masked() != pool {
			return RequestPoolResponse{}, BadRequest("subnet %q is not a subnet such as %v", req.Pool, d.cfg.Range)
		}
		if !d.inRange(pool) {
			return RequestPoolResponse{}, BadRequest("subnet %v is not inside overlayd's range %v", pool, d.cfg.Range)
		}
	}
	if pool.Bits() > 30 {
		return RequestPoolResponse{}, BadRequest("subnet %v is smaller than 4 addresses", pool)
	}
	var sub netip.Prefix
	if req.SubPool != "" {
		var err error
		if sub, err = netip.ParsePrefix(req.SubPool); err != nil || sub.Masked() != sub || sub.Bits() < pool.Bits() || !pool.Contains(sub.Addr()) || sub.Bits() > 30 {
			return RequestPoolResponse{}, BadRequest("ip-range %q is not a subnet of %v of 4 addresses or more", req.SubPool, pool)
		}
	}
	// The gateway is the subnet's own address, which IPAM never hands
	// out: Docker wants one, and the container's route for the subnet
	// is on-link, so nothing ever uses it.
	return RequestPoolResponse{PoolID: d.poolID(pool, sub), Pool: pool.String(),
		Data: map[string]string{"com.docker.network.gateway": pool.String()}}, nil
}

// ReleasePool: pools hold nothing of their own.
func (d *Driver) ReleasePool(ctx context.Context, id string) error {
	_, _, err := d.parsePoolID(id)
	return err
}

// RequestAddress allocates from IPAM (in the sub-pool, if any), or claims
// the address Docker asks for (docker run --ip, or Docker restoring its
// endpoints), or answers the gateway.
func (d *Driver) RequestAddress(ctx context.Context, req RequestAddressRequest) (RequestAddressResponse, error) {
	pool, sub, err := d.parsePoolID(req.PoolID)
	if err != nil {
		return RequestAddressResponse{}, err
	}
	if req.Options[RequestAddressType] == GatewayRequest {
		return RequestAddressResponse{Address: pool.String()}, nil
	}
	// Each address gets an ID of its own: a second request for a given
	// address, even at the same moment, finds it taken.
	id := DockerIPAMPrefix + nonce()
	var got netip.Prefix
	if req.Address == "" {
		from := pool
		if sub.IsValid() {
			from = sub
		}
		got, err = d.ipam.Alloc(ctx, id, from)
	} else {
		a, perr := netip.ParseAddr(req.Address)
		if perr != nil || !pool.Contains(a) {
			return RequestAddressResponse{}, BadRequest("address %q is not in subnet %v", req.Address, pool)
		}
		if a == pool.Addr() || a == ipv4.Last(pool) {
			return RequestAddressResponse{}, BadRequest("address %v is the network or broadcast address of %v", a, pool)
		}
		got, err = d.ipam.Claim(ctx, id, netip.PrefixFrom(a, pool.Bits()))
	}
	if ctx.Err() != nil {
		// Docker gave up waiting (for consensus, for space): an
		// address allocated after all would be nobody's.
		d.ipam.Release(context.WithoutCancel(ctx), id, netip.Addr{})
		return RequestAddressResponse{}, ctx.Err()
	}
	if err != nil {
		return RequestAddressResponse{}, fromIPAM(err)
	}
	return RequestAddressResponse{Address: netip.PrefixFrom(got.Addr(), pool.Bits()).String()}, nil
}

// ReleaseAddress gives an address back to IPAM, with its names. The
// gateway and addresses already free are no-ops; an address held by
// something other than Docker is refused.
func (d *Driver) ReleaseAddress(ctx context.Context, poolID, address string) error {
	pool, _, err := d.parsePoolID(poolID)
	if err != nil {
		return err
	}
	a, err := netip.ParseAddr(address)
	if err != nil {
		if pf, perr := netip.ParsePrefix(address); perr == nil {
			a, err = pf.Addr(), nil
		}
	}
	if err != nil || !pool.Contains(a) {
		return BadRequest("address %q is not in subnet %v", address, pool)
	}
	if a == pool.Addr() {
		return nil
	}
	owner, ok := d.ipam.Holder(ctx, a)
	if !ok {
		return nil
	}
	if !strings.HasPrefix(owner, DockerIPAMPrefix) {
		return BadRequest("address %v is held by %s, not by Docker", a, owner)
	}
	return fromIPAM(d.ipam.Release(ctx, owner, a))
}

// fromIPAM turns IPAM's refusals into the protocol's 400, with their text.
func fromIPAM(err error) error {
	if err != nil && api.IsBadRequest(err) {
		return &Error{Status: 400, Err: err}
	}
	return err
}

func nonce() string {
	var b [8]byte
	crand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Attachments lists the driver's endpoints for ps.
func (d *Driver) Attachments() []api.Attachment {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []api.Attachment
	for _, id := range slices.Sorted(maps.Keys(d.st.Endpoints)) {
		e := d.st.Endpoints[id]
		cid := e.Container
		if cid == "" {
			cid = e.ID
		}
		out = append(out, api.Attachment{ID: cid, NetNS: e.Sandbox, HostIface: e.HostIface, MAC: e.MAC,
			Addresses: []netip.Prefix{e.Address}})
	}
	return out
}

// Status is the driver's section of the status.
func (d *Driver) Status() api.PluginStatus {
	d.mu.Lock()
	defer d.mu.Unlock()
	return api.PluginStatus{Enabled: true, DriverName: d.cfg.Name, Socket: d.cfg.Socket,
		Network: d.cfg.Network, Networks: len(d.st.Networks), Endpoints: len(d.st.Endpoints)}
}
