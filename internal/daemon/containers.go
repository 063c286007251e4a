package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sys/unix"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/atomicfile"
	"github.com/overlayd/overlayd/internal/attach"
	"github.com/overlayd/overlayd/internal/containers"
	"github.com/overlayd/overlayd/internal/logx"
)

// attachFile keeps the attached containers across restarts.
const attachFile = "attached.json"

// containerTick is the containers' clock: a check of which veths exist,
// and the grace periods' unit.
const containerTick = time.Second

// netnsEtc is where ip netns exec finds a namespace's own /etc files.
const netnsEtc = "/etc/netns"

// containerShell owns the containers' table (package containers) on one
// goroutine, Run's, and carries out what it decides: veths removed,
// addresses released, the table saved. Requests reach it through do.
type containerShell struct {
	d     *Daemon
	path  string
	table *containers.Table // Run's goroutine's; New's before Run
	calls chan containerCall
	// stopped is closed when Run returns, so that calls fail instead of
	// waiting for it.
	stopped chan struct{}
	// unsaved says the last save failed: the next apply saves again.
	unsaved bool // Run's goroutine's
}

type containerCall struct {
	fn   func(*containers.Table) error
	done chan error // room for one
}

var errContainersStopped = errors.New("the containers' table has stopped")

// newContainerShell loads the table saved at path, and has the keeper
// keep the routes of the veths listed.
func newContainerShell(d *Daemon, path string) (*containerShell, error) {
	b, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	grace := int((d.cfg.ReleaseGrace + containerTick - 1) / containerTick)
	log := d.log.Named("containers")
	t, err := containers.New(containers.Config{GraceTicks: grace, Logf: logx.Printf(log, zapcore.InfoLevel)}, b)
	if err != nil {
		return nil, fmt.Errorf("%s: %v: restore it, or remove it to forget the containers it lists", path, err)
	}
	for _, a := range t.List() {
		d.keeper.SetHost(a.HostIface, addrsOf(a.Addresses))
	}
	return &containerShell{d: d, path: path, table: t, calls: make(chan containerCall), stopped: make(chan struct{})}, nil
}

// do runs fn on the table's goroutine, then carries out and saves what
// changed; it returns fn's error, or else the save's.
func (c *containerShell) do(ctx context.Context, fn func(*containers.Table) error) error {
	call := containerCall{fn: fn, done: make(chan error, 1)}
	select {
	case c.calls <- call:
	case <-ctx.Done():
		return ctx.Err()
	case <-c.stopped:
		return errContainersStopped
	}
	select {
	case err := <-call.done:
		return err
	case <-c.stopped:
		select {
		case err := <-call.done: // done just as Run ended: the answer stands
			return err
		default:
		}
		return errContainersStopped
	}
}

// Run owns the table until ctx ends: it follows the kernel's link
// deletions (a container's namespace went away), checks every tick which
// veths exist, and releases the containers gone longer than the grace
// period.
func (c *containerShell) Run(ctx context.Context) error {
	defer close(c.stopped)
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		// Deletions start the grace period at once; the tick is the
		// fallback, and what ends grace periods.
		gone := func(host string) {
			c.do(ctx, func(t *containers.Table) error { t.Gone(host); return nil })
		}
		for ctx.Err() == nil {
			if err := attach.WatchGone(ctx, gone); err != nil {
				c.d.log.Warn("following link deletions; the once-a-second check stands in", zap.Error(err))
				select {
				case <-ctx.Done():
				case <-time.After(5 * time.Second):
				}
			}
		}
	})
	tick := time.NewTicker(containerTick)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			present := map[string]bool{}
			for _, h := range c.table.Hosts() {
				present[h] = attach.Exists(h)
			}
			c.table.Observe(present)
			c.table.Tick()
			if err := c.apply(ctx); err != nil {
				c.d.log.Error("saving the attached containers", zap.Error(err))
			}
		case call := <-c.calls:
			err := call.fn(c.table)
			if serr := c.apply(ctx); err == nil {
				err = serr
			}
			call.done <- err
		}
	}
}

