package netconf

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/overlayd/overlayd/internal/hostnet"
)

// KeeperConfig configures a Keeper.
type KeeperConfig struct {
	Iface string       // the TUN device
	MTU   int          // of the TUN device
	Range netip.Prefix // routed to Iface; invalid for none
	// CheckEvery is the fallback check's period, for changes no netlink
	// event told of (default 2 s).
	CheckEvery time.Duration
	// Settle is how long a burst of netlink events may last before the
	// check runs (default 20 ms).
	Settle time.Duration
	Log    *zap.Logger
}

// A Keeper keeps overlayd's links, addresses and routes in place: the TUN
// device up with its MTU and exposed addresses, the route for the range
// through it, and the containers' host veths up with their /32 routes.
// When something removes or changes them (the kernel flushing the routes
// of a device that lost its last address, `ip route del`, `ip link set
// down`), the Keeper puts them back, promptly on the kernel's netlink
// events and every CheckEvery as the fallback, logs it and counts it.
// What to fix is hostnet.Plan's decision; the Keeper only reads the
// kernel's state and applies the fixes.
//
// Its methods are safe for concurrent use. Changes to what is wanted and
// the checks are serialised by mu, so a check never sees a half-made
// change: callers tell the Keeper about a container's routes after they
// made them, and that a container's routes go before they remove them.
type Keeper struct {
	cfg  KeeperConfig
	log  *zap.Logger
	kick chan struct{} // a check is due; room for one
	// watch is what the kernel's events are about when they concern
	// us, as the last check found it; replaced whole.
	watch atomic.Pointer[interest]

	mu   sync.Mutex   // serialises changes of want and the checks
	want hostnet.Want // guarded by mu
	// flaps records, by fix, when it was last applied; a fix applied
	// flapLimit times within flapWindow is suspended until the time in
	// quiet (something else keeps changing it). Guarded by mu.
	flaps map[string][]time.Time
	quiet map[string]time.Time

	restored [hostnet.NumKinds]atomic.Uint64
}

// interest is what makes a netlink event worth a check.
type interest struct {
	links map[int]bool          // our links' indexes
	dsts  map[netip.Prefix]bool // the routes we keep
	tun   int
}

// A fix applied flapLimit times within flapWindow fights something else
// that changes the same thing: it is suspended for flapQuiet.
const (
	flapLimit  = 10
	flapWindow = 10 * time.Second
	flapQuiet  = 30 * time.Second
)

// NewKeeper makes a Keeper that wants the TUN device of cfg up with its
// MTU and the range routed to it. It starts nothing.
func NewKeeper(cfg KeeperConfig) *Keeper {
	if cfg.CheckEvery <= 0 {
		cfg.CheckEvery = 2 * time.Second
	}
	if cfg.Settle <= 0 {
		cfg.Settle = 20 * time.Millisecond
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	return &Keeper{cfg: cfg, log: cfg.Log, kick: make(chan struct{}, 1),
		want:  hostnet.Want{Iface: cfg.Iface, MTU: cfg.MTU, Range: cfg.Range, Hosts: map[string][]netip.Addr{}},
		flaps: map[string][]time.Time{}, quiet: map[string]time.Time{}}
}

// Restored returns how many times each kind of thing was put back.
func (k *Keeper) Restored(kind hostnet.Kind) uint64 { return k.restored[kind].Load() }

// SetAddrs makes addrs the exposed addresses of the TUN device: those no
// longer wanted are removed, new ones are added, and whatever the removal
// took with it (the kernel flushes the routes of a device that loses its
// last address) is put back at once. If an address cannot be added or
// removed, nothing wanted changes and the error is returned.
func (k *Keeper) SetAddrs(addrs []netip.Prefix) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	old := k.want.Addrs
	for _, a := range old {
		if !slices.Contains(addrs, a) {
			if err := DelAddr(k.cfg.Iface, a); err != nil {
				return err
			}
		}
	}
	for i, a := range addrs {
		if !slices.Contains(old, a) {
			if err := AddAddr(k.cfg.Iface, a); err != nil {
				for _, b := range addrs[:i] {
					if !slices.Contains(old, b) {
						DelAddr(k.cfg.Iface, b)
					}
				}
				return err
			}
		}
	}
	k.want.Addrs = slices.Clone(addrs)
	k.checkLocked(true)
	return nil
}

// SetHost records the addresses routed to a container's host veth, made
// by the caller; nil or empty forgets the veth. Call it after making the
// routes, and before removing them.
func (k *Keeper) SetHost(iface string, addrs []netip.Addr) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(addrs) == 0 {
		delete(k.want.Hosts, iface)
		return
	}
	k.want.Hosts[iface] = slices.Clone(addrs)
}

