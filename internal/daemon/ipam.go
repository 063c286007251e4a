package daemon

import (
	"cmp"
	"context"
	"errors"
	"net/netip"
	"slices"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/attach"
	"github.com/overlayd/overlayd/internal/containers"
	"github.com/overlayd/overlayd/internal/ipv4"
	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/ipalloc/ring"
	"github.com/overlayd/overlayd/peering"
	"github.com/overlayd/overlayd/proto"
)

// deliverIPAM is the router's handler of the IPAM channel.
func (d *Daemon) deliverIPAM(from proto.PeerName, payload []byte) {
	if d.alloc != nil {
		d.alloc.Deliver(from, payload)
	}
}

// publishOwnership tells the router who owns the range, and announces the
// addresses outside it held here. It runs on the allocator's goroutine;
// neither call waits for another goroutine.
func (d *Daemon) publishOwnership(_ context.Context, spans []ring.Span, manual []netip.Prefix) {
	var owners []peering.Owner
	for _, s := range spans {
		for _, p := range s.Prefixes() {
			owners = append(owners, peering.Owner{Prefix: p, Peer: s.Peer})
		}
	}
	if err := d.router.SetOwners(owners); err != nil {
		d.log.Error("updating routes from the ring", zap.Error(err))
	}
	d.emu.Lock()
	defer d.emu.Unlock()
	d.manual = slices.Clone(manual)
	d.announceLocked()
}

// addressesLost hands the addresses the allocator gave up to giveUp. It runs
// on the allocator's goroutine, which giveUp calls: it never waits.
func (d *Daemon) addressesLost(_ context.Context, lost []ipalloc.Lost) {
	select {
	case d.lost <- lost:
	default:
		for _, l := range lost {
			d.log.Error("address given up after a partition; too many at once to unplumb it", zap.Stringer("addr", l.Addr),
				zap.String("container", l.Ident), zap.Stringer("owner", l.Owner))
		}
	}
}

// giveUp stops using the addresses the allocator gave up: after a partition
// another peer holds them (see ipalloc.Lost). Their names registered here
// go, and so does the address from the container it was attached to (its
// ethwe0 and the host's route to it); `ps` lists it as lost, and the log
// and the IPAM status say so. Every other host routes it to its owner
// already.
func (d *Daemon) giveUp(ctx context.Context) {
	for {
		var lost []ipalloc.Lost
		select {
		case <-ctx.Done():
			return
		case lost = <-d.lost:
		}
		for _, l := range lost {
			d.log.Warn("address given up: another peer holds it after a partition", zap.Stringer("addr", l.Addr),
				zap.String("container", l.Ident), zap.Stringer("owner", l.Owner), zap.Bool("allocated_there", l.Held))
			d.forgetNames(ctx, l.Addr.Addr())
			d.boxes.do(ctx, func(t *containers.Table) error {
				a, ok := t.Lose(l.Ident, l.Addr)
				if !ok {
					return nil
				}
				d.keeper.SetHost(a.HostIface, addrsOf(a.Addresses))
				if err := attach.RemoveAddrs(attach.Spec{NetNS: a.NetNS, Host: a.HostIface}, []netip.Prefix{l.Addr}); err != nil {
					d.log.Warn("taking an address given up off its container", zap.String("container", a.ID), zap.Stringer("addr", l.Addr), zap.Error(err))
				}
				return nil
			})
		}
	}
}

// do runs an allocator request; its refusals are the request's fault.
func (d *Daemon) do(ctx context.Context, req ipalloc.Request) (ipalloc.Done, error) {
	if d.alloc == nil {
		return ipalloc.Done{}, api.ErrIPAMOff
	}
	done, err := d.alloc.Do(ctx, req)
	if err != nil {
		return done, err
	}
	if done.Err != nil {
		return done, &api.RequestError{Err: done.Err}
	}
	return done, nil
}

// Alloc implements api.Backend.
func (d *Daemon) Alloc(ctx context.Context, id string, subnet netip.Prefix) (netip.Prefix, error) {
	done, err := d.do(ctx, ipalloc.Request{Op: ipalloc.OpAlloc, Ident: id, Subnet: subnet})
	return done.Addr, err
}

// Claim implements api.Backend.
func (d *Daemon) Claim(ctx context.Context, id string, cidr netip.Prefix) (netip.Prefix, error) {
	done, err := d.do(ctx, ipalloc.Request{Op: ipalloc.OpClaim, Ident: id, Addr: cidr})
	return done.Addr, err
}

// Release implements api.Backend. The names of the addresses freed go
// with them: an address may go to another container next. The names go
// first: a crash between the two steps leaves an address held without its
// names, which the retried release frees, never a name for an address that
// is free. Only addresses id holds lose their names.
func (d *Daemon) Release(ctx context.Context, id string, addr netip.Addr) error {
	if d.alloc == nil {
		return api.ErrIPAMOff
	}
	req := ipalloc.Request{Op: ipalloc.OpRelease, Ident: id}
	if addr.IsValid() {
		req.Addr = netip.PrefixFrom(addr, 32)
	}
	if d.names != nil {
		st, err := d.alloc.Status(ctx)
		if err != nil {
			return err
		}
		for _, o := range st.Owned {
			if o.Ident == id && (!addr.IsValid() || o.Addr.Addr() == addr) {
				d.forgetNames(ctx, o.Addr.Addr())
			}
		}
	}
	_, err := d.do(ctx, req)
	return err
}

