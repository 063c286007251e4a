package main

import (
	"context"
	crand "crypto/rand"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"slices"
	"sync"

	"github.com/moby/moby/client"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/buildinfo"
	"github.com/overlayd/overlayd/internal/dockerplugin"
	"github.com/overlayd/overlayd/internal/firewall"
	"github.com/overlayd/overlayd/internal/hostnet"
	"github.com/overlayd/overlayd/internal/metrics"
	"github.com/overlayd/overlayd/internal/netconf"
	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/ipalloc/allocsrv"
	"github.com/overlayd/overlayd/peering"
	"github.com/overlayd/overlayd/peering/conn"
	"github.com/overlayd/overlayd/proto"
	"github.com/overlayd/overlayd/tun"
)

// startError is a failure to start (exit code 2): nothing is left behind.
type startError struct{ err error }

func (e startError) Error() string { return e.err.Error() }
func (e startError) Unwrap() error { return e.err }

// daemon is one running overlayd: the router, the control API and what they
// set up in the namespace. It is the api.Backend.
type daemon struct {
	cfg    *config
	log    *zap.Logger
	router *peering.Router
	api    *api.Server

	alloc *allocsrv.Server // nil when IPAM is off
	names *nameService     // nil when DNS is off

	mu      sync.Mutex     // serialises Expose and Hide; held before lmu
	exposed []netip.Prefix // guarded by mu and lmu: addresses on the TUN device

	lmu    sync.Mutex     // serialises announcing what we serve
	manual []netip.Prefix // guarded by lmu: addresses outside the range held here

	mtu      int          // of the TUN device
	amu      sync.Mutex   // serialises attach and detach; taken before mu
	attached *attachments // guarded by amu

	// keeper puts back the device's state, the range route and the
	// containers' routes when something removes them.
	keeper *netconf.Keeper
	// restoring lists the addresses exposed before a restart that are
	// not exposed again yet; guarded by mu. They are saved with the
	// exposed ones, so that a crash meanwhile loses none.
	restoring []netip.Prefix

	docker *client.Client // nil without Docker
	plugin *plugin        // nil without --docker-plugin
}

var _ api.Backend = (*daemon)(nil)

