package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/atomicfile"
	"github.com/overlayd/overlayd/internal/attach"
)

// attachFile keeps the attached containers across restarts.
const attachFile = "attached.json"

// attachments are the containers plumbed into the overlay, by ID.
type attachments struct {
	path string
	byID map[string]*api.Attachment
	gone map[string]time.Time // since when a container's veth is missing
	dead map[string]bool      // Docker said it died: gone even while its veth lingers
}

func loadAttachments(dir string) (*attachments, error) {
	a := &attachments{path: filepath.Join(dir, attachFile), byID: map[string]*api.Attachment{}, gone: map[string]time.Time{},
		dead: map[string]bool{}}
	b, err := os.ReadFile(a.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return a, nil
	case err != nil:
		return nil, err
	}
	var list []*api.Attachment
	if err := json.Unmarshal(b, &list); err != nil {
		return nil, fmt.Errorf("%s is corrupt: %v: restore it, or remove it to forget the containers it lists", a.path, err)
	}
	for _, c := range list {
		a.byID[c.ID] = c
	}
	return a, nil
}

func (a *attachments) save() error {
	list := make([]*api.Attachment, 0, len(a.byID))
	for _, id := range slices.Sorted(maps.Keys(a.byID)) {
		list = append(list, a.byID[id])
	}
	b, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(a.path, b)
}

// target resolves TARGET to a namespace path, a container ID and, for a
// Docker container, its name:
//   - a path (the ID is the path);
//   - a PID: its process's namespace (the ID is pid:PID);
//   - a name under /run/netns (the ID is the name);
//   - else a Docker container name or ID (the ID is Docker's full ID).
//
// The path must be a namespace file (on nsfs), so that nothing is
// allocated for a target that cannot be attached.
func (d *daemon) target(ctx context.Context, t string) (path, id, name string, err error) {
	_, pidErr := strconv.ParseUint(t, 10, 31)
	switch {
	case t == "":
		return "", "", "", fmt.Errorf("%w: no target given", api.ErrBadRequest)
	case strings.Contains(t, "/"):
		path, id = filepath.Clean(t), filepath.Clean(t)
	case pidErr == nil:
		path, id = filepath.Join("/proc", t, "ns/net"), "pid:"+t
		if _, err := os.Stat(filepath.Join("/proc", t)); err != nil {
			return "", "", "", fmt.Errorf("%w: there is no process %s", api.ErrBadRequest, t)
		}
	case isNetns(filepath.Join("/run/netns", t)):
		path, id = filepath.Join("/run/netns", t), t
	default:
		return d.dockerTarget(ctx, t)
	}
	if !isNetns(path) {
		return "", "", "", fmt.Errorf("%w: %s is not a network namespace (a name under /run/netns or the path of one, a PID, or a Docker container)",
			api.ErrBadRequest, t)
	}
	return path, id, "", nil
}

// isNetns reports whether path is a namespace file.
func isNetns(path string) bool {
	var fs unix.Statfs_t
	return unix.Statfs(path, &fs) == nil && fs.Type == unix.NSFS_MAGIC
}

// containerMTU is the MTU of a container's veth: the overlay's, at most
// Weave's 1410, which leaves room for encryption.
func (d *daemon) containerMTU() int { return min(d.mtu, attach.MaxMTU) }

