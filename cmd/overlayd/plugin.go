package main

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
	"github.com/overlayd/overlayd/internal/attach"
	"github.com/overlayd/overlayd/internal/dockerplugin"
	"github.com/overlayd/overlayd/internal/ipv4"
	"github.com/overlayd/overlayd/internal/pluginstate"
)

// pluginFile keeps the plugin's networks and endpoints across restarts.
const pluginFile = "docker-plugin.json"

// Address spaces of the IPAM driver (Weave's names).
const (
	localSpace  = "weavelocal"
	globalSpace = "weaveglobal"
)

// dockerIPAMPrefix starts the IPAM IDs of addresses handed to Docker: its
// IPAM requests name no container, so each address has an ID of its own.
const dockerIPAMPrefix = "docker:"

// containerPrefix is what Docker renames our interface to, plus a number
// (ethwe0).
const containerPrefix = "ethwe"

// plugin is the Docker network and IPAM driver: the policy behind
// dockerplugin's protocol.
type plugin struct {
	d    *daemon
	path string

	mu sync.Mutex
	st *pluginstate.State // guarded by mu
}

var _ dockerplugin.Backend = (*plugin)(nil)

func loadPlugin(d *daemon) (*plugin, error) {
	p := &plugin{d: d, path: filepath.Join(d.cfg.StateDir, pluginFile), st: pluginstate.New()}
	b, err := os.ReadFile(p.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return p, nil
	case err != nil:
		return nil, err
	}
	st, dropped, err := pluginstate.Decode(b)
	if err != nil {
		return nil, fmt.Errorf("%s is corrupt: %v: restore it, or remove it to forget the Docker endpoints it lists", p.path, err)
	}
	if dropped > 0 {
		d.log.Warn("skipped damaged entries of "+pluginFile, zap.Int("entries", dropped))
	}
	for _, e := range st.Endpoints {
		// The interface names follow from the ID: a file never names
		// an interface for overlayd to delete.
		e.HostIface, e.Inner = pairNames(e.ID)
		d.keeper.SetHost(e.HostIface, []netip.Addr{e.Address.Addr()})
	}
	p.st = st
	return p, nil
}

// saveLocked writes the state; mu must be held.
func (p *plugin) saveLocked() error {
	b, err := p.st.Encode()
	if err != nil {
		return err
	}
	return atomicfile.Write(p.path, b)
}

func badPlugin(format string, a ...any) error {
	return fmt.Errorf("%w: %s", dockerplugin.ErrBadRequest, fmt.Sprintf(format, a...))
}

