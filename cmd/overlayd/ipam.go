package main

import (
	"cmp"
	"context"
	"fmt"
	"net/netip"
	"slices"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/ipv4"
	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/ipalloc/ring"
	"github.com/overlayd/overlayd/peering"
	"github.com/overlayd/overlayd/proto"
)

// exposeID holds the addresses of the host itself, as Weave's weave:expose.
const exposeID = "weave:expose"

// deliverIPAM is the router's handler of the IPAM channel.
func (d *daemon) deliverIPAM(from proto.PeerName, payload []byte) {
	if d.alloc != nil {
		d.alloc.Deliver(from, payload)
	}
}

// publishOwnership tells the router who owns the range, and announces the
// addresses outside it held here. It runs on the allocator's goroutine.
func (d *daemon) publishOwnership(ctx context.Context, spans []ring.Span, manual []netip.Prefix) {
	var owners []peering.Owner
	for _, s := range spans {
		for _, p := range s.Prefixes() {
			owners = append(owners, peering.Owner{Prefix: p, Peer: s.Peer})
		}
	}
	if err := d.router.SetOwners(owners); err != nil {
		d.log.Error("updating routes from the ring", zap.Error(err))
	}
	d.lmu.Lock()
	defer d.lmu.Unlock()
	d.manual = slices.Clone(manual)
	if err := d.announceLocked(ctx); err != nil && ctx.Err() == nil {
		d.log.Error("announcing addresses", zap.Error(err))
	}
}

// announceLocked tells peers the /32s this host serves: exposed addresses
// and manual addresses outside the range. lmu must be held.
func (d *daemon) announceLocked(ctx context.Context) error {
	ps := hostRoutes(d.exposed)
	for _, m := range d.manual {
		ps = append(ps, netip.PrefixFrom(m.Addr(), 32))
	}
	slices.SortFunc(ps, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return d.router.SetLocal(slices.Compact(ps))
}

// do runs an allocator request and turns its failure into an API error.
func (d *daemon) do(ctx context.Context, req ipalloc.Request) (ipalloc.Done, error) {
	if d.alloc == nil {
		return ipalloc.Done{}, api.ErrIPAMOff
	}
	done, err := d.alloc.Do(ctx, req)
	if err != nil {
		return done, err
	}
	if done.Err != nil {
		return done, fmt.Errorf("%w: %v", api.ErrBadRequest, done.Err)
	}
	return done, nil
}

// Alloc implements api.Backend.
func (d *daemon) Alloc(ctx context.Context, id string, subnet netip.Prefix) (netip.Prefix, error) {
	done, err := d.do(ctx, ipalloc.Request{Op: ipalloc.OpAlloc, Ident: id, Subnet: subnet})
	return done.Addr, err
}

// Claim implements api.Backend.
func (d *daemon) Claim(ctx context.Context, id string, cidr netip.Prefix) (netip.Prefix, error) {
	done, err := d.do(ctx, ipalloc.Request{Op: ipalloc.OpClaim, Ident: id, Addr: cidr})
	return done.Addr, err
}

// Release implements api.Backend.
func (d *daemon) Release(ctx context.Context, id string, addr netip.Addr) error {
	req := ipalloc.Request{Op: ipalloc.OpRelease, Ident: id}
	if addr.IsValid() {
		req.Addr = netip.PrefixFrom(addr, 32)
	}
	// The names of the addresses freed go with them: which addresses,
	// the allocator says before it frees them.
	addrs := []netip.Addr{addr}
	if !addr.IsValid() && d.alloc != nil && d.names != nil {
		addrs = nil
		if st, err := d.alloc.Status(ctx); err == nil {
			for _, o := range st.Owned {
				if o.Ident == id {
					addrs = append(addrs, o.Addr.Addr())
				}
			}
		}
	}
	if _, err := d.do(ctx, req); err != nil {
		return err
	}
	for _, a := range addrs {
		d.forgetNames(ctx, a)
	}
	return nil
}

// RmPeer implements api.Backend.
func (d *daemon) RmPeer(ctx context.Context, peer string) (api.RmPeerResponse, error) {
	name, err := proto.ParsePeerName(peer)
	if err != nil {
		return api.RmPeerResponse{}, fmt.Errorf("%w: %q is not a peer name (like 12:d2:fe:7a:c1:f2)", api.ErrBadRequest, peer)
	}
	done, err := d.do(ctx, ipalloc.Request{Op: ipalloc.OpRmPeer, Peer: name})
	return api.RmPeerResponse{Peer: name, Taken: done.Taken}, err
}

// Ring implements api.Backend: it waits for the ring (Weave's prime).
func (d *daemon) Ring(ctx context.Context) (api.IPAMStatus, error) {
	if _, err := d.do(ctx, ipalloc.Request{Op: ipalloc.OpPrime}); err != nil {
		return api.IPAMStatus{}, err
	}
	st, err := d.Status(ctx)
	return st.IPAM, err
}

// ipamStatus turns the allocator's state into the API's, with nicknames
// from the router.
func ipamStatus(is ipalloc.Status, rs peering.Status) api.IPAMStatus {
	nick := map[proto.PeerName]string{}
	for _, p := range rs.Peers {
		nick[p.Name] = p.Nickname
	}
	_, end := ipv4.Bounds(is.Range)
	start, _ := ipv4.Bounds(is.Range)
	st := api.IPAMStatus{Enabled: true, Status: is.Status, Range: is.Range, RangeNumIPs: end - uint64(start),
		DefaultSubnet: is.DefaultSubnet, Mode: [...]string{"consensus", "seed", "observer"}[is.Mode],
		Quorum: is.Quorum, KnownVoters: is.Known, Seeds: is.Seeds, ActiveIPs: is.Active,
		PendingAllocs: is.PendingAllocs, PendingClaims: is.PendingClaims,
		Conflicts: is.Stats.Conflicts, Duplicates: is.Stats.Duplicates, Donations: is.Stats.Donations,
		Owners: []api.IPAMOwner{}, Entries: []api.IPAMEntry{}, Owned: []api.IPAMAllocation{}}
	if st.Seeds == nil {
		st.Seeds = []proto.PeerName{}
	}
	// The router knows the reachable peers' nicknames; the allocator
	// remembers those of peers gone.
	nickname := func(p proto.PeerName, last string) string { return cmp.Or(nick[p], last) }
	for _, o := range is.Owners {
		st.Owners = append(st.Owners, api.IPAMOwner{Peer: o.Peer, Nickname: nickname(o.Peer, o.Nickname), Size: o.Size,
			Reachable: o.Reachable, Self: o.Peer == rs.Name})
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