// run sets everything up, runs until ctx ends, and tears down what it set
// up. Failures before the daemon is running are startErrors.
func run(ctx context.Context, cfg *config, log *zap.Logger) (err error) {
	if os.Geteuid() != 0 {
		return startError{errNotRoot}
	}
	if err := tun.Check(); err != nil {
		return startError{err}
	}
	if err := prepareStateDir(cfg.StateDir); err != nil {
		return startError{err}
	}
	name := cfg.Name
	if name == 0 {
		n, created, err := loadOrCreatePeerName(cfg.StateDir)
		if err != nil {
			return startError{err}
		}
		if created {
			log.Info("created a new peer name", zap.Stringer("peer", n))
		}
		name = n
	}
	if netconf.LinkExists(cfg.Iface) {
		return startError{fmt.Errorf("interface %s already exists: is another overlayd running in this network namespace? (choose another with --iface)", cfg.Iface)}
	}
	mtu := cfg.MTU
	underlay := netconf.UnderlayMTU(cfg.Iface)
	if mtu == 0 {
		mtu = underlay - proto.UDPOverhead
	}

	// Each step undoes itself if a later one fails.
	var undo []func()
	defer func() {
		if err != nil {
			for _, f := range slices.Backward(undo) {
				f()
			}
		}
	}()

	pc, err := conn.Listen(cfg.Port)
	if err != nil {
		return startError{err}
	}
	undo = append(undo, func() { pc.Close() })

	dev, err := tun.Create(cfg.Iface, mtu)
	if err != nil {
		return startError{err}
	}
	undo = append(undo, func() { dev.Close() })
	if err := netconf.LinkUp(cfg.Iface); err != nil {
		return startError{err}
	}
	if err := netconf.PromoteSecondaries(cfg.Iface); err != nil {
		return startError{err}
	}
	if cfg.Range.IsValid() {
		if err := netconf.AddRoute(cfg.Iface, cfg.Range); err != nil {
			return startError{err}
		}
		undo = append(undo, func() { netconf.DelRoute(cfg.Iface, cfg.Range) })
	}

	var fw *firewall.Rules
	if cfg.Firewall {
		if fw, err = firewall.New(cfg.Iface); err == nil {
			err = fw.Install()
		}
		switch {
		case err != nil && cfg.DockerPlugin:
			return startError{err}
		case err != nil:
			log.Warn("no FORWARD rules for the containers' traffic: it passes only if the FORWARD policy lets it", zap.Error(err))
			fw = nil
		default:
			undo = append(undo, func() { fw.Remove() })
		}
	}

	var seed [16]byte
	crand.Read(seed[:])
	attached, err := loadAttachments(cfg.StateDir)
	if err != nil {
		return startError{err}
	}
	exposed, err := loadExposed(cfg.StateDir)
	if err != nil {
		return startError{err}
	}
	keeper := netconf.NewKeeper(netconf.KeeperConfig{Iface: cfg.Iface, MTU: mtu, Range: cfg.Range, Log: log.Named("netconf")})
	for _, a := range attached.byID {
		keeper.SetHost(a.HostIface, addrsOf(a.Addresses))
	}
	d := &daemon{cfg: cfg, log: log, mtu: mtu, attached: attached, keeper: keeper, restoring: exposed}
	if cfg.DockerAPI != "" && (cfg.DockerPlugin || dockerSocketExists(cfg.DockerAPI)) {
		if d.docker, err = newDockerClient(cfg.DockerAPI); err != nil {
			return startError{err}
		}
		undo = append(undo, func() { d.docker.Close() })
	}
	router, err := peering.New(peering.Config{
		Name: name, Nickname: cfg.Nickname, Range: cfg.Range, MTU: mtu,
		Discovery: cfg.Discovery, ConnLimit: cfg.ConnLimit,
		Rand:     rand.New(rand.NewPCG(binary.LittleEndian.Uint64(seed[:8]), binary.LittleEndian.Uint64(seed[8:]))),
		Log:      log.Named("router"),
		Channels: map[string]func(proto.PeerName, []byte){proto.ChannelIPAM: d.deliverIPAM, proto.ChannelNames: d.deliverNames},
	}, dev, pc)
	if err != nil {
		return startError{err}
	}
	d.router = router
	if cfg.Range.IsValid() {
		d.alloc, err = allocsrv.New(allocsrv.Config{
			Node: ipalloc.Config{Self: name, UID: router.UID(), Universe: cfg.Range, DefaultSubnet: cfg.DefaultSubnet,
				Mode: cfg.IPAMMode, Quorum: cfg.Quorum, Seeds: cfg.Seeds},
			StateDir: cfg.StateDir,
			Router:   channelRouter{router.Outbox(proto.ChannelIPAM), router},
			Publish:  d.publishOwnership,
			Rand:     rand.New(rand.NewPCG(binary.LittleEndian.Uint64(seed[8:]), binary.LittleEndian.Uint64(seed[:8]))),
			Log:      log.Named("ipam"),
		})
		if err != nil {
			return startError{err}
		}
		switch cfg.IPAMMode {
		case ipalloc.Consensus:
			log.Info(fmt.Sprintf("Assuming quorum size of %d", cfg.Quorum))
		}
	}
	if cfg.DNS {
		d.names, err = startNames(cfg, name, channelRouter{router.Outbox(proto.ChannelNames), router}, rand.New(rand.NewPCG(binary.LittleEndian.Uint64(seed[4:12]), 1)), log.Named("dns"))
		if err != nil {
			return startError{err}
		}
		undo = append(undo, d.names.server.Close)
	}
	var plug *dockerplugin.Server
	if cfg.DockerPlugin {
		if d.plugin, err = loadPlugin(d); err != nil {
			return startError{err}
		}
		if plug, err = dockerplugin.Listen(cfg.PluginDir, cfg.PluginName, d.plugin, log.Named("plugin")); err != nil {
			return startError{err}
		}
		undo = append(undo, plug.Close)
	}
	srv, err := api.Listen(cfg.Socket, d, buildinfo.Version, log.Named("api"))
	if err != nil {
		return startError{err}
	}
	d.api = srv
	undo = append(undo, srv.Close)
	var ms *metrics.Server
	if cfg.MetricsAddr != "" {
		cs := []prometheus.Collector{router.Collector(), keeperCollector(keeper)}
		if d.alloc != nil {
			cs = append(cs, d.alloc.Collector())
		}
		if d.names != nil {
			cs = append(cs, d.names.collector())
		}
		reg, err := metrics.NewRegistry(cs...)
		if err != nil {
			return startError{err}
		}
		if ms, err = metrics.Listen(cfg.MetricsAddr, reg); err != nil {
			return startError{err}
		}
		undo = append(undo, ms.Close)
	}

	log.Info("overlayd started",
		zap.String("version", buildinfo.Version), zap.Stringer("peer", name), zap.String("nick", cfg.Nickname),
		zap.Stringer("range", cfg.Range), zap.String("iface", cfg.Iface), zap.Int("mtu", mtu),
		zap.Int("underlay_mtu", underlay), zap.Uint16("port", pc.LocalPort()), zap.String("socket", cfg.Socket),
		zap.Strings("targets", cfg.Targets), zap.String("metrics", cfg.MetricsAddr), zap.Bool("dns", cfg.DNS))
	if d.names != nil {
		log.Info("DNS server started", zap.String("endpoint", d.names.listen.String()), zap.String("name", cfg.DNSDomain),
			zap.Uint32("ttl", cfg.DNSTTL), zap.String("resolv_conf", cfg.ResolvConf))
	}

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return router.Run(gctx) })
	g.Go(func() error { return srv.Run(gctx) })
	if d.alloc != nil {
		g.Go(func() error { return d.alloc.Run(gctx) })
	}
	g.Go(func() error { return d.watchContainers(gctx) })
	g.Go(func() error { return keeper.Run(gctx) })
	if len(exposed) > 0 {
		g.Go(func() error { d.restoreExposed(gctx); return nil })
	}
	if plug != nil {
		log.Info("Docker plugin started", zap.String("socket", plug.Path()), zap.String("driver", cfg.PluginName))
		g.Go(func() error { return plug.Run(gctx) })
		if cfg.DockerNetwork != "" {
			g.Go(func() error { return d.ensureNetwork(gctx) })
		}
	}
	if d.docker != nil {
		g.Go(func() error { return d.watchDocker(gctx) })
	}
	if d.names != nil {
		g.Go(func() error { return d.names.store.Run(gctx) })
		g.Go(func() error { return d.names.server.Run(gctx) })
		g.Go(func() error {
			<-gctx.Done()
			d.names.resolver.Close() // forwards in flight end now, not after 5 s
			return nil
		})
	}
	if ms != nil {
		g.Go(func() error { return ms.Run(gctx) })
	}
	if len(cfg.Targets) > 0 {
		if err := router.Connect(gctx, cfg.Targets); err != nil {
			log.Error("adding targets", zap.Error(err))
		}
	}
	runErr := g.Wait()

	// Tear down: the router has closed the device (which takes its
	// addresses and routes with it); remove what may outlive it.
	if cfg.Range.IsValid() {
		if err := netconf.DelRoute(cfg.Iface, cfg.Range); err != nil {
			log.Warn("removing the range route", zap.Error(err))
		}
	}
	if fw != nil {
		if err := fw.Remove(); err != nil {
			log.Warn("removing the FORWARD rules", zap.Error(err))
		}
	}
	if d.docker != nil {
		d.docker.Close()
	}
	log.Info("overlayd stopped")
	return runErr
}

