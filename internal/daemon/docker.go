package daemon

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/moby/moby/api/types/events"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"
	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/attach"
	"github.com/overlayd/overlayd/internal/dockerplugin"
)

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
func (d *Daemon) dockerTarget(ctx context.Context, t string) (path, id, name string, err error) {
	if d.docker == nil {
		return "", "", "", api.BadRequest("%s is not a network namespace (a name under /run/netns, or a path) or a PID; Docker containers need --docker-api", t)
	}
	r, err := d.docker.ContainerInspect(ctx, t, client.ContainerInspectOptions{})
	switch {
	case errdefs.IsNotFound(err):
		return "", "", "", api.BadRequest("%s is not a network namespace (a name under /run/netns, or a path), a PID or a Docker container", t)
	case err != nil:
		return "", "", "", api.BadRequest("%s: asking Docker: %v", t, err)
	}
	c := r.Container
	if c.State == nil || !c.State.Running || c.State.Pid == 0 {
		return "", "", "", api.BadRequest("Docker container %s is not running", t)
	}
	return fmt.Sprintf("/proc/%d/ns/net", c.State.Pid), c.ID, strings.TrimPrefix(c.Name, "/"), nil
}

// watchDocker follows Docker's container events: a container that starts
// gets its names from the driver, one that dies loses its names, and an
// attached one starts its grace period at once. It reconnects after
// Docker restarts, and reconciles each time: events missed meanwhile are
// made up for.
func (d *Daemon) watchDocker(ctx context.Context) error {
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

func (d *Daemon) followDocker(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ev := d.docker.Events(ctx, client.EventsListOptions{
		Filters: make(client.Filters).Add("type", string(events.ContainerEventType)).Add("event", "start", "die")})
	if d.driver != nil {
		if err := d.driver.Reconcile(ctx); err != nil {
			return err
		}
	}
	eng := dockerEngine{d.docker, d.log}
	for {
		select {
		case m := <-ev.Messages:
			switch m.Action {
			case events.ActionStart:
				if d.driver == nil {
					continue
				}
				c, err := eng.container(ctx, m.Actor.ID)
				if err != nil {
					if !errdefs.IsNotFound(err) {
						d.log.Warn("inspecting a started container", zap.String("container", m.Actor.ID), zap.Error(err))
					}
					continue
				}
				d.driver.ContainerStarted(ctx, c)
			case events.ActionDie:
				d.dockerDied(ctx, m.Actor.ID)
			}
		case err := <-ev.Err:
			return err
		}
	}
}

// dockerDied removes a container's names; an attached container starts
// its grace period.
func (d *Daemon) dockerDied(ctx context.Context, id string) {
	if d.names != nil {
		if _, err := d.DNSRemove(ctx, api.DNSRequest{ContainerID: id}); err != nil && !api.IsBadRequest(err) {
			d.log.Warn("removing a dead container's names", zap.String("container", id), zap.Error(err))
		}
	}
	d.died(ctx, id)
}

// dockerEngine is the Docker engine as the driver sees it.
type dockerEngine struct {
	c   *client.Client
	log *zap.Logger
}

func (e dockerEngine) Networks(ctx context.Context, driver string) ([]dockerplugin.EngineNetwork, error) {
	nets, err := e.c.NetworkList(ctx, client.NetworkListOptions{Filters: make(client.Filters).Add("driver", driver)})
	if err != nil {
		return nil, err
	}
	var out []dockerplugin.EngineNetwork
	for _, n := range nets.Items {
		r, err := e.c.NetworkInspect(ctx, n.ID, client.NetworkInspectOptions{})
		if errdefs.IsNotFound(err) {
			continue // deleted since the list
		}
		if err != nil {
			return nil, err
		}
		en := dockerplugin.EngineNetwork{ID: n.ID, ForeignIPAM: r.Network.IPAM.Driver != driver}
		if len(r.Network.IPAM.Config) > 0 {
			en.Subnet = r.Network.IPAM.Config[0].Subnet
		}
		for _, c := range r.Network.Containers {
			en.Endpoints = append(en.Endpoints, c.EndpointID)
		}
		out = append(out, en)
	}
	return out, nil
}

func (e dockerEngine) Running(ctx context.Context) ([]dockerplugin.Container, error) {
	list, err := e.c.ContainerList(ctx, client.ContainerListOptions{})
	if err != nil {
		return nil, err
	}
	var out []dockerplugin.Container
	for _, item := range list.Items {
		c, err := e.container(ctx, item.ID)
		switch {
		case errdefs.IsNotFound(err): // gone since the list
		case err != nil:
			// One container Docker cannot describe does not stop the
			// others' names; its start event, if any, comes again.
			e.log.Warn("inspecting a running container", zap.String("container", item.ID), zap.Error(err))
		default:
			out = append(out, c)
		}
	}
	return out, nil
}

// container inspects one container.
func (e dockerEngine) container(ctx context.Context, id string) (dockerplugin.Container, error) {
	r, err := e.c.ContainerInspect(ctx, id, client.ContainerInspectOptions{})
	if err != nil {
		return dockerplugin.Container{}, err
	}
	c := r.Container
	out := dockerplugin.Container{ID: c.ID, Name: strings.TrimPrefix(c.Name, "/")}
	if c.Config != nil {
		out.Hostname, out.Domainname = c.Config.Hostname, c.Config.Domainname
	}
	if c.NetworkSettings != nil {
		for _, ep := range c.NetworkSettings.Networks {
			if ep != nil {
				out.Endpoints = append(out.Endpoints, dockerplugin.ContainerEndpoint{NetworkID: ep.NetworkID, EndpointID: ep.EndpointID,
					Addr: ep.IPAddress, Aliases: ep.Aliases})
			}
		}
	}
	return out, nil
}

func (e dockerEngine) CreateNetwork(ctx context.Context, name, driver string, subnet netip.Prefix) (string, error) {
	r, err := e.c.NetworkInspect(ctx, name, client.NetworkInspectOptions{})
	if err == nil {
		return r.Network.Driver, nil
	}
	if !errdefs.IsNotFound(err) {
		return "", err
	}
	_, err = e.c.NetworkCreate(ctx, name, client.NetworkCreateOptions{Driver: driver,
		IPAM: &network.IPAM{Driver: driver, Config: []network.IPAMConfig{{Subnet: subnet}}}})
	if errdefs.IsConflict(err) {
		return driver, nil // made meanwhile
	}
	return "", err
}

// driverLinks are the veth pairs of the driver's endpoints, whose routes
// the keeper keeps.
type driverLinks struct{ d *Daemon }

func (l driverLinks) Pair(host, inner string, mtu int, mac net.HardwareAddr, addr netip.Prefix) (string, error) {
	got, err := attach.Pair(host, inner, mtu, mac, []netip.Prefix{addr})
	if err == nil {
		l.d.keeper.SetHost(host, []netip.Addr{addr.Addr()})
	}
	return got, err
}

func (l driverLinks) Keep(host string, addr netip.Prefix) {
	l.d.keeper.SetHost(host, []netip.Addr{addr.Addr()})
}

func (l driverLinks) Remove(host string) error {
	l.d.keeper.SetHost(host, nil)
	return attach.Detach(host)
}

func (l driverLinks) Exists(host string) bool  { return attach.Exists(host) }
func (l driverLinks) IsNetns(path string) bool { return isNetns(path) }