// release frees addresses of a container that went or was detached, with
// their names; without IPAM only the names go. An address the container
// no longer holds is not an error; the first other failure is returned
// after the rest were tried.
func (d *Daemon) release(ctx context.Context, id string, addrs []netip.Prefix) error {
	var first error
	for _, p := range addrs {
		if d.alloc == nil {
			d.forgetNames(ctx, p.Addr())
			continue
		}
		err := d.Release(ctx, id, p.Addr())
		var none *ipalloc.NoAddressesError
		var notHeld *ipalloc.NotHeldError
		if err != nil && !errors.As(err, &none) && !errors.As(err, &notHeld) && first == nil {
			first = err
		}
	}
	return first
}

// holder is the ID holding address a here.
func (d *Daemon) holder(ctx context.Context, a netip.Addr) (string, bool) {
	if d.alloc == nil {
		return "", false
	}
	st, err := d.alloc.Status(ctx)
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

// RmPeer implements api.Backend.
func (d *Daemon) RmPeer(ctx context.Context, peer string) (api.RmPeerResponse, error) {
	name, err := proto.ParsePeerName(peer)
	if err != nil {
		return api.RmPeerResponse{}, api.BadRequest("%q is not a peer name (like 12:d2:fe:7a:c1:f2)", peer)
	}
	done, err := d.do(ctx, ipalloc.Request{Op: ipalloc.OpRmPeer, Peer: name})
	return api.RmPeerResponse{Peer: name, Taken: done.Taken}, err
}

// Ring implements api.Backend: it waits for the ring (Weave's prime).
func (d *Daemon) Ring(ctx context.Context) (api.IPAMStatus, error) {
	if _, err := d.do(ctx, ipalloc.Request{Op: ipalloc.OpPrime}); err != nil {
		return api.IPAMStatus{}, err
	}
	st, err := d.Status(ctx)
	return st.IPAM, err
}

// ipamStatus turns the allocator's state into the API's, with nicknames
// from the router: the reachable peers' as it knows them, the others' as
// the allocator last saw them.
func (d *Daemon) ipamStatus(is ipalloc.Status, rs peering.Status) api.IPAMStatus {
	nick := map[proto.PeerName]string{}
	for _, p := range rs.Peers {
		nick[p.Name] = p.Nickname
	}
	start, end := ipv4.Bounds(is.Range)
	st := api.IPAMStatus{Enabled: true, Status: is.Status, Range: is.Range, RangeNumIPs: end - uint64(start),
		DefaultSubnet: is.DefaultSubnet, Mode: [...]string{"consensus", "seed", "observer"}[is.Mode],
		Quorum: is.Quorum, KnownVoters: is.Known, Seeds: is.Seeds, ActiveIPs: is.Active,
		PendingAllocs: is.PendingAllocs, PendingClaims: is.PendingClaims,
		Conflicts: is.Stats.Conflicts, Duplicates: is.Stats.Duplicates, Donations: is.Stats.Donations,
		Owners: []api.IPAMOwner{}, Entries: []api.IPAMEntry{}, Owned: []api.IPAMAllocation{},
		Rejected: d.alloc.Rejected.Load(), Dropped: d.alloc.Dropped.Load(), Lost: []api.IPAMLost{}}
	for _, l := range is.Lost {
		st.Lost = append(st.Lost, api.IPAMLost{Address: l.Addr, ID: l.Ident, Owner: l.Owner, Nickname: nick[l.Owner], AllocatedThere: l.Held})
	}
	if st.Seeds == nil {
		st.Seeds = []proto.PeerName{}
	}
	nickname := func(p proto.PeerName, last string) string { return cmp.Or(nick[p], last) }
	for _, o := range is.Owners {
		st.Owners = append(st.Owners, api.IPAMOwner{Peer: o.Peer, Nickname: nickname(o.Peer, o.Nickname), Size: o.Size,
			Reachable: o.Reachable, Self: o.Peer == d.name})
	}
	for _, e := range is.Entries {
		st.Entries = append(st.Entries, api.IPAMEntry{Token: e.Token, Size: e.Size, Peer: e.Peer, Nickname: nickname(e.Peer, e.Nickname),
			Version: e.Version, Free: e.Free})
	}
	for _, o := range is.Owned {
		st.Owned = append(st.Owned, api.IPAMAllocation{ID: o.Ident, Address: o.Addr, InRange: is.Range.Contains(o.Addr.Addr())})
	}
	return st
}

// driverIPAM is the allocator as the Docker driver sees it.
type driverIPAM struct{ d *Daemon }

func (i driverIPAM) Alloc(ctx context.Context, id string, subnet netip.Prefix) (netip.Prefix, error) {
	return i.d.Alloc(ctx, id, subnet)
}

func (i driverIPAM) Claim(ctx context.Context, id string, cidr netip.Prefix) (netip.Prefix, error) {
	return i.d.Claim(ctx, id, cidr)
}

// Release frees id's addresses; an ID that holds none is not an error.
func (i driverIPAM) Release(ctx context.Context, id string, addr netip.Addr) error {
	err := i.d.Release(ctx, id, addr)
	var none *ipalloc.NoAddressesError
	var notHeld *ipalloc.NotHeldError
	if errors.As(err, &none) || errors.As(err, &notHeld) {
		return nil
	}
	return err
}

func (i driverIPAM) Holder(ctx context.Context, addr netip.Addr) (string, bool) {
	return i.d.holder(ctx, addr)
}
