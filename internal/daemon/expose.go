package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/atomicfile"
	"github.com/overlayd/overlayd/ipalloc"
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
	return d.exposeAddr(ctx, p, false)
}

// exposeAddr exposes p; with restore, p was exposed before a restart, and
// is exposed only if it has not been hidden meanwhile. While an address is
// being exposed or hidden it is busy: another expose or hide of it is
// refused until then. The allocator may wait (for consensus, for space):
// it is not asked under emu.
func (d *Daemon) exposeAddr(ctx context.Context, p netip.Prefix, restore bool) (netip.Prefix, error) {
	if !p.IsValid() && d.alloc == nil {
		return p, api.BadRequest("give the address to expose (IPAM is off)")
	}
	if p.IsValid() {
		if done, err := d.reserve(p, restore); done || err != nil {
			return p, err
		}
		defer d.unbusy(p.Addr())
	}
	fromIPAM := d.alloc != nil && (!p.IsValid() || d.cfg.Range.Contains(p.Addr()))
	var err error
	switch {
	case !p.IsValid():
		// Allocations for weave:expose are idempotent: an address the
		// host holds already comes back.
		if p, err = d.Alloc(ctx, exposeID, netip.Prefix{}); err != nil {
			return p, err
		}
		if done, err := d.reserve(p, false); done || err != nil {
			return p, err
		}
		defer d.unbusy(p.Addr())
	case fromIPAM:
		if p, err = d.Claim(ctx, exposeID, p); err != nil {
			return p, err
		}
	}
	added, err := d.expose(p, restore)
	if !added && fromIPAM {
		// Not exposed after all (refused, or hidden meanwhile): the
		// claim goes back.
		if err := d.Release(context.WithoutCancel(ctx), exposeID, p.Addr()); err != nil {
			d.log.Warn("releasing an address not exposed after all", zap.Stringer("addr", p), zap.Error(err))
		}
	}
	return p, err
}

// reserve checks p and marks its address busy. done says there is
// nothing to do: p is exposed already, or (restore) it was hidden since.
func (d *Daemon) reserve(p netip.Prefix, restore bool) (done bool, err error) {
	d.emu.Lock()
	defer d.emu.Unlock()
	a := p.Addr()
	switch {
	case a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return false, api.BadRequest("cannot expose %v", p)
	case restore && !slices.Contains(d.restoring, p):
		return true, nil
	case slices.Contains(d.exposed, p):
		d.restoring = slices.DeleteFunc(d.restoring, func(r netip.Prefix) bool { return r == p })
		return true, nil
	case d.busy[a] > 0:
		return false, errBusy(a)
	}
	for _, e := range d.exposed {
		if e.Addr() == a {
			return false, api.BadRequest("%v is already exposed as %v (hide it first)", a, e)
		}
	}
	d.busy[a]++
	return false, nil
}

func errBusy(a netip.Addr) error {
	return &api.RequestError{Err: &busyError{a}}
}

// busyError refuses an expose or hide of an address while another is
// under way.
type busyError struct{ addr netip.Addr }

func (e *busyError) Error() string {
	return fmt.Sprintf("an expose or hide of %v is under way: try again when it is done", e.addr)
}

func (d *Daemon) unbusy(a netip.Addr) {
	d.emu.Lock()
	defer d.emu.Unlock()
	if d.busy[a]--; d.busy[a] <= 0 {
		delete(d.busy, a)
	}
}

// expose puts p on the device, announces it and saves the exposed
// addresses; added says p went on the device (it stays there even if the
// save fails).
func (d *Daemon) expose(p netip.Prefix, restore bool) (added bool, err error) {
	d.emu.Lock()
	defer d.emu.Unlock()
	switch {
	case restore && !slices.Contains(d.restoring, p):
		return false, nil // hidden meanwhile
	case len(d.exposed)+len(d.manual) >= proto.MaxPrefixes:
		return false, api.BadRequest("this host announces %d addresses already, the most a peer may", proto.MaxPrefixes)
	}
	next := append(slices.Clone(d.exposed), p)
	if err := d.keeper.SetAddrs(next); err != nil {
		return false, err
	}
	d.exposed = next
	d.announceLocked()
	d.restoring = slices.DeleteFunc(d.restoring, func(r netip.Prefix) bool { return r.Addr() == p.Addr() })
	d.log.Info("exposed", zap.Stringer("addr", p))
	if err := d.saveExposedLocked(); err != nil {
		return true, fmt.Errorf("%v is exposed, but a restart will not expose it again: %w", p, err)
	}
	return true, nil
}