// Check puts back at once what is missing. It reports false when the
// kernel's state could not be read (a dump interrupted by changes).
func (k *Keeper) Check() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.checkLocked(false)
}

// Run follows the kernel's link, address and route events, checks after
// each burst and every CheckEvery, until ctx ends. Without events (the
// subscription failed) the periodic check stands in, and the subscription
// is tried again.
func (k *Keeper) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		for ctx.Err() == nil {
			err := k.follow(ctx)
			if ctx.Err() != nil {
				return
			}
			k.log.Warn("following netlink events; the periodic check stands in", zap.Error(err))
			k.due()
			select {
			case <-ctx.Done():
			case <-time.After(k.cfg.CheckEvery):
			}
		}
	})
	tick := time.NewTicker(k.cfg.CheckEvery)
	defer tick.Stop()
	var retry <-chan time.Time // after a failed read, with a growing wait
	fails := 0
	for {
		if k.Check() {
			fails, retry = 0, nil
		} else {
			fails++
			retry = time.After(min(k.cfg.Settle<<min(fails, 16), k.cfg.CheckEvery))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		case <-retry:
		case <-k.kick:
			// Let the burst end (a deleted link sends many events).
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(k.cfg.Settle):
			}
			select {
			case <-k.kick:
			default:
			}
		}
	}
}

// due asks for a check soon.
func (k *Keeper) due() {
	select {
	case k.kick <- struct{}{}:
	default:
	}
}

// follow subscribes to the kernel's link, address and route events and
// asks for a check on each that concerns our links or routes, until ctx
// ends or a subscription ends (its socket's buffer overflowed, say:
// events were lost, so a check is due then too). Errors the subscriptions
// report without ending are logged and ignored.
func (k *Keeper) follow(ctx context.Context) error {
	done := make(chan struct{})
	links := make(chan netlink.LinkUpdate, 64)
	addrs := make(chan netlink.AddrUpdate, 64)
	routes := make(chan netlink.RouteUpdate, 64)
	onErr := func(err error) { k.log.Debug("netlink events", zap.Error(err)) }
	// The subscriptions' goroutines block sending to their channels:
	// once done is closed, each channel is drained until it is closed.
	opened := []func(){}
	defer func() {
		close(done)
		for _, drain := range opened {
			drain()
		}
	}()
	if err := netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{ErrorCallback: onErr}); err != nil {
		return fmt.Errorf("netconf: link events: %w", err)
	}
	opened = append(opened, func() {
		for range links {
		}
	})
	if err := netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{ErrorCallback: onErr}); err != nil {
		return fmt.Errorf("netconf: address events: %w", err)
	}
	opened = append(opened, func() {
		for range addrs {
		}
	})
	if err := netlink.RouteSubscribeWithOptions(routes, done, netlink.RouteSubscribeOptions{ErrorCallback: onErr}); err != nil {
		return fmt.Errorf("netconf: route events: %w", err)
	}
	opened = append(opened, func() {
		for range routes {
		}
	})
	// Whatever changed before the subscriptions began is caught here.
	k.due()
	for {
		var ours bool
		w := k.watch.Load()
		select {
		case <-ctx.Done():
			return nil
		case u, ok := <-links:
			if !ok {
				return errors.New("netconf: link events ended")
			}
			ours = w == nil || u.Attrs() != nil && w.links[u.Attrs().Index]
		case u, ok := <-addrs:
			if !ok {
				return errors.New("netconf: address events ended")
			}
			ours = w == nil || u.LinkIndex == w.tun
		case u, ok := <-routes:
			if !ok {
				return errors.New("netconf: route events ended")
			}
			ours = w == nil || w.links[u.LinkIndex]
			if dst, ok := prefixOf(u.Dst); ok && !ours {
				ours = w.dsts[dst.Masked()]
			}
		}
		if ours {
			k.due()
		}
	}
}

// checkLocked reads the kernel's state, plans and applies the fixes,
// logging and counting each; false if the state could not be read. own
// says the check follows a change of ours (SetAddrs), whose fixes do not
// count as a fight with something else. k.mu is held.
func (k *Keeper) checkLocked(own bool) bool {
	have, err := k.read()
	if err != nil {
		k.log.Debug("reading the network state", zap.Error(err))
		return false
	}
	k.watch.Store(k.interest(have))
	now := time.Now()
	for _, f := range hostnet.Plan(k.want, have) {
		key := f.String()
		if now.Before(k.quiet[key]) {
			continue
		}
		if err := apply(f); err != nil {
			k.log.Warn("could not restore "+key, zap.String("kind", f.Kind.String()), zap.Error(err))
			continue
		}
		k.restored[f.Kind].Add(1)
		k.log.Info("restored "+key+", which was removed or changed", zap.String("kind", f.Kind.String()))
		if !own && k.flapped(key, now) {
			k.log.Warn("something keeps removing or changing "+key+": overlayd stops putting it back for a while",
				zap.String("kind", f.Kind.String()), zap.Duration("for", flapQuiet))
		}
	}
	return true
}