// apply carries out the table's Ready: the containers whose grace ended
// lose their veth, resolv.conf, addresses and names, and go from the table
// (one whose addresses could not be released stays, and is tried again at
// the next tick); then the table is saved. A failed save is tried again
// at the next apply.
func (c *containerShell) apply(ctx context.Context) error {
	rd := c.table.Ready()
	for _, a := range rd.Released {
		removeResolvConf(a.ID)
		c.d.keeper.SetHost(a.HostIface, nil)
		if err := attach.Detach(a.HostIface); err != nil {
			c.d.log.Warn("removing the veth of a container gone", zap.String("container", a.ID), zap.Error(err))
		}
		if err := c.d.release(context.WithoutCancel(ctx), a.ID, a.Addresses); err != nil {
			c.d.log.Warn("releasing the addresses of a container gone; trying again", zap.String("container", a.ID), zap.Error(err))
			continue
		}
		c.table.Remove(a.ID, nil)
		c.d.log.Info("released the addresses of a container gone", zap.String("container", a.ID), zap.Any("addr", a.Addresses))
	}
	if len(rd.Released) > 0 {
		rd = c.table.Ready()
	}
	state := rd.State
	if state == nil && c.unsaved {
		var err error
		if state, err = containers.EncodeState(c.table.List()); err != nil {
			return err
		}
	}
	c.table.Advance()
	if state == nil {
		return nil
	}
	if err := atomicfile.Write(c.path, state); err != nil {
		c.unsaved = true
		return err
	}
	c.unsaved = false
	return nil
}

// containerMTU is the MTU of a container's veth: the overlay's, at most
// Weave's 1410, which leaves room for encryption.
func (d *Daemon) containerMTU() int { return min(d.mtu, attach.MaxMTU) }

// target resolves TARGET to a namespace path, a container ID and, for a
// Docker container, its name:
//   - a path (the ID is the path);
//   - a PID: its process's namespace (the ID is pid:PID);
//   - a name under /run/netns (the ID is the name);
//   - else a Docker container name or ID (the ID is Docker's full ID).
//
// The path must be a namespace file (on nsfs), so that nothing is
// allocated for a target that cannot be attached.
func (d *Daemon) target(ctx context.Context, t string) (path, id, name string, err error) {
	_, pidErr := strconv.ParseUint(t, 10, 31)
	switch {
	case t == "":
		return "", "", "", api.BadRequest("no target given")
	case strings.Contains(t, "/"):
		path, id = filepath.Clean(t), filepath.Clean(t)
	case pidErr == nil:
		path, id = filepath.Join("/proc", t, "ns/net"), "pid:"+t
		if _, err := os.Stat(filepath.Join("/proc", t)); err != nil {
			return "", "", "", api.BadRequest("there is no process %s", t)
		}
	case isNetns(filepath.Join("/run/netns", t)):
		path, id = filepath.Join("/run/netns", t), t
	default:
		return d.dockerTarget(ctx, t)
	}
	if !isNetns(path) {
		return "", "", "", api.BadRequest("%s is not a network namespace (a name under /run/netns or the path of one, a PID, or a Docker container)", t)
	}
	return path, id, "", nil
}

// isNetns reports whether path is a namespace file.
func isNetns(path string) bool {
	var fs unix.Statfs_t
	return unix.Statfs(path, &fs) == nil && fs.Type == unix.NSFS_MAGIC
}

// Attach implements api.Backend: addresses from IPAM (or the CIDRs,
// claimed), the veth pair, and the name in DNS.
func (d *Daemon) Attach(ctx context.Context, req api.AttachRequest) (api.Attachment, error) {
	path, id, dockerName, err := d.target(ctx, req.Target)
	if err != nil {
		return api.Attachment{}, err
	}
	if req.Name == "" && dockerName != "" && d.names != nil {
		req.Name = dockerName // a Docker container is known by its name
	}
	var a containers.Attachment
	var addrs []netip.Prefix
	for try := 0; ; try++ {
		a, addrs, err = d.attach(ctx, path, id, req)
		if !errors.Is(err, errReleasedMeanwhile) || try > 0 {
			break
		}
	}
	if err != nil {
		return api.Attachment{}, err
	}
	if req.Name != "" {
		for _, p := range addrs {
			_, err := d.DNSAdd(ctx, api.DNSRequest{Addresses: []netip.Addr{p.Addr()}, Name: req.Name, ContainerID: id})
			if err != nil && !errors.Is(err, api.ErrDNSOff) {
				return apiAttachment(a), err
			}
		}
	}
	if path == filepath.Join("/run/netns", id) && d.names != nil {
		if err := d.writeResolvConf(ctx, id); err != nil {
			d.log.Warn("writing the container's resolv.conf", zap.String("container", id), zap.Error(err))
		}
	}
	d.log.Info("attached", zap.String("container", id), zap.Any("addr", a.Addresses), zap.String("name", a.Name))
	return apiAttachment(a), nil
}