// Status implements api.Backend.
func (d *daemon) Status(ctx context.Context) (api.Status, error) {
	rs, err := d.router.Status(ctx)
	if err != nil {
		return api.Status{}, err
	}
	st := api.Status{Version: buildinfo.Version, Router: rs}
	if d.alloc != nil {
		is, err := d.alloc.Status(ctx)
		if err != nil {
			return api.Status{}, err
		}
		st.IPAM = ipamStatus(is, rs)
		st.IPAM.Rejected, st.IPAM.Dropped = d.alloc.Rejected.Load(), d.alloc.Dropped.Load()
	}
	if st.DNS, err = d.DNS(ctx); err != nil {
		return api.Status{}, err
	}
	st.DNS.Entries = nil // they can be many: GET /v1/dns has them
	if d.plugin != nil {
		st.Plugin = d.plugin.status()
	}
	return st, nil
}

// Connect implements api.Backend.
func (d *daemon) Connect(ctx context.Context, peers []string) error {
	if len(peers) == 0 {
		return fmt.Errorf("%w: no peer address given", api.ErrBadRequest)
	}
	for _, p := range peers {
		if _, _, err := peering.ParseTarget(p); err != nil {
			return fmt.Errorf("%w: %v", api.ErrBadRequest, err)
		}
	}
	return d.router.Connect(ctx, peers)
}