// flapped records that a fix was applied, and reports whether it was
// applied too often: it is then suspended. k.mu is held.
func (k *Keeper) flapped(key string, now time.Time) bool {
	times := append(k.flaps[key], now)
	times = slices.DeleteFunc(times, func(t time.Time) bool { return now.Sub(t) > flapWindow })
	k.flaps[key] = times
	for key, ts := range k.flaps { // forget the calm ones
		if len(ts) == 0 || now.Sub(ts[len(ts)-1]) > flapWindow {
			delete(k.flaps, key)
		}
	}
	if len(times) < flapLimit {
		return false
	}
	delete(k.flaps, key)
	k.quiet[key] = now.Add(flapQuiet)
	for key, until := range k.quiet {
		if now.After(until) {
			delete(k.quiet, key)
		}
	}
	return true
}

// interest is what the next events are checked against: our links, and
// the routes we keep. k.mu is held.
func (k *Keeper) interest(have hostnet.Have) *interest {
	w := &interest{links: map[int]bool{}, dsts: map[netip.Prefix]bool{}}
	for name, l := range have.Links {
		w.links[l.Index] = true
		if name == k.want.Iface {
			w.tun = l.Index
		}
	}
	if k.want.Range.IsValid() {
		w.dsts[k.want.Range.Masked()] = true
	}
	for _, as := range k.want.Hosts {
		for _, a := range as {
			w.dsts[netip.PrefixFrom(a, 32)] = true
		}
	}
	return w
}

// read gathers what Plan compares: the links k wants, the TUN device's
// IPv4 addresses and the main table's IPv4 routes.
func (k *Keeper) read() (hostnet.Have, error) {
	have := hostnet.Have{Links: map[string]hostnet.Link{}}
	names := []string{k.want.Iface}
	for h := range k.want.Hosts {
		names = append(names, h)
	}
	for _, n := range names {
		l, err := netlink.LinkByName(n)
		if err != nil {
			var nf netlink.LinkNotFoundError
			if errors.As(err, &nf) {
				continue
			}
			return have, err
		}
		a := l.Attrs()
		have.Links[n] = hostnet.Link{Index: a.Index, Up: a.Flags&net.FlagUp != 0, MTU: a.MTU}
		if n != k.want.Iface {
			continue
		}
		as, err := netlink.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			return have, err
		}
		for _, x := range as {
			if p, ok := prefixOf(x.IPNet); ok {
				have.Addrs = append(have.Addrs, p)
			}
		}
	}
	rs, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return have, err
	}
	for _, r := range rs {
		if r.Dst == nil || r.Type != unix.RTN_UNICAST {
			continue
		}
		if p, ok := prefixOf(r.Dst); ok {
			have.Routes = append(have.Routes, hostnet.Route{Dst: p.Masked(), Index: r.LinkIndex})
		}
	}
	return have, nil
}

// apply carries out one fix.
func apply(f hostnet.Fix) error {
	l, err := netlink.LinkByName(f.Iface)
	if err != nil {
		return err
	}
	switch f.Kind {
	case hostnet.LinkUp:
		return netlink.LinkSetUp(l)
	case hostnet.LinkMTU:
		return netlink.LinkSetMTU(l, f.MTU)
	case hostnet.Address:
		return AddAddr(f.Iface, f.Prefix)
	default: // a route: replaced, if one leads elsewhere
		return netlink.RouteReplace(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: IPNet(f.Prefix), Scope: netlink.SCOPE_LINK})
	}
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP.To4())
	if !ok {
		return netip.Prefix{}, false
	}
	bits, size := n.Mask.Size()
	if size != 32 {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, bits), true
}

// PromoteSecondaries makes the kernel keep the other addresses of a
// subnet on iface when its primary address is removed (by default it
// removes them all): hiding the first of two exposed addresses must not
// take the second with it.
func PromoteSecondaries(iface string) error {
	p := "/proc/sys/net/ipv4/conf/" + iface + "/promote_secondaries"
	if err := os.WriteFile(p, []byte("1"), 0o644); err != nil {
		return fmt.Errorf("netconf: sysctl net.ipv4.conf.%s.promote_secondaries: %w", iface, err)
	}
	return nil
}