// Hide implements api.Backend; an address from the range goes back to IPAM.
// The address stays busy until it is released, so that an expose of it
// meanwhile cannot lose its claim to the release.
func (d *Daemon) Hide(ctx context.Context, p netip.Prefix) error {
	gone, err := d.hide(p.Addr())
	if err != nil {
		return err
	}
	defer d.unbusy(gone.Addr())
	if d.alloc != nil && d.cfg.Range.Contains(gone.Addr()) {
		if err := d.Release(context.WithoutCancel(ctx), exposeID, gone.Addr()); err != nil {
			d.log.Warn("releasing a hidden address", zap.Stringer("addr", gone), zap.Error(err))
		}
	}
	d.log.Info("hidden", zap.Stringer("addr", gone))
	return nil
}

// hide takes a off the device and stops announcing it, or, for an address
// exposed before a restart and not yet again, takes it off the list to
// restore (a restore under way then releases its claim). It marks a busy.
func (d *Daemon) hide(a netip.Addr) (netip.Prefix, error) {
	d.emu.Lock()
	defer d.emu.Unlock()
	same := func(e netip.Prefix) bool { return e.Addr() == a }
	if j := slices.IndexFunc(d.restoring, same); j >= 0 && !slices.ContainsFunc(d.exposed, same) {
		gone, old := d.restoring[j], d.restoring
		d.restoring = slices.Delete(slices.Clone(d.restoring), j, j+1)
		if err := d.saveExposedLocked(); err != nil {
			d.restoring = old
			return netip.Prefix{}, err
		}
		d.busy[a]++ // until Hide released it; a restore under way holds it too
		return gone, nil
	}
	i := slices.IndexFunc(d.exposed, same)
	switch {
	case i < 0:
		return netip.Prefix{}, api.BadRequest("%v is not exposed", a)
	case d.busy[a] > 0:
		return netip.Prefix{}, errBusy(a)
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
	d.busy[a]++
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

// restoreExposed exposes again the addresses exposed before a restart:
// those of exposed.json, and those IPAM holds for weave:expose that the
// file lacks (a crash between the allocator's state and the file). An
// address of the range is claimed again (at once if the saved ring says
// it is still ours; after consensus or a donation otherwise). One that
// another ID took meanwhile is dropped, loudly; one whose owner does not
// answer yet is tried again, with a growing wait, until ctx ends.
func (d *Daemon) restoreExposed(ctx context.Context) {
	d.adoptHeldExposed(ctx)
	for wait := time.Second; ; wait = min(2*wait, time.Minute) {
		d.emu.Lock()
		todo := slices.Clone(d.restoring)
		d.emu.Unlock()
		if len(todo) == 0 {
			return
		}
		for _, p := range todo {
			_, err := d.exposeAddr(ctx, p, true)
			switch {
			case ctx.Err() != nil:
				return
			case err == nil:
				d.log.Info("exposed again after the restart", zap.Stringer("addr", p))
			case temporary(err):
				d.log.Warn("cannot expose again yet an address exposed before the restart; trying again", zap.Stringer("addr", p),
					zap.Duration("in", wait), zap.Error(err))
			default:
				d.log.Error("cannot expose again an address exposed before the restart: dropped", zap.Stringer("addr", p), zap.Error(err))
				d.emu.Lock()
				d.restoring = slices.DeleteFunc(d.restoring, func(r netip.Prefix) bool { return r == p })
				if err := d.saveExposedLocked(); err != nil {
					d.log.Warn("saving the exposed addresses", zap.Error(err))
				}
				d.emu.Unlock()
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// temporary reports whether an expose may succeed if tried again: the
// owner of the address did not answer or cannot be reached, an expose or
// hide of it is under way, or the failure was the daemon's, not the
// request's.
func temporary(err error) bool {
	var ce *ipalloc.ClaimError
	var be *busyError
	return errors.As(err, &ce) && ce.Temporary || errors.As(err, &be) || !api.IsBadRequest(err)
}

// adoptHeldExposed adds to the addresses to restore those IPAM holds for
// weave:expose that exposed.json does not list.
func (d *Daemon) adoptHeldExposed(ctx context.Context) {
	if d.alloc == nil {
		return
	}
	st, err := d.alloc.Status(ctx)
	if err != nil {
		return
	}
	d.emu.Lock()
	defer d.emu.Unlock()
	changed := false
	for _, o := range st.Owned {
		same := func(e netip.Prefix) bool { return e.Addr() == o.Addr.Addr() }
		if o.Ident != exposeID || slices.ContainsFunc(d.restoring, same) || slices.ContainsFunc(d.exposed, same) || d.busy[o.Addr.Addr()] > 0 {
			continue
		}
		d.log.Warn("IPAM holds an address for weave:expose that exposed.json lacks (a crash between the two): exposing it again",
			zap.Stringer("addr", o.Addr))
		d.restoring = append(d.restoring, o.Addr)
		changed = true
	}
	if changed {
		if err := d.saveExposedLocked(); err != nil {
			d.log.Warn("saving the exposed addresses", zap.Error(err))
		}
	}
}

// exposedAddrs returns the exposed addresses.
func (d *Daemon) exposedAddrs() []netip.Prefix {
	d.emu.Lock()
	defer d.emu.Unlock()
	return slices.Clone(d.exposed)
}
