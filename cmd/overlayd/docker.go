package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/moby/moby/api/types/events"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"
	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/attach"
	"github.com/overlayd/overlayd/internal/pluginstate"
)

// dockerAPIDefault is $DOCKER_HOST, else Docker's own socket.
func dockerAPIDefault() string {
	if h := os.Getenv("DOCKER_HOST"); h != "" {
		return h
	}
	return "unix:///var/run/docker.sock"
}

// dockerSocketExists reports whether a unix API address names an existing
// socket: without one there is no Docker to follow.
func dockerSocketExists(addr string) bool {
	p, ok := strings.CutPrefix(addr, "unix://")
	if !ok {
		return true
	}
	fi, err := os.Stat(p)
	return err == nil && fi.Mode()&os.ModeSocket != 0
}

// newDockerClient connects lazily: nothing is dialled until a call.
func newDockerClient(addr string) (*client.Client, error) {
	c, err := client.New(client.WithHost(addr), client.WithAPIVersionNegotiation())
	if err != nil {
		return nil, fmt.Errorf("docker API %s: %w", addr, err)
	}
	return c, nil
}

// dockerTarget resolves a Docker container name or ID to its network
// namespace (through its process) and its full ID and name.
func (d *daemon) dockerTarget(ctx context.Context, t string) (path, id, name string, err error) {
	if d.docker == nil {
		return "", "", "", fmt.Errorf("%w: %s is not a network namespace (a name under /run/netns, or a path) or a PID; Docker containers need --docker-api", api.ErrBadRequest, t)
	}
	r, err := d.docker.ContainerInspect(ctx, t, client.ContainerInspectOptions{})
	switch {
	case errdefs.IsNotFound(err):
		return "", "", "", fmt.Errorf("%w: %s is not a network namespace (a name under /run/netns, or a path), a PID or a Docker container", api.ErrBadRequest, t)
	case err != nil:
		return "", "", "", fmt.Errorf("%w: %s: asking Docker: %v", api.ErrBadRequest, t, err)
	}
	c := r.Container
	if c.State == nil || !c.State.Running || c.State.Pid == 0 {
		return "", "", "", fmt.Errorf("%w: Docker container %s is not running", api.ErrBadRequest, t)
	}
	return fmt.Sprintf("/proc/%d/ns/net", c.State.Pid), c.ID, strings.TrimPrefix(c.Name, "/"), nil
}