// Forget implements api.Backend.
func (d *daemon) Forget(ctx context.Context, peers []string) error {
	if len(peers) == 0 {
		return fmt.Errorf("%w: no peer address given", api.ErrBadRequest)
	}
	err := d.router.Forget(ctx, peers)
	if err != nil && ctx.Err() == nil {
		return fmt.Errorf("%w: %v", api.ErrBadRequest, err)
	}
	return err
}

// Expose implements api.Backend: the address goes on the TUN device and is
// announced to peers as a /32. Without a CIDR the address comes from IPAM
// (the default subnet); a CIDR inside the range is claimed from IPAM, so
// that it is never given to anyone else.
func (d *daemon) Expose(ctx context.Context, p netip.Prefix) (netip.Prefix, error) {
	// The allocator may wait (for consensus, for space): not under mu, so
	// that other exposes and hides go on meanwhile. Allocations for
	// weave:expose are idempotent, so two at once get one address.
	fromIPAM := d.alloc != nil && (!p.IsValid() || d.cfg.Range.Contains(p.Addr()))
	var err error
	switch {
	case !p.IsValid() && d.alloc == nil:
		return p, fmt.Errorf("%w: give the address to expose (IPAM is off)", api.ErrBadRequest)
	case !p.IsValid():
		p, err = d.Alloc(ctx, exposeID, netip.Prefix{})
	case fromIPAM:
		p, err = d.Claim(ctx, exposeID, p)
	}
	if err != nil {
		return p, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	a := p.Addr()
	if a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
		return p, fmt.Errorf("%w: cannot expose %v", api.ErrBadRequest, p)
	}
	if slices.Contains(d.exposed, p) {
		d.restoring = slices.DeleteFunc(d.restoring, func(r netip.Prefix) bool { return r == p })
		return p, nil
	}
	for _, e := range d.exposed {
		if e.Addr() == a {
			return p, fmt.Errorf("%w: %v is already exposed as %v (hide it first)", api.ErrBadRequest, a, e)
		}
	}
	undo := func() {
		if fromIPAM {
			if err := d.Release(context.WithoutCancel(ctx), exposeID, a); err != nil {
				d.log.Warn("releasing an address not exposed after all", zap.Stringer("addr", a), zap.Error(err))
			}
		}
	}
	next := append(slices.Clone(d.exposed), p)
	if err := d.keeper.SetAddrs(next); err != nil {
		undo()
		return p, err
	}
	if err := d.setExposed(ctx, next); err != nil {
		d.keeper.SetAddrs(d.exposed)
		undo()
		return p, err
	}
	d.restoring = slices.DeleteFunc(d.restoring, func(r netip.Prefix) bool { return r.Addr() == a })
	d.log.Info("exposed", zap.Stringer("addr", p))
	return p, d.saveExposedLocked()
}