// errReleasedMeanwhile says a container's grace period ended, and its
// addresses went, while it was being attached again: attach it anew.
var errReleasedMeanwhile = errors.New("the container's addresses were released meanwhile")

// attach gets the addresses (not on the table's goroutine: the allocator
// may wait), then plumbs the container and records it. Addresses it got
// for a container that was not attached are released again when the
// plumbing fails.
func (d *Daemon) attach(ctx context.Context, path, id string, req api.AttachRequest) (containers.Attachment, []netip.Prefix, error) {
	var before bool
	if err := d.boxes.do(ctx, func(t *containers.Table) error { _, before = t.Get(id); return nil }); err != nil {
		return containers.Attachment{}, nil, err
	}
	var addrs []netip.Prefix
	undo := func() {
		if !before {
			d.release(context.WithoutCancel(ctx), id, addrs)
		}
	}
	if len(req.CIDRs) == 0 {
		p, err := d.Alloc(ctx, id, netip.Prefix{})
		if err != nil {
			return containers.Attachment{}, nil, err
		}
		addrs = append(addrs, p)
	}
	for _, p := range req.CIDRs {
		if d.alloc != nil {
			var err error
			if p, err = d.Claim(ctx, id, p); err != nil {
				undo()
				return containers.Attachment{}, nil, err
			}
		}
		addrs = append(addrs, p)
	}
	var a containers.Attachment
	plumbed := false
	err := d.boxes.do(ctx, func(t *containers.Table) error {
		var existed bool
		a, existed = t.Get(id)
		if before && !existed {
			return errReleasedMeanwhile
		}
		if !existed {
			a = containers.Attachment{ID: id, NetNS: path, HostIface: containers.HostIface(id)}
		}
		for _, p := range addrs {
			if !slices.Contains(a.Addresses, p) {
				a.Addresses = append(a.Addresses, p)
			}
		}
		var routes []netip.Prefix
		for _, p := range a.Addresses {
			if m := p.Masked(); !slices.Contains(routes, m) {
				routes = append(routes, m)
			}
		}
		mac, err := attach.Attach(attach.Spec{NetNS: path, Host: a.HostIface, MTU: d.containerMTU(), Addrs: a.Addresses, Routes: routes})
		if err != nil {
			return err
		}
		plumbed = true
		a.MAC = mac
		if req.Name != "" {
			a.Name = req.Name
		}
		t.Put(a)
		d.keeper.SetHost(a.HostIface, addrsOf(a.Addresses))
		return nil
	})
	if err != nil && !plumbed && !errors.Is(err, errReleasedMeanwhile) {
		// Nothing holds the addresses but this call. (A failure to save
		// the table after the plumbing keeps them: the container has
		// them.)
		undo()
	}
	return a, addrs, err
}

// Detach implements api.Backend: without CIDRs the veth pair goes and
// every address is released (with its names); with CIDRs only those.
func (d *Daemon) Detach(ctx context.Context, req api.AttachRequest) error {
	_, id, _, terr := d.target(ctx, req.Target)
	var gone []netip.Prefix
	err := d.boxes.do(ctx, func(t *containers.Table) error {
		if terr != nil {
			// A container already gone can still be detached: by the
			// ID or name it was attached under, or a prefix of its
			// Docker ID.
			id = req.Target
			switch found := t.Find(req.Target); len(found) {
			case 0:
			case 1:
				id = found[0]
			default:
				return api.BadRequest("%s matches %d containers (%s): give its whole ID", req.Target, len(found), strings.Join(found, ", "))
			}
		}
		a, ok := t.Get(id)
		if !ok {
			return api.BadRequest("%s is not attached", req.Target)
		}
		for _, p := range req.CIDRs {
			i := slices.IndexFunc(a.Addresses, func(q netip.Prefix) bool { return q.Addr() == p.Addr() })
			if i < 0 {
				return api.BadRequest("%s does not have %v", req.Target, p.Addr())
			}
			gone = append(gone, a.Addresses[i])
		}
		if len(gone) == 0 || len(gone) == len(a.Addresses) {
			d.keeper.SetHost(a.HostIface, nil)
			if err := attach.Detach(a.HostIface); err != nil {
				d.keeper.SetHost(a.HostIface, addrsOf(a.Addresses))
				return err
			}
			removeResolvConf(id)
			gone = a.Addresses
			t.Remove(id, nil)
			return nil
		}
		left := slices.DeleteFunc(slices.Clone(a.Addresses), func(p netip.Prefix) bool { return slices.Contains(gone, p) })
		d.keeper.SetHost(a.HostIface, addrsOf(left))
		if err := attach.RemoveAddrs(attach.Spec{NetNS: a.NetNS, Host: a.HostIface}, gone); err != nil {
			d.keeper.SetHost(a.HostIface, addrsOf(a.Addresses))
			return err
		}
		t.Remove(id, gone)
		return nil
	})
	if err != nil {
		return err
	}
	// The container is gone from the table: its addresses go whatever
	// the caller's context.
	if err := d.release(context.WithoutCancel(ctx), id, gone); err != nil {
		d.log.Warn("releasing a detached container's addresses", zap.String("container", id), zap.Error(err))
	}
	d.log.Info("detached", zap.String("container", id), zap.Any("addr", gone))
	return nil
}