// CreateNetwork accepts a network whose addresses come from our IPAM
// driver, in the range.
func (p *plugin) CreateNetwork(ctx context.Context, req dockerplugin.CreateNetworkRequest) error {
	name := p.d.cfg.PluginName
	if len(req.IPv6Data) > 0 {
		return badPlugin("%s networks are IPv4 only: create the network without --ipv6", name)
	}
	if len(req.IPv4Data) != 1 {
		return badPlugin("a %s network has exactly one IPv4 subnet, not %d", name, len(req.IPv4Data))
	}
	data := req.IPv4Data[0]
	pool, err := netip.ParsePrefix(data.Pool)
	if err != nil || !pool.Addr().Is4() {
		return badPlugin("the network's subnet %q is not an IPv4 CIDR", data.Pool)
	}
	dockerIPAM := data.AddressSpace != localSpace && data.AddressSpace != globalSpace
	if dockerIPAM {
		// Docker's own IPAM (docker network create -d weavemesh
		// --subnet ...): each address it gives is claimed in ours when
		// its endpoint is made, so that no other host hands it out.
		if !p.inRange(pool) {
			return badPlugin("subnet %v is not inside overlayd's range %v", pool, p.d.cfg.Range)
		}
		p.d.log.Info("the network's addresses come from another IPAM driver: each is claimed in overlayd's as its container joins",
			zap.String("network", req.NetworkID), zap.String("space", data.AddressSpace), zap.Stringer("subnet", pool))
	}
	if generic, ok := req.Options["com.docker.network.generic"].(map[string]any); ok {
		for k := range generic {
			p.d.log.Warn("ignoring a network option the driver does not know", zap.String("network", req.NetworkID), zap.String("option", k))
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.st.Networks[req.NetworkID] = &pluginstate.Network{ID: req.NetworkID, Pool: pool, DockerIPAM: dockerIPAM}
	p.d.log.Info("docker network created", zap.String("network", req.NetworkID), zap.Stringer("subnet", pool))
	return p.saveLocked()
}

// DeleteNetwork forgets a network; one we do not know is gone already.
func (p *plugin) DeleteNetwork(ctx context.Context, id string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.st.Networks[id]; !ok {
		return nil
	}
	delete(p.st.Networks, id)
	p.d.log.Info("docker network deleted", zap.String("network", id))
	return p.saveLocked()
}

// pairNames are the host end's and the container end's names for an
// endpoint.
func pairNames(endpointID string) (host, inner string) {
	host = attach.HostIface(endpointID)
	return host, "vethwg" + strings.TrimPrefix(host, "vethwe")
}

// CreateEndpoint makes the veth pair with the address IPAM gave Docker.
func (p *plugin) CreateEndpoint(ctx context.Context, req dockerplugin.CreateEndpointRequest) (dockerplugin.CreateEndpointResponse, error) {
	if req.Interface == nil || req.Interface.Address == "" {
		return dockerplugin.CreateEndpointResponse{}, badPlugin("the endpoint has no IPv4 address: create the network with --ipam-driver %s", p.d.cfg.PluginName)
	}
	if req.Interface.AddressIPv6 != "" {
		return dockerplugin.CreateEndpointResponse{}, badPlugin("%s networks are IPv4 only", p.d.cfg.PluginName)
	}
	addr, err := netip.ParsePrefix(req.Interface.Address)
	if err != nil || !addr.Addr().Is4() {
		return dockerplugin.CreateEndpointResponse{}, badPlugin("the endpoint's address %q is not an IPv4 CIDR", req.Interface.Address)
	}
	var mac net.HardwareAddr
	if req.Interface.MacAddress != "" {
		if mac, err = net.ParseMAC(req.Interface.MacAddress); err != nil {
			return dockerplugin.CreateEndpointResponse{}, badPlugin("the endpoint's MAC address %q: %v", req.Interface.MacAddress, err)
		}
	}
	p.mu.Lock()
	if e, ok := p.st.Endpoints[req.EndpointID]; ok {
		// Docker sent it again (its client retries): the endpoint
		// stands as it was made.
		p.mu.Unlock()
		if e.Address != addr {
			return dockerplugin.CreateEndpointResponse{}, badPlugin("endpoint %s exists with address %v", req.EndpointID, e.Address)
		}
		var resp dockerplugin.CreateEndpointResponse
		if mac == nil {
			resp.Interface = &dockerplugin.EndpointInterface{MacAddress: e.MAC}
		}
		return resp, nil
	}
	n := p.st.Networks[req.NetworkID]
	claimed := n != nil && n.DockerIPAM
	p.mu.Unlock()

	// An address of Docker's own IPAM is claimed in ours, not under
	// the plugin's lock: a claim may wait for the owner of the space.
	if claimed {
		if _, err := p.d.Claim(ctx, claimID(req.EndpointID), addr); err != nil {
			if ctx.Err() != nil {
				p.unclaim(req.EndpointID, addr) // the claim may yet complete
			}
			if errors.Is(err, api.ErrBadRequest) {
				return dockerplugin.CreateEndpointResponse{}, badPlugin("claiming %v, which Docker's IPAM chose: %s",
					addr, strings.TrimPrefix(err.Error(), api.ErrBadRequest.Error()+": "))
			}
			return dockerplugin.CreateEndpointResponse{}, fmt.Errorf("claiming %v, which Docker's IPAM chose: %w", addr, err)
		}
	}
	undo := func() {
		if claimed {
			p.unclaim(req.EndpointID, addr)
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if ctx.Err() != nil {
		// Docker gave up on this call and will not delete the
		// endpoint: none is made.
		undo()
		return dockerplugin.CreateEndpointResponse{}, ctx.Err()
	}
	host, inner := pairNames(req.EndpointID)
	got, err := attach.Pair(host, inner, p.d.containerMTU(), mac, []netip.Prefix{addr})
	if err != nil {
		undo()
		return dockerplugin.CreateEndpointResponse{}, err
	}
	p.st.Endpoints[req.EndpointID] = &pluginstate.Endpoint{ID: req.EndpointID, NetworkID: req.NetworkID, Address: addr,
		HostIface: host, Inner: inner, MAC: got, Claimed: claimed}
	p.d.keeper.SetHost(host, []netip.Addr{addr.Addr()})
	if err := p.saveLocked(); err != nil {
		p.d.keeper.SetHost(host, nil)
		attach.Detach(host)
		delete(p.st.Endpoints, req.EndpointID)
		undo()
		return dockerplugin.CreateEndpointResponse{}, err
	}
	p.d.log.Info("docker endpoint created", zap.String("endpoint", req.EndpointID), zap.Stringer("addr", addr), zap.String("veth", host))
	var resp dockerplugin.CreateEndpointResponse
	if mac == nil {
		resp.Interface = &dockerplugin.EndpointInterface{MacAddress: got}
	}
	return resp, nil
}

// claimID is the IPAM ID of an endpoint's address claimed from Docker's
// IPAM: derived from the endpoint, so that a repeated claim is the same
// claim, and never read from a file.
func claimID(endpointID string) string { return dockerIPAMPrefix + "endpoint-" + endpointID }

// unclaim gives an endpoint's claimed address back, whatever the caller's
// context: the address must not stay held by an endpoint that is gone.
func (p *plugin) unclaim(endpointID string, addr netip.Prefix) {
	var a netip.Addr // none: every address of the claim
	if addr.IsValid() {
		a = addr.Addr()
	}
	if err := p.d.Release(context.Background(), claimID(endpointID), a); err != nil && !strings.Contains(err.Error(), "no addresses for") {
		p.d.log.Warn("releasing the claim of an endpoint", zap.String("endpoint", endpointID), zap.Error(err))
	}
}

// DeleteEndpoint removes the veth pair; its address goes back when Docker
// releases it, or here when it came from Docker's IPAM.
func (p *plugin) DeleteEndpoint(ctx context.Context, networkID, endpointID string) error {
	p.mu.Lock()
	e, ok := p.st.Endpoints[endpointID]
	host, _ := pairNames(endpointID)
	p.d.keeper.SetHost(host, nil)
	if err := attach.Detach(host); err != nil {
		if ok {
			p.d.keeper.SetHost(host, []netip.Addr{e.Address.Addr()})
		}
		p.mu.Unlock()
		return err
	}
	if !ok {
		p.mu.Unlock()
		// A claim whose endpoint was never recorded (a create that
		// failed after it) goes too.
		p.unclaim(endpointID, netip.Prefix{})
		return nil
	}
	delete(p.st.Endpoints, endpointID)
	p.d.log.Info("docker endpoint deleted", zap.String("endpoint", endpointID), zap.Stringer("addr", e.Address))
	err := p.saveLocked()
	p.mu.Unlock()
	if e.Claimed {
		p.unclaim(endpointID, e.Address)
	}
	return err
}

// EndpointInfo is what `docker network inspect` shows of the driver.
func (p *plugin) EndpointInfo(ctx context.Context, networkID, endpointID string) (map[string]any, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e, ok := p.st.Endpoints[endpointID]
	if !ok {
		return nil, fmt.Errorf("%w: endpoint %s", dockerplugin.ErrNotFound, endpointID)
	}
	return map[string]any{"hostIface": e.HostIface, "mac": e.MAC}, nil
}

// Join hands the container's end to Docker, to be ethwe0, with a route for
// the whole range when the network is only part of it. No gateway: Docker
// gives the container its gateway bridge for the outside.
func (p *plugin) Join(ctx context.Context, req dockerplugin.JoinRequest) (dockerplugin.JoinResponse, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e, ok := p.st.Endpoints[req.EndpointID]
	if !ok {
		return dockerplugin.JoinResponse{}, fmt.Errorf("%w: endpoint %s was never created here", dockerplugin.ErrNotFound, req.EndpointID)
	}
	resp := dockerplugin.JoinResponse{InterfaceName: dockerplugin.InterfaceName{SrcName: e.Inner, DstPrefix: containerPrefix}}
	if r := p.d.cfg.Range; e.Address.Masked() != r {
		resp.StaticRoutes = []dockerplugin.StaticRoute{{Destination: r.String(), RouteType: dockerplugin.RouteConnected}}
	}
	e.Sandbox, e.Left = req.SandboxKey, false
	if err := p.saveLocked(); err != nil {
		return dockerplugin.JoinResponse{}, err
	}
	return resp, nil
}

// Leave: Docker takes the interface out of the container itself.
func (p *plugin) Leave(ctx context.Context, networkID, endpointID string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if e, ok := p.st.Endpoints[endpointID]; ok && !e.Left {
		e.Sandbox, e.Left = "", true
		return p.saveLocked()
	}
	return nil
}

// AddressSpaces are Weave's.
func (p *plugin) AddressSpaces() dockerplugin.AddressSpaces {
	return dockerplugin.AddressSpaces{LocalDefaultAddressSpace: localSpace, GlobalDefaultAddressSpace: globalSpace}
}

// poolID names a pool and the sub-pool addresses come from, as Weave
// does: weavemesh-172.16.16.0/24-172.16.16.64/26 (no sub-pool: nothing
// after the last dash).
func (p *plugin) poolID(pool, sub netip.Prefix) string {
	id := p.d.cfg.PluginName + "-" + pool.String() + "-"
	if sub.IsValid() {
		id += sub.String()
	}
	return id
}

func (p *plugin) parsePoolID(id string) (pool, sub netip.Prefix, err error) {
	rest, ok := strings.CutPrefix(id, p.d.cfg.PluginName+"-")
	ps, ss, ok2 := strings.Cut(rest, "-")
	if !ok || !ok2 {
		return pool, sub, fmt.Errorf("%w: pool %q is not one of ours", dockerplugin.ErrNotFound, id)
	}
	if pool, err = netip.ParsePrefix(ps); err != nil {
		return pool, sub, fmt.Errorf("%w: pool %q is not one of ours", dockerplugin.ErrNotFound, id)
	}
	if ss != "" {
		if sub, err = netip.ParsePrefix(ss); err != nil {
			return pool, sub, fmt.Errorf("%w: pool %q is not one of ours", dockerplugin.ErrNotFound, id)
		}
	}
	return pool, sub, nil
}

// inRange reports whether subnet s lies inside the IPAM range.
func (p *plugin) inRange(s netip.Prefix) bool {
	r := p.d.cfg.Range
	return s.Addr().Is4() && s.Bits() >= r.Bits() && r.Contains(s.Addr())
}

// RequestPool gives the default subnet, or checks the one asked for: a
// subnet of the range, with an optional sub-pool addresses come from.
func (p *plugin) RequestPool(ctx context.Context, req dockerplugin.RequestPoolRequest) (dockerplugin.RequestPoolResponse, error) {
	if req.V6 {
		return dockerplugin.RequestPoolResponse{}, badPlugin("%s is IPv4 only: create the network without --ipv6", p.d.cfg.PluginName)
	}
	pool := p.d.cfg.DefaultSubnet
	if req.Pool != "" {
		var err error
		if pool, err = netip.ParsePrefix(req.Pool); err != nil || pool.Masked() != pool {
			return dockerplugin.RequestPoolResponse{}, badPlugin("subnet %q is not a subnet such as %v", req.Pool, p.d.cfg.Range)
		}
		if !p.inRange(pool) {
			return dockerplugin.RequestPoolResponse{}, badPlugin("subnet %v is not inside overlayd's range %v", pool, p.d.cfg.Range)
		}
	}
	if pool.Bits() > 30 {
		return dockerplugin.RequestPoolResponse{}, badPlugin("subnet %v is smaller than 4 addresses", pool)
	}
	var sub netip.Prefix
	if req.SubPool != "" {
		var err error
		if sub, err = netip.ParsePrefix(req.SubPool); err != nil || sub.Masked() != sub || sub.Bits() < pool.Bits() || !pool.Contains(sub.Addr()) || sub.Bits() > 30 {
			return dockerplugin.RequestPoolResponse{}, badPlugin("ip-range %q is not a subnet of %v of 4 addresses or more", req.SubPool, pool)
		}
	}
	// The gateway is the subnet's own address, which IPAM never hands
	// out: Docker wants one, and the container's route for the subnet
	// is on-link, so nothing ever uses it.
	return dockerplugin.RequestPoolResponse{PoolID: p.poolID(pool, sub), Pool: pool.String(),
		Data: map[string]string{"com.docker.network.gateway": pool.String()}}, nil
}

// ReleasePool: pools hold nothing of their own.
func (p *plugin) ReleasePool(ctx context.Context, id string) error {
	_, _, err := p.parsePoolID(id)
	return err
}

// RequestAddress allocates from IPAM (in the sub-pool, if any), or claims
// the address Docker asks for (docker run --ip, or Docker restoring its
// endpoints), or answers the gateway.
func (p *plugin) RequestAddress(ctx context.Context, req dockerplugin.RequestAddressRequest) (dockerplugin.RequestAddressResponse, error) {
	pool, sub, err := p.parsePoolID(req.PoolID)
	if err != nil {
		return dockerplugin.RequestAddressResponse{}, err
	}
	if req.Options[dockerplugin.RequestAddressType] == dockerplugin.GatewayRequest {
		return dockerplugin.RequestAddressResponse{Address: pool.String()}, nil
	}
	if req.Address == "" {
		from := pool
		if sub.IsValid() {
			from = sub
		}
		id := dockerIPAMPrefix + nonce()
		a, err := p.d.Alloc(ctx, id, from)
		if ctx.Err() != nil {
			// Docker gave up waiting (for consensus, for space): an
			// address allocated after all would be nobody's.
			p.d.Release(context.WithoutCancel(ctx), id, netip.Addr{})
			return dockerplugin.RequestAddressResponse{}, ctx.Err()
		}
		if err != nil {
			return dockerplugin.RequestAddressResponse{}, apiToPlugin(err)
		}
		return dockerplugin.RequestAddressResponse{Address: netip.PrefixFrom(a.Addr(), pool.Bits()).String()}, nil
	}
	a, err := netip.ParseAddr(req.Address)
	if err != nil || !pool.Contains(a) {
		return dockerplugin.RequestAddressResponse{}, badPlugin("address %q is not in subnet %v", req.Address, pool)
	}
	if a == pool.Addr() || a == ipv4.Last(pool) {
		return dockerplugin.RequestAddressResponse{}, badPlugin("address %v is the network or broadcast address of %v", a, pool)
	}
	// An ID of its own: a second request for the address, even at the
	// same moment, finds it taken.
	id := dockerIPAMPrefix + nonce()
	_, err = p.d.Claim(ctx, id, netip.PrefixFrom(a, pool.Bits()))
	if ctx.Err() != nil {
		p.d.Release(context.WithoutCancel(ctx), id, netip.Addr{}) // as above
		return dockerplugin.RequestAddressResponse{}, ctx.Err()
	}
	if err != nil {
		return dockerplugin.RequestAddressResponse{}, apiToPlugin(err)
	}
	return dockerplugin.RequestAddressResponse{Address: netip.PrefixFrom(a, pool.Bits()).String()}, nil
}

// ReleaseAddress gives an address back to IPAM, with its names. The
// gateway and addresses already free are no-ops; an address held by
// something other than Docker is refused.
func (p *plugin) ReleaseAddress(ctx context.Context, poolID, address string) error {
	pool, _, err := p.parsePoolID(poolID)
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
		return badPlugin("address %q is not in subnet %v", address, pool)
	}
	if a == pool.Addr() {
		return nil
	}
	owner, ok := p.owner(ctx, a)
	if !ok {
		return nil
	}
	if !strings.HasPrefix(owner, dockerIPAMPrefix) {
		return badPlugin("address %v is held by %s, not by Docker", a, owner)
	}
	return apiToPlugin(p.d.Release(ctx, owner, a))
}

// owner is the IPAM ID holding address a here.
func (p *plugin) owner(ctx context.Context, a netip.Addr) (string, bool) {
	st, err := p.d.alloc.Status(ctx)
	if err != nil {
		return "", false
	}
	for _, o := range st.Owned {
		if o.Addr.Addr() == a {
			return o.Ident, true
		}
	}
	return "", false
}

// apiToPlugin turns the API's request errors into the plugin protocol's.
func apiToPlugin(err error) error {
	if err != nil && errors.Is(err, api.ErrBadRequest) {
		return badPlugin("%s", strings.TrimPrefix(err.Error(), api.ErrBadRequest.Error()+": "))
	}
	return err
}

func nonce() string {
	var b [8]byte
	crand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// attachments lists the plugin's endpoints for ps.
func (p *plugin) attachments() []api.Attachment {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []api.Attachment
	for _, id := range slices.Sorted(maps.Keys(p.st.Endpoints)) {
		e := p.st.Endpoints[id]
		cid := e.Container
		if cid == "" {
			cid = e.ID
		}
		out = append(out, api.Attachment{ID: cid, NetNS: e.Sandbox, HostIface: e.HostIface, MAC: e.MAC,
			Addresses: []netip.Prefix{e.Address}})
	}
	return out
}

// status is the plugin's section of the status.
func (p *plugin) status() api.PluginStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	c := p.d.cfg
	return api.PluginStatus{Enabled: true, DriverName: c.PluginName, Socket: filepath.Join(c.PluginDir, c.PluginName+".sock"),
		Network: c.DockerNetwork, Networks: len(p.st.Networks), Endpoints: len(p.st.Endpoints)}
}

// adopt records a network of our driver that Docker has and we do not
// know (our state was lost, or the network came from another run).
func (p *plugin) adopt(id string, pool netip.Prefix, dockerIPAM bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.st.Networks[id]; ok || !pool.IsValid() {
		return
	}
	p.st.Networks[id] = &pluginstate.Network{ID: id, Pool: pool, DockerIPAM: dockerIPAM}
	p.d.log.Info("docker network of our driver recorded", zap.String("network", id), zap.Stringer("subnet", pool))
	if err := p.saveLocked(); err != nil {
		p.d.log.Warn("saving the plugin's state", zap.Error(err))
	}
}

// ours reports whether Docker network id is one of the plugin's.
func (p *plugin) ours(id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.st.Networks[id]
	return ok
}

// containers are the Docker containers of the plugin's endpoints.
func (p *plugin) containers() map[string]bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	ids := map[string]bool{}
	for _, e := range p.st.Endpoints {
		if e.Container != "" {
			ids[e.Container] = true
		}
	}
	return ids
}

// setContainer records which container an endpoint belongs to.
func (p *plugin) setContainer(endpointID, container string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if e, ok := p.st.Endpoints[endpointID]; ok && e.Container != container {
		e.Container = container
		if err := p.saveLocked(); err != nil {
			p.d.log.Warn("saving the plugin's state", zap.Error(err))
		}
	}
}