// watchDocker follows Docker's container events: names of the plugin's
// containers go into DNS when they start and out when they die, and an
// attached container that dies starts its grace period at once. It
// reconnects after Docker restarts, and reconciles each time: events
// missed meanwhile are made up for.
func (d *daemon) watchDocker(ctx context.Context) error {
	wait := time.Second
	for {
		began := time.Now()
		err := d.followDocker(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(began) > time.Minute {
			wait = time.Second // it was following: Docker restarted
		}
		d.log.Warn("following Docker's events; retrying", zap.Error(err), zap.Duration("in", wait))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		wait = min(2*wait, 30*time.Second)
	}
}

func (d *daemon) followDocker(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ev := d.docker.Events(ctx, client.EventsListOptions{
		Filters: make(client.Filters).Add("type", string(events.ContainerEventType)).Add("event", "start", "die")})
	if err := d.reconcileDocker(ctx); err != nil {
		return err
	}
	for {
		select {
		case m := <-ev.Messages:
			switch m.Action {
			case events.ActionStart:
				d.dockerStarted(ctx, m.Actor.ID)
			case events.ActionDie:
				d.dockerDied(ctx, m.Actor.ID)
			}
		case err := <-ev.Err:
			return err
		}
	}
}

// reconcileDocker brings names and endpoints in line with the containers
// running now: names of running containers of our networks are
// registered, names registered here for containers no longer running are
// removed, and plugin endpoints whose veth is gone lose their address.
func (d *daemon) reconcileDocker(ctx context.Context) error {
	list, err := d.docker.ContainerList(ctx, client.ContainerListOptions{})
	if err != nil {
		return err
	}
	running := map[string]bool{}
	var ours map[string]bool // the containers whose names the plugin registered
	if d.plugin != nil {
		ours = d.plugin.containers()
		if err := d.plugin.reconcile(ctx, d.docker); err != nil {
			return err
		}
	}
	for _, c := range list.Items {
		running[c.ID] = true
		d.dockerStarted(ctx, c.ID)
	}
	// The plugin's names: of containers that stopped while we did not
	// follow. (Names registered otherwise are not the plugin's to judge.)
	if d.names != nil && d.plugin != nil {
		st, err := d.DNS(ctx)
		if err != nil {
			return err
		}
		for _, e := range st.Entries {
			if e.Tombstone || e.Origin != d.router.Name() || !ours[e.ContainerID] || running[e.ContainerID] {
				continue
			}
			d.log.Info("removing the names of a container no longer running", zap.String("container", e.ContainerID), zap.String("name", e.Hostname))
			d.DNSRemove(ctx, api.DNSRequest{ContainerID: e.ContainerID})
		}
	}
	return nil
}

// dockerStarted registers the names of a container on one of our
// networks: <container name>.<domain>, its hostname.domainname when that
// is inside the domain, and its aliases that are.
func (d *daemon) dockerStarted(ctx context.Context, id string) {
	if d.plugin == nil {
		return
	}
	r, err := d.docker.ContainerInspect(ctx, id, client.ContainerInspectOptions{})
	if err != nil {
		if !errdefs.IsNotFound(err) {
			d.log.Warn("inspecting a started container", zap.String("container", id), zap.Error(err))
		}
		return
	}
	c := r.Container
	if c.NetworkSettings == nil {
		return
	}
	for _, ep := range c.NetworkSettings.Networks {
		if ep == nil || !d.plugin.ours(ep.NetworkID) || !ep.IPAddress.IsValid() {
			continue
		}
		d.plugin.setContainer(ep.EndpointID, c.ID)
		if d.names == nil {
			continue
		}
		var host, domain string
		if c.Config != nil {
			host, domain = c.Config.Hostname, c.Config.Domainname
		}
		for _, name := range containerNames(c.Name, host, domain, ep.Aliases, d.cfg.DNSDomain) {
			if _, err := d.DNSAdd(ctx, api.DNSRequest{Addresses: []string{ep.IPAddress.String()}, Name: name, ContainerID: c.ID}); err != nil {
				d.log.Warn("registering a container's name", zap.String("container", c.ID), zap.String("name", name), zap.Error(err))
			}
		}
	}
}

// containerNames are the names a container on our network gets in DNS:
// its name in the domain, and its hostname.domainname and network aliases
// when they are inside the domain (Weave's watcher registers the same).
func containerNames(name, hostname, domainname string, aliases []string, domain string) []string {
	var out []string
	add := func(n string) {
		n = strings.ToLower(strings.TrimSuffix(n, ".")) + "."
		if n != "." && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	inDomain := func(n string) bool {
		return strings.HasSuffix(strings.ToLower(strings.TrimSuffix(n, "."))+".", "."+domain)
	}
	add(strings.TrimPrefix(name, "/") + "." + domain)
	if hostname != "" {
		fq := hostname
		if domainname != "" {
			fq += "." + domainname
		}
		if inDomain(fq) {
			add(fq)
		}
	}
	for _, a := range aliases {
		if inDomain(a) {
			add(a)
		}
	}
	return out
}

// dockerDied removes a container's names; an attached container starts
// its grace period.
func (d *daemon) dockerDied(ctx context.Context, id string) {
	if d.names != nil {
		if _, err := d.DNSRemove(ctx, api.DNSRequest{ContainerID: id}); err != nil && !errors.Is(err, api.ErrBadRequest) {
			d.log.Warn("removing a dead container's names", zap.String("container", id), zap.Error(err))
		}
	}
	d.amu.Lock()
	defer d.amu.Unlock()
	if _, ok := d.attached.byID[id]; ok {
		d.attached.dead[id] = true
		if _, gone := d.attached.gone[id]; !gone {
			d.attached.gone[id] = time.Now()
			d.log.Info("container died; its addresses are kept for the grace period", zap.String("container", id),
				zap.Duration("grace", d.cfg.ReleaseGrace))
		}
	}
}

// ensureNetwork creates the Docker network --docker-network with our
// drivers, unless it exists; it retries until Docker answers.
func (d *daemon) ensureNetwork(ctx context.Context) error {
	name, driver := d.cfg.DockerNetwork, d.cfg.PluginName
	for wait := time.Second; ; wait = min(2*wait, 30*time.Second) {
		r, err := d.docker.NetworkInspect(ctx, name, client.NetworkInspectOptions{})
		if err == nil {
			if r.Network.Driver != driver {
				d.log.Warn("the Docker network exists with another driver; leaving it alone", zap.String("network", name), zap.String("driver", r.Network.Driver))
			}
			return nil
		}
		if errdefs.IsNotFound(err) {
			_, err = d.docker.NetworkCreate(ctx, name, client.NetworkCreateOptions{Driver: driver,
				IPAM: &network.IPAM{Driver: driver, Config: []network.IPAMConfig{{Subnet: d.cfg.DefaultSubnet}}}})
			if err == nil || errdefs.IsConflict(err) {
				d.log.Info("created the Docker network", zap.String("network", name), zap.String("driver", driver), zap.Stringer("subnet", d.cfg.DefaultSubnet))
				return nil
			}
		}
		d.log.Warn("creating the Docker network; retrying", zap.String("network", name), zap.Error(err), zap.Duration("in", wait))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}

// reconcile records the networks of our driver that Docker has, and
// forgets endpoints whose container went away while overlayd was down
// (Docker could not tell us): Docker does not list them as connected, and
// their veth is gone, or Docker took them out of their container, or the
// namespace they joined is gone. Their veth goes and their addresses come
// back.
func (p *plugin) reconcile(ctx context.Context, dc *client.Client) error {
	nets, err := dc.NetworkList(ctx, client.NetworkListOptions{Filters: make(client.Filters).Add("driver", p.d.cfg.PluginName)})
	if err != nil {
		return err
	}
	connected := map[string]bool{}
	for _, n := range nets.Items {
		r, err := dc.NetworkInspect(ctx, n.ID, client.NetworkInspectOptions{})
		if errdefs.IsNotFound(err) {
			continue // deleted since the list
		}
		if err != nil {
			return err
		}
		var pool netip.Prefix
		if len(r.Network.IPAM.Config) > 0 {
			pool = r.Network.IPAM.Config[0].Subnet
		}
		p.adopt(n.ID, pool, r.Network.IPAM.Driver != p.d.cfg.PluginName)
		for _, c := range r.Network.Containers {
			connected[c.EndpointID] = true
		}
	}
	p.mu.Lock()
	var gone []*pluginstate.Endpoint
	for id, e := range p.st.Endpoints {
		dead := !attach.Exists(e.HostIface) || e.Left || e.Sandbox != "" && !isNetns(e.Sandbox)
		if connected[id] || !dead {
			continue
		}
		p.d.keeper.SetHost(e.HostIface, nil)
		if err := attach.Detach(e.HostIface); err != nil {
			p.d.log.Warn("removing the veth of a gone endpoint", zap.Error(err))
			continue
		}
		gone = append(gone, e)
		delete(p.st.Endpoints, id)
	}
	if len(gone) > 0 {
		if err := p.saveLocked(); err != nil {
			p.d.log.Warn("saving the plugin's state", zap.Error(err))
		}
	}
	p.mu.Unlock()
	for _, e := range gone {
		p.d.log.Info("forgetting a Docker endpoint whose container is gone", zap.String("endpoint", e.ID), zap.Stringer("addr", e.Address))
		if e.Claimed {
			p.unclaim(e.ID, e.Address)
			continue
		}
		// An address of our IPAM that Docker could not release.
		if owner, ok := p.owner(ctx, e.Address.Addr()); ok && strings.HasPrefix(owner, dockerIPAMPrefix) && !strings.HasPrefix(owner, claimID("")) {
			if err := p.d.Release(ctx, owner, e.Address.Addr()); err != nil {
				p.d.log.Warn("releasing the address of a gone endpoint", zap.Error(err))
			}
		}
	}
	return nil
}