// died tells the table that Docker container id died: an attached one
// starts its grace period at once.
func (d *Daemon) died(ctx context.Context, id string) {
	d.boxes.do(ctx, func(t *containers.Table) error { t.Died(id); return nil })
}

// Ps implements api.Backend.
func (d *Daemon) Ps(ctx context.Context) (api.PsResponse, error) {
	ps := api.PsResponse{Peer: d.name, Exposed: d.exposedAddrs(), Containers: []api.Attachment{}}
	if ps.Exposed == nil {
		ps.Exposed = []netip.Prefix{}
	}
	var list []containers.Attachment
	if err := d.boxes.do(ctx, func(t *containers.Table) error { list = t.List(); return nil }); err != nil {
		return ps, err
	}
	for _, a := range list {
		ps.Containers = append(ps.Containers, apiAttachment(a))
	}
	if d.driver != nil {
		ps.Containers = append(ps.Containers, d.driver.Attachments()...)
	}
	return ps, nil
}

func apiAttachment(a containers.Attachment) api.Attachment {
	return api.Attachment{ID: a.ID, NetNS: a.NetNS, HostIface: a.HostIface, MAC: a.MAC, Addresses: a.Addresses, Name: a.Name, Lost: a.Lost}
}

// addrsOf lists the addresses of prefixes.
func addrsOf(ps []netip.Prefix) []netip.Addr {
	out := make([]netip.Addr, len(ps))
	for i, p := range ps {
		out[i] = p.Addr()
	}
	return out
}

// writeResolvConf points a named namespace's resolver at our DNS server,
// with the domain to search, so that `ip netns exec NAME ping web2`
// works. The server is reached at this host's overlay address: one is
// exposed (from IPAM) if the host has none.
func (d *Daemon) writeResolvConf(ctx context.Context, name string) error {
	addr := d.names.listen.Addr()
	if addr.IsUnspecified() {
		if len(d.exposedAddrs()) == 0 && d.alloc != nil {
			if _, err := d.Expose(ctx, netip.Prefix{}); err != nil {
				return fmt.Errorf("exposing an address for the DNS server: %w", err)
			}
		}
		a, err := netip.ParseAddr(d.dnsAddress())
		if err != nil {
			return errors.New("this host has no overlay address for the DNS server: expose one")
		}
		addr = a
	}
	dir := filepath.Join(netnsEtc, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	body := fmt.Sprintf("# written by overlayd attach\nnameserver %v\nsearch %s\n", addr, strings.TrimSuffix(d.cfg.DNSDomain, "."))
	// Readable by every program in the namespace, as /etc/resolv.conf is.
	return atomicfile.WriteMode(filepath.Join(dir, "resolv.conf"), []byte(body), 0o644)
}

// removeResolvConf undoes writeResolvConf, if it wrote the file.
func removeResolvConf(name string) {
	p := filepath.Join(netnsEtc, name, "resolv.conf")
	if b, err := os.ReadFile(p); err == nil && strings.HasPrefix(string(b), "# written by overlayd attach") {
		os.Remove(p)
		os.Remove(filepath.Dir(p)) // only if empty
	}
}
