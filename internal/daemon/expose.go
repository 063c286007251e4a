package daemon

import (
	"context"
	"net/netip"
	"path/filepath"
	"slices"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/atomicfile"
	"github.com/overlayd/overlayd/proto"
)

// exposeID holds the addresses of the host itself, as Weave's weave:expose.
const exposeID = "weave:expose"

// exposedFile keeps the exposed addresses across restarts: the TUN device
// and its addresses go with the process, the addresses' IPAM allocations
// and the containers' resolv.conf pointing at them do not.
const exposedFile = "exposed.json"

// Expose implements api.Backend: the address goes on the TUN device and is
// announced to peers as a /32. Without a CIDR the address comes from IPAM
// (the default subnet); a CIDR inside the range is claimed from IPAM, so
// that it is never given to anyone else.
func (d *Daemon) Expose(ctx context.Context, p netip.Prefix) (netip.Prefix, error) {
	// The allocator may wait (for consensus, for space): not under emu,
	// so that other exposes and hides go on meanwhile. Allocations for
	// weave:expose are idempotent, so two at once get one address.
	fromIPAM := d.alloc != nil && (!p.IsValid() || d.cfg.Range.Contains(p.Addr()))
	var err error
	switch {
	case !p.IsValid() && d.alloc == nil:
		return p, api.BadRequest("give the address to expose (IPAM is off)")
	case !p.IsValid():
		p, err = d.Alloc(ctx, exposeID, netip.Prefix{})
	case fromIPAM:
		p, err = d.Claim(ctx, exposeID, p)
	}
	if err != nil {
		return p, err
	}
	if err := d.expose(p); err != nil {
		if fromIPAM {
			if err := d.Release(context.WithoutCancel(ctx), exposeID, p.Addr()); err != nil {
				d.log.Warn("releasing an address not exposed after all", zap.Stringer("addr", p), zap.Error(err))
			}
		}
		return p, err
	}
	return p, nil
}

// expose puts p on the device and announces it.
func (d *Daemon) expose(p netip.Prefix) error {
	d.emu.Lock()
	defer d.emu.Unlock()
	a := p.Addr()
	if a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
		return api.BadRequest("cannot expose %v", p)
	}
	if slices.Contains(d.exposed, p) {
		d.restoring = slices.DeleteFunc(d.restoring, func(r netip.Prefix) bool { return r == p })
		return nil
	}
	for _, e := range d.exposed {
		if e.Addr() == a {
			return api.BadRequest("%v is already exposed as %v (hide it first)", a, e)
		}
	}
	if len(d.exposed)+len(d.manual) >= proto.MaxPrefixes {
		return api.BadRequest("this host announces %d addresses already, the most a peer may", proto.MaxPrefixes)
	}
	next := append(slices.Clone(d.exposed), p)
	if err := d.keeper.SetAddrs(next); err != nil {
		return err
	}
	d.exposed = next
	d.announceLocked()
	d.restoring = slices.DeleteFunc(d.restoring, func(r netip.Prefix) bool { return r.Addr() == a })
	d.log.Info("exposed", zap.Stringer("addr", p))
	if err := d.saveExposedLocked(); err != nil {
		d.log.Error("saving the exposed addresses: a restart will not expose this one again", zap.Stringer("addr", p), zap.Error(err))
	}
	return nil
}

// Hide implements api.Backend; an address from the range goes back to IPAM.
func (d *Daemon) Hide(ctx context.Context, p netip.Prefix) error {
	gone, err := d.hide(p.Addr())
	if err != nil {
		return err
	}
	if d.alloc != nil && d.cfg.Range.Contains(gone.Addr()) {
		if err := d.Release(ctx, exposeID, gone.Addr()); err != nil {
			d.log.Warn("releasing a hidden address", zap.Stringer("addr", gone), zap.Error(err))
		}
	}
	d.log.Info("hidden", zap.Stringer("addr", gone))
	return nil
}

// hide takes a off the device and stops announcing it; an address exposed
// before a restart and not yet again is not exposed again.
func (d *Daemon) hide(a netip.Addr) (netip.Prefix, error) {
	d.emu.Lock()
	defer d.emu.Unlock()
	same := func(e netip.Prefix) bool { return e.Addr() == a }
	i := slices.IndexFunc(d.exposed, same)
	if i < 0 {
		j := slices.IndexFunc(d.restoring, same)
		if j < 0 {
			return netip.Prefix{}, api.BadRequest("%v is not exposed", a)
		}
		gone := d.restoring[j]
		d.restoring = slices.Delete(d.restoring, j, j+1)
		return gone, d.saveExposedLocked()
	}
	gone := d.exposed[i]
	next := slices.Delete(slices.Clone(d.exposed), i, i+1)
	if err := d.keeper.SetAddrs(next); err != nil {
		return gone, err
	}
	d.exposed = next
	d.announceLocked()
	if err := d.saveExposedLocked(); err != nil {
		d.log.Error("saving the exposed addresses: a restart will expose this one again", zap.Stringer("addr", gone), zap.Error(err))
	}
	return gone, nil
}

// announceLocked tells peers the /32s this host serves: exposed addresses
// and manual addresses outside the range. The router takes them without
// waiting. emu is held.
func (d *Daemon) announceLocked() {
	var ps []netip.Prefix
	for _, p := range append(slices.Clone(d.exposed), d.manual...) {
		ps = append(ps, netip.PrefixFrom(p.Addr(), 32))
	}
	slices.SortFunc(ps, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	if err := d.router.SetLocal(slices.Compact(ps)); err != nil {
		d.log.Error("announcing addresses", zap.Error(err))
	}
}

// saveExposedLocked writes the exposed addresses, with those not yet
// exposed again since the restart. emu is held.
func (d *Daemon) saveExposedLocked() error {
	b, err := encodeExposed(append(slices.Clone(d.exposed), d.restoring...))
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(d.cfg.StateDir, exposedFile), b)
}

// restoreExposed exposes again the addresses exposed before a restart,
// one at a time: an address of the range is claimed again (at once if
// the saved ring says it is still ours; after consensus or a donation
// otherwise). One that cannot be (IPAM gave it to another meanwhile) is
// dropped, loudly.
func (d *Daemon) restoreExposed(ctx context.Context) {
	d.emu.Lock()
	todo := slices.Clone(d.restoring)
	d.emu.Unlock()
	for _, p := range todo {
		d.emu.Lock()
		pending := slices.Contains(d.restoring, p)
		d.emu.Unlock()
		if !pending {
			continue // hidden meanwhile
		}
		if _, err := d.Expose(ctx, p); err != nil {
			if ctx.Err() != nil {
				return
			}
			d.log.Error("could not expose again an address exposed before the restart", zap.Stringer("addr", p), zap.Error(err))
			d.emu.Lock()
			d.restoring = slices.DeleteFunc(d.restoring, func(r netip.Prefix) bool { return r == p })
			if err := d.saveExposedLocked(); err != nil {
				d.log.Warn("saving the exposed addresses", zap.Error(err))
			}
			d.emu.Unlock()
			continue
		}
		d.log.Info("exposed again after the restart", zap.Stringer("addr", p))
	}
}

// exposedAddrs returns the exposed addresses.
func (d *Daemon) exposedAddrs() []netip.Prefix {
	d.emu.Lock()
	defer d.emu.Unlock()
	return slices.Clone(d.exposed)
}

// hasExposed reports whether the host has, or will have again after a
// restart, an exposed address.
func (d *Daemon) hasExposed() bool {
	d.emu.Lock()
	defer d.emu.Unlock()
	return len(d.exposed)+len(d.restoring) > 0
}