// setExposed replaces the exposed addresses and announces them. mu must
// be held.
func (d *daemon) setExposed(ctx context.Context, next []netip.Prefix) error {
	d.lmu.Lock()
	defer d.lmu.Unlock()
	old := d.exposed
	d.exposed = next
	if err := d.announceLocked(ctx); err != nil {
		d.exposed = old
		return err
	}
	return nil
}

// Hide implements api.Backend; an address from the range goes back to IPAM.
func (d *daemon) Hide(ctx context.Context, p netip.Prefix) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	i := slices.IndexFunc(d.exposed, func(e netip.Prefix) bool { return e.Addr() == p.Addr() })
	if i < 0 && slices.ContainsFunc(d.restoring, func(r netip.Prefix) bool { return r.Addr() == p.Addr() }) {
		// Exposed before a restart and not yet again: it will not be.
		d.restoring = slices.DeleteFunc(d.restoring, func(r netip.Prefix) bool { return r.Addr() == p.Addr() })
		if err := d.saveExposedLocked(); err != nil {
			return err
		}
		if d.alloc != nil && d.cfg.Range.Contains(p.Addr()) {
			if err := d.Release(ctx, exposeID, p.Addr()); err != nil {
				d.log.Warn("releasing a hidden address", zap.Stringer("addr", p.Addr()), zap.Error(err))
			}
		}
		return nil
	}
	if i < 0 {
		return fmt.Errorf("%w: %v is not exposed", api.ErrBadRequest, p.Addr())
	}
	gone := d.exposed[i]
	next := slices.Delete(slices.Clone(d.exposed), i, i+1)
	if err := d.keeper.SetAddrs(next); err != nil {
		return err
	}
	if err := d.setExposed(ctx, next); err != nil {
		d.keeper.SetAddrs(d.exposed) // as it was: still announced
		return err
	}
	if err := d.saveExposedLocked(); err != nil {
		d.log.Warn("saving the exposed addresses", zap.Error(err))
	}
	if d.alloc != nil && d.cfg.Range.Contains(gone.Addr()) {
		if err := d.Release(ctx, exposeID, gone.Addr()); err != nil {
			d.log.Warn("releasing a hidden address", zap.Stringer("addr", gone), zap.Error(err))
		}
	}
	d.log.Info("hidden", zap.Stringer("addr", gone))
	return nil
}

// hostRoutes turns exposed addresses into the /32s this host serves.
func hostRoutes(ps []netip.Prefix) []netip.Prefix {
	out := make([]netip.Prefix, len(ps))
	for i, p := range ps {
		out[i] = netip.PrefixFrom(p.Addr(), 32)
	}
	return out
}

// addrsOf lists the addresses of prefixes.
func addrsOf(ps []netip.Prefix) []netip.Addr {
	out := make([]netip.Addr, len(ps))
	for i, p := range ps {
		out[i] = p.Addr()
	}
	return out
}

// keeperCollector exposes what the keeper put back, by kind.
func keeperCollector(k *netconf.Keeper) prometheus.Collector {
	var cs collectors
	for kind := range hostnet.NumKinds {
		cs = append(cs, prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "overlayd_netconf_restored_total",
			Help:        "Links, addresses and routes of overlayd's that something removed or changed and overlayd put back, by kind.",
			ConstLabels: prometheus.Labels{"kind": kind.String()}}, func() float64 { return float64(k.Restored(kind)) }))
	}
	return cs
}

// channelRouter is the router as the user of one gossip channel sees it:
// its outbox, and the peers it reaches.
type channelRouter struct {
	*peering.Outbox
	*peering.Router
}
