package dockerplugin

import (
	"context"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/pluginstate"
)

// EnsureNetwork creates the network of DriverConfig.Network with the driver
// as its network and IPAM driver, unless it exists (one of another driver
// is left alone, with a warning). It retries until Docker answers, or ctx
// ends.
func (d *Driver) EnsureNetwork(ctx context.Context) error {
	name, driver := d.cfg.Network, d.cfg.Name
	if name == "" {
		return nil
	}
	for wait := time.Second; ; wait = min(2*wait, 30*time.Second) {
		existing, err := d.engine.CreateNetwork(ctx, name, driver, d.cfg.DefaultSubnet)
		switch {
		case err == nil && existing == "":
			d.log.Info("created the Docker network", zap.String("network", name), zap.String("driver", driver),
				zap.Stringer("subnet", d.cfg.DefaultSubnet))
			return nil
		case err == nil && existing != driver:
			d.log.Warn("the Docker network exists with another driver; leaving it alone", zap.String("network", name),
				zap.String("driver", existing))
			return nil
		case err == nil:
			return nil
		}
		d.log.Warn("creating the Docker network; retrying", zap.String("network", name), zap.Error(err), zap.Duration("in", wait))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}

// ContainerStarted registers the names of a container on the driver's
// networks, <container name>.<domain> and its hostname.domainname and
// aliases inside the domain, and records which container each of its
// endpoints belongs to.
func (d *Driver) ContainerStarted(ctx context.Context, c Container) {
	for _, ep := range c.Endpoints {
		if !d.ours(ep.NetworkID) || !ep.Addr.IsValid() {
			continue
		}
		d.setContainer(ep.EndpointID, c.ID)
		if d.names == nil {
			continue
		}
		for _, name := range containerNames(c.Name, c.Hostname, c.Domainname, ep.Aliases, d.cfg.Domain) {
			if err := d.names.Register(ctx, name, ep.Addr, c.ID); err != nil {
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

// Reconcile brings the driver in line with Docker, as after a restart or
// when Docker's events resume: networks of our driver it does not know
// are recorded (the state was lost, or they come from another run);
// endpoints whose container went away while nobody told us (Docker does
// not list them as connected, and their veth is gone, or Docker took them
// out of their container, or the namespace they joined is gone) lose their
// veth and their address; the running containers' names are registered,
// and the names of its containers no longer running removed.
func (d *Driver) Reconcile(ctx context.Context) error {
	nets, err := d.engine.Networks(ctx, d.cfg.Name)
	if err != nil {
		return err
	}
	connected := map[string]bool{}
	for _, n := range nets {
		d.adopt(n.ID, n.Subnet, n.ForeignIPAM)
		for _, ep := range n.Endpoints {
			connected[ep] = true
		}
	}
	// The containers whose names the driver registered, before it
	// forgets any endpoint.
	ours := d.containers()
	d.mu.Lock()
	var gone []*pluginstate.Endpoint
	for _, id := range slices.Sorted(maps.Keys(d.st.Endpoints)) {
		e := d.st.Endpoints[id]
		dead := !d.links.Exists(e.HostIface) || e.Left || e.Sandbox != "" && !d.links.IsNetns(e.Sandbox)
		if connected[id] || !dead {
			continue
		}
		if err := d.links.Remove(e.HostIface); err != nil {
			d.links.Keep(e.HostIface, e.Address) // still ours: its route stays kept
			d.log.Warn("removing the veth of a gone endpoint", zap.String("endpoint", id), zap.Error(err))
			continue
		}
		gone = append(gone, e)
		delete(d.st.Endpoints, id)
	}
	if len(gone) > 0 {
		if err := d.saveLocked(); err != nil {
			d.log.Warn("saving the plugin's state", zap.Error(err))
		}
	}
	d.mu.Unlock()
	for _, e := range gone {
		d.log.Info("forgetting a Docker endpoint whose container is gone", zap.String("endpoint", e.ID), zap.Stringer("addr", e.Address))
		if e.Claimed {
			d.unclaim(e.ID, e.Address)
			continue
		}
		// An address of our IPAM that Docker could not release.
		if owner, ok := d.ipam.Holder(ctx, e.Address.Addr()); ok && strings.HasPrefix(owner, DockerIPAMPrefix) &&
			!strings.HasPrefix(owner, claimID("")) {
			if err := d.ipam.Release(ctx, owner, e.Address.Addr()); err != nil {
				d.log.Warn("releasing the address of a gone endpoint", zap.String("endpoint", e.ID), zap.Error(err))
			}
		}
	}
	running, err := d.engine.Running(ctx)
	if err != nil {
		return err
	}
	up := map[string]bool{}
	for _, c := range running {
		up[c.ID] = true
		d.ContainerStarted(ctx, c)
	}
	// The driver's names of containers that stopped while nobody told
	// us. (Names registered otherwise are not the driver's to judge.)
	if d.names != nil {
		for _, id := range slices.Sorted(maps.Keys(ours)) {
			if up[id] {
				continue
			}
			d.log.Info("removing the names of a container no longer running", zap.String("container", id))
			if err := d.names.Forget(ctx, id); err != nil {
				d.log.Warn("removing the names of a container no longer running", zap.String("container", id), zap.Error(err))
			}
		}
	}
	return nil
}

// adopt records a network of our driver that Docker has and we do not
// know.
func (d *Driver) adopt(id string, pool netip.Prefix, dockerIPAM bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.st.Networks[id]; ok || !pool.IsValid() {
		return
	}
	d.st.Networks[id] = &pluginstate.Network{ID: id, Pool: pool, DockerIPAM: dockerIPAM}
	d.log.Info("docker network of our driver recorded", zap.String("network", id), zap.Stringer("subnet", pool))
	if err := d.saveLocked(); err != nil {
		d.log.Warn("saving the plugin's state", zap.Error(err))
	}
}

// ours reports whether Docker network id is one of the driver's.
func (d *Driver) ours(id string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	_, ok := d.st.Networks[id]
	return ok
}

// containers are the Docker containers of the driver's endpoints.
func (d *Driver) containers() map[string]bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	ids := map[string]bool{}
	for _, e := range d.st.Endpoints {
		if e.Container != "" {
			ids[e.Container] = true
		}
	}
	return ids
}

// setContainer records which container an endpoint belongs to.
func (d *Driver) setContainer(endpointID, container string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if e, ok := d.st.Endpoints[endpointID]; ok && e.Container != container {
		e.Container = container
		if err := d.saveLocked(); err != nil {
			d.log.Warn("saving the plugin's state", zap.Error(err))
		}
	}
}