// Attach implements api.Backend: addresses from IPAM (or the CIDRs,
// claimed), the veth pair, and the name in DNS.
func (d *daemon) Attach(ctx context.Context, req api.AttachRequest) (api.Attachment, error) {
	path, id, dockerName, err := d.target(ctx, req.Target)
	if err != nil {
		return api.Attachment{}, err
	}
	if req.Name == "" && dockerName != "" && d.names != nil {
		req.Name = dockerName // a Docker container is known by its name
	}
	var addrs []netip.Prefix
	if len(req.CIDRs) == 0 {
		p, err := d.Alloc(ctx, id, netip.Prefix{})
		if err != nil {
			return api.Attachment{}, err
		}
		addrs = append(addrs, p)
	}
	for _, c := range req.CIDRs {
		p, _ := api.ParseCIDR(c)
		if d.alloc != nil {
			if p, err = d.Claim(ctx, id, p); err != nil {
				return api.Attachment{}, err
			}
		}
		addrs = append(addrs, p)
	}
	d.amu.Lock()
	defer d.amu.Unlock()
	a := d.attached.byID[id]
	if a == nil {
		a = &api.Attachment{ID: id, NetNS: path, HostIface: attach.HostIface(id)}
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
		if d.attached.byID[id] == nil {
			for _, p := range addrs {
				d.Release(context.WithoutCancel(ctx), id, p.Addr())
			}
		}
		return api.Attachment{}, err
	}
	a.MAC = mac
	d.keeper.SetHost(a.HostIface, addrsOf(a.Addresses))
	delete(d.attached.gone, id)
	delete(d.attached.dead, id)
	if req.Name != "" {
		a.Name = req.Name
		for _, p := range addrs {
			if _, err := d.DNSAdd(ctx, api.DNSRequest{Addresses: []string{p.Addr().String()}, Name: req.Name, ContainerID: id}); err != nil && !errors.Is(err, api.ErrDNSOff) {
				return *a, err
			}
		}
	}
	d.attached.byID[id] = a
	if err := d.attached.save(); err != nil {
		return *a, err
	}
	if path == filepath.Join("/run/netns", id) && d.names != nil {
		if err := d.writeResolvConf(ctx, id); err != nil {
			d.log.Warn("writing the container's resolv.conf", zap.String("container", id), zap.Error(err))
		}
	}
	d.log.Info("attached", zap.String("container", id), zap.Any("addr", a.Addresses), zap.String("name", a.Name))
	return *a, nil
}

// Detach implements api.Backend: without CIDRs the veth pair goes and
// every address is released (with its names); with CIDRs only those.
func (d *daemon) Detach(ctx context.Context, req api.AttachRequest) error {
	_, id, _, err := d.target(ctx, req.Target)
	d.amu.Lock()
	defer d.amu.Unlock()
	if err != nil {
		// A container already gone can still be detached: by the ID
		// or name it was attached under, or a prefix of its Docker ID.
		id = req.Target
		for _, a := range d.attached.byID {
			if a.Name == req.Target || len(req.Target) >= 12 && strings.HasPrefix(a.ID, req.Target) {
				id = a.ID
			}
		}
	}
	a := d.attached.byID[id]
	if a == nil {
		return fmt.Errorf("%w: %s is not attached", api.ErrBadRequest, req.Target)
	}
	var gone []netip.Prefix
	for _, c := range req.CIDRs {
		p, _ := api.ParseCIDR(c)
		i := slices.IndexFunc(a.Addresses, func(q netip.Prefix) bool { return q.Addr() == p.Addr() })
		if i < 0 {
			return fmt.Errorf("%w: %s does not have %v", api.ErrBadRequest, req.Target, p.Addr())
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
		delete(d.attached.byID, id)
		delete(d.attached.dead, id)
	} else {
		left := slices.DeleteFunc(slices.Clone(a.Addresses), func(p netip.Prefix) bool { return slices.Contains(gone, p) })
		d.keeper.SetHost(a.HostIface, addrsOf(left))
		if err := attach.RemoveAddrs(attach.Spec{NetNS: a.NetNS, Host: a.HostIface}, gone); err != nil {
			d.keeper.SetHost(a.HostIface, addrsOf(a.Addresses))
			return err
		}
		a.Addresses = left
	}
	if err := d.attached.save(); err != nil {
		return err
	}
	for _, p := range gone {
		if d.alloc != nil {
			if err := d.Release(ctx, id, p.Addr()); err != nil {
				d.log.Warn("releasing a detached address", zap.String("container", id), zap.Stringer("addr", p), zap.Error(err))
			}
		} else {
			d.forgetNames(ctx, p.Addr())
		}
	}
	d.log.Info("detached", zap.String("container", id), zap.Any("addr", gone))
	return nil
}

// netnsEtc is where ip netns exec finds a namespace's own /etc files.
const netnsEtc = "/etc/netns"

// writeResolvConf points a named namespace's resolver at our DNS server,
// with the domain to search, so that `ip netns exec NAME ping web2`
// works. The server is reached at this host's overlay address: one is
// exposed (from IPAM) if the host has none.
func (d *daemon) writeResolvConf(ctx context.Context, name string) error {
	addr := d.names.listen.Addr()
	if addr.IsUnspecified() {
		d.mu.Lock()
		exposed := len(d.exposed) > 0
		d.mu.Unlock()
		if !exposed && d.alloc != nil {
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
	return atomicfile.Write(filepath.Join(dir, "resolv.conf"), []byte(body))
}

// removeResolvConf undoes writeResolvConf, if it wrote the file.
func removeResolvConf(name string) {
	p := filepath.Join(netnsEtc, name, "resolv.conf")
	if b, err := os.ReadFile(p); err == nil && strings.HasPrefix(string(b), "# written by overlayd attach") {
		os.Remove(p)
		os.Remove(filepath.Dir(p)) // only if empty
	}
}

// watchContainers notices containers that went away (their namespace
// was deleted, which takes the veth pair with it) and, after
// --release-grace, releases their addresses and names. A container that
// comes back in time and is attached again keeps them. It also finishes
// what a restart interrupted: attachments whose pair is gone are released
// the same way.
func (d *daemon) watchContainers(ctx context.Context) error {
	go func() {
		// Link deletions start the grace period at once; the ticker
		// below is the fallback, and what ends the grace periods.
		for ctx.Err() == nil {
			if err := attach.WatchGone(ctx, d.vethGone); err != nil {
				d.log.Warn("following link deletions; the once-a-second check stands in", zap.Error(err))
				select {
				case <-ctx.Done():
				case <-time.After(5 * time.Second):
				}
			}
		}
	}()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-tick.C:
			d.reapContainers(ctx, now)
		}
	}
}

// vethGone starts the grace period of the container whose veth went.
func (d *daemon) vethGone(host string) {
	d.amu.Lock()
	defer d.amu.Unlock()
	for id, a := range d.attached.byID {
		if _, ok := d.attached.gone[id]; !ok && a.HostIface == host {
			d.attached.gone[id] = time.Now()
			d.log.Info("container gone; its addresses are kept for the grace period", zap.String("container", id),
				zap.Duration("grace", d.cfg.ReleaseGrace))
		}
	}
}

func (d *daemon) reapContainers(ctx context.Context, now time.Time) {
	d.amu.Lock()
	defer d.amu.Unlock()
	changed := false
	for _, id := range slices.Sorted(maps.Keys(d.attached.byID)) {
		a := d.attached.byID[id]
		// A dead Docker container's namespace, and the veth in it, may
		// outlive it a while (the kernel frees namespaces lazily).
		if attach.Exists(a.HostIface) && !d.attached.dead[id] {
			delete(d.attached.gone, id)
			continue
		}
		since, ok := d.attached.gone[id]
		if !ok {
			d.attached.gone[id] = now
			d.log.Info("container gone; its addresses are kept for the grace period", zap.String("container", id),
				zap.Duration("grace", d.cfg.ReleaseGrace))
			since = now
		}
		if now.Sub(since) < d.cfg.ReleaseGrace {
			continue
		}
		delete(d.attached.gone, id)
		delete(d.attached.dead, id)
		delete(d.attached.byID, id)
		changed = true
		removeResolvConf(id)
		d.keeper.SetHost(a.HostIface, nil)
		if err := attach.Detach(a.HostIface); err != nil {
			d.log.Warn("removing the veth of a container gone", zap.String("container", id), zap.Error(err))
		}
		for _, p := range a.Addresses {
			if d.alloc != nil {
				if err := d.Release(ctx, id, p.Addr()); err != nil {
					d.log.Warn("releasing the address of a container gone", zap.String("container", id), zap.Error(err))
				}
			} else {
				d.forgetNames(ctx, p.Addr())
			}
		}
		d.log.Info("released the addresses of a container gone", zap.String("container", id), zap.Any("addr", a.Addresses))
	}
	if changed {
		if err := d.attached.save(); err != nil {
			d.log.Error("saving the attached containers", zap.Error(err))
		}
	}
}

// Ps implements api.Backend.
func (d *daemon) Ps(ctx context.Context) (api.PsResponse, error) {
	d.mu.Lock()
	ps := api.PsResponse{Peer: d.router.Name(), Exposed: slices.Clone(d.exposed), Containers: []api.Attachment{}}
	d.mu.Unlock()
	if ps.Exposed == nil {
		ps.Exposed = []netip.Prefix{}
	}
	d.amu.Lock()
	defer d.amu.Unlock()
	for _, id := range slices.Sorted(maps.Keys(d.attached.byID)) {
		ps.Containers = append(ps.Containers, *d.attached.byID[id])
	}
	if d.plugin != nil {
		ps.Containers = append(ps.Containers, d.plugin.attachments()...)
	}
	return ps, nil
}
