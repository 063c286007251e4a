// Package daemon is overlayd's service layer: it opens the device and the
// sockets, runs the router, the allocator, the name service, the keeper of
// the host's routes, the containers' shell and the Docker driver, and
// serves the control API on top of them (Daemon implements api.Backend).
//
// Each behaviour of the README lives in a file named for it: exposed
// addresses (expose.go), IPAM (ipam.go), names (dns.go), attached
// containers (containers.go), Docker (docker.go), the status (status.go),
// the state directory (state.go).
//
// Locks: emu guards the exposed addresses; it is never held across a call
// into another goroutine. The containers' table is owned by one goroutine
// (containers.go); the Docker driver has a lock of its own.
package daemon

import (
	"context"
	crand "crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/moby/moby/client"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sync/errgroup"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/buildinfo"
	"github.com/overlayd/overlayd/internal/dockerplugin"
	"github.com/overlayd/overlayd/internal/firewall"
	"github.com/overlayd/overlayd/internal/metrics"
	"github.com/overlayd/overlayd/internal/netconf"
	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/ipalloc/allocsrv"
	"github.com/overlayd/overlayd/peering"
	"github.com/overlayd/overlayd/peering/conn"
	"github.com/overlayd/overlayd/peering/secure"
	"github.com/overlayd/overlayd/peering/wgplane"
	"github.com/overlayd/overlayd/proto"
	"github.com/overlayd/overlayd/tun"
)

// Config is the validated configuration of one daemon (cmd/overlayd fills
// it from the flags).
type Config struct {
	Range         netip.Prefix // invalid: IPAM off, nothing routed
	DefaultSubnet netip.Prefix
	Targets       []string
	Name          proto.PeerName // zero: from the state directory
	Nickname      string
	Port          uint16
	Iface         string
	Socket        string
	StateDir      string
	LogLevel      zapcore.Level
	MTU           int    // zero: underlay MTU minus proto.UDPOverhead
	MetricsAddr   string // host:port for Prometheus; empty: off
	ConnLimit     int    // 0: peering.MaxConnLimit
	Discovery     bool
	IPAMMode      ipalloc.Mode
	Quorum        int              // IPAMMode Consensus
	Seeds         []proto.PeerName // IPAMMode Seed
	DNS           bool
	DNSListen     netip.AddrPort // invalid: docker0's address, port 53, if it exists; else 0.0.0.0:53
	DNSDomain     string         // lower case, with its trailing dot
	DNSTTL        uint32
	// DNSRateLimit bounds the DNS answers over UDP a second to one
	// client address (resolver.Config.RateLimit); 0: no limit.
	DNSRateLimit int
	// DNSTombstones is how long a deleted name's tombstone is kept.
	DNSTombstones time.Duration
	// DNSAllow are client subnets the DNS server answers besides its
	// own: loopback, the range, this host's addresses and its bridges'
	// subnets.
	DNSAllow      []netip.Prefix
	ResolvConf    string
	ReleaseGrace  time.Duration // a container gone this long loses its addresses
	DockerPlugin  bool          // serve the network and IPAM drivers
	DockerAPI     string        // the engine's API: unix:///var/run/docker.sock; "": none
	PluginName    string        // driver name = socket name in PluginDir
	PluginDir     string
	DockerNetwork string // created at start with the drivers; "": none
	Firewall      bool   // FORWARD rules for the containers' traffic
	// Password turns on password mode: only peers with the same password
	// are admitted, and control traffic is sealed. Empty: plaintext.
	Password []byte
	// WGPort is the UDP port of the WireGuard data plane (password mode).
	WGPort uint16
	// TrustedSubnets are the underlay subnets whose peers may exchange
	// data in clear with us (password mode), when they trust us too.
	TrustedSubnets []netip.Prefix
}

// DefaultWGPort is the WireGuard data plane's port when none is given.
const DefaultWGPort = wgplane.DefaultPort

// StartError is a failure to start: nothing is left behind (exit code 2).
type StartError struct{ Err error }

func (e *StartError) Error() string { return e.Err.Error() }
func (e *StartError) Unwrap() error { return e.Err }

// ErrNotRoot refuses to start without root.
var ErrNotRoot = errors.New("overlayd must run as root: it creates a TUN device and routes")

// Daemon is one running overlayd. Make one with New, then call Run.
type Daemon struct {
	cfg      Config
	log      *zap.Logger
	name     proto.PeerName
	mtu      int                // of the TUN device
	secure   *secure.Config     // password mode; nil: plaintext
	signing  *secure.SigningKey // password mode: signs our topology entry
	underlay int                // smallest MTU of the links peers' packets may leave by

	pc     conn.PacketConn
	plane  *wgplane.Plane // password mode: WireGuard carries the data; nil otherwise
	router *peering.Router
	keeper *netconf.Keeper
	fw     *firewall.Rules      // nil without --firewall, or when iptables failed
	alloc  *allocsrv.Server     // nil when IPAM is off
	names  *nameService         // nil when DNS is off
	docker *client.Client       // nil without Docker
	driver *dockerplugin.Driver // nil without --docker-plugin
	plugin *dockerplugin.Server // the driver's socket
	api    *api.Server
	ms     *metrics.Server // nil without --metrics-addr
	boxes  *containerShell
	// lost carries the addresses the allocator gave up to giveUp.
	lost chan []ipalloc.Lost

	emu sync.Mutex
	// exposed are the addresses on the TUN device, announced to peers;
	// guarded by emu.
	exposed []netip.Prefix
	// restoring lists the addresses exposed before a restart that are
	// not exposed again yet; guarded by emu. They are saved with the
	// exposed ones, so that a crash meanwhile loses none.
	restoring []netip.Prefix
	// manual are the addresses outside the range held here (claims),
	// announced with the exposed ones; guarded by emu.
	manual []netip.Prefix
	// busy counts, by address, the exposes and hides under way; guarded
	// by emu.
	busy map[netip.Addr]int

	// undo holds what New set up, to be undone in reverse order by Run's
	// end or a failed New.
	undo []func()
}

var _ api.Backend = (*Daemon)(nil)

// New sets up everything, in steps, and starts nothing: the state
// directory and peer name, the UDP socket, the TUN device and its route,
// the firewall rules, the services, the Docker driver, the control socket
// and the metrics listener. A failure is a *StartError, and whatever was
// set up is undone.
func New(cfg Config, log *zap.Logger) (*Daemon, error) {
	d := &Daemon{cfg: cfg, log: log, busy: map[netip.Addr]int{}, lost: make(chan []ipalloc.Lost, 64)}
	for _, step := range []func() error{d.prepare, d.openDevice, d.openFirewall, d.newServices, d.newDocker, d.listen} {
		if err := step(); err != nil {
			d.teardown()
			return nil, &StartError{Err: err}
		}
	}
	return d, nil
}

// prepare checks the machine and the state directory, and gets the peer
// name.
func (d *Daemon) prepare() error {
	if os.Geteuid() != 0 {
		return ErrNotRoot
	}
	if err := tun.Check(); err != nil {
		return err
	}
	if err := prepareStateDir(d.cfg.StateDir); err != nil {
		return err
	}
	d.name = d.cfg.Name
	if d.name == 0 {
		n, created, err := loadOrCreatePeerName(d.cfg.StateDir)
		if err != nil {
			return err
		}
		if created {
			d.log.Info("created a new peer name", zap.Stringer("peer", n))
		}
		d.name = n
	}
	if len(d.cfg.Password) > 0 {
		id, created, err := loadOrCreateIdentity(d.cfg.StateDir)
		if err != nil {
			return err
		}
		if created {
			d.log.Info("created a new identity key", zap.Stringer("public_key", id.Public))
		}
		d.secure = &secure.Config{Identity: id, PSK: secure.DeriveKey(d.cfg.Password), Random: crand.Reader}
		sk, created, err := loadOrCreateSigningKey(d.cfg.StateDir)
		if err != nil {
			return err
		}
		if created {
			d.log.Info("created a new signing key", zap.String("public_key", base64.StdEncoding.EncodeToString(sk.Public[:])))
		}
		d.signing = &sk
	}
	if netconf.LinkExists(d.cfg.Iface) {
		return fmt.Errorf("interface %s already exists: is another overlayd running in this network namespace? (choose another with --iface)", d.cfg.Iface)
	}
	d.underlay = netconf.UnderlayMTU(d.cfg.Iface)
	d.mtu = d.cfg.MTU
	if d.mtu == 0 {
		d.mtu = d.underlay - proto.UDPOverhead
		if d.secure != nil {
			d.mtu = d.underlay - wgplane.Overhead
		}
	}
	return nil
}

// openDevice opens the UDP socket and the TUN device, brings the device up
// and routes the range to it; the router takes both over.
func (d *Daemon) openDevice() error {
	pc, err := conn.Listen(d.cfg.Port)
	if err != nil {
		return err
	}
	d.pc = pc
	d.undo = append(d.undo, func() { pc.Close() })
	dev, err := tun.Create(d.cfg.Iface, d.mtu)
	if err != nil {
		return err
	}
	d.undo = append(d.undo, func() { dev.Close() })
	if err := netconf.LinkUp(d.cfg.Iface); err != nil {
		return err
	}
	if err := netconf.PromoteSecondaries(d.cfg.Iface); err != nil {
		return err
	}
	if d.cfg.Range.IsValid() {
		if err := netconf.AddRoute(d.cfg.Iface, d.cfg.Range); err != nil {
			return err
		}
		d.undo = append(d.undo, d.delRangeRoute)
	}
	var seed [16]byte
	crand.Read(seed[:])
	channels := map[string]func(proto.PeerName, []byte){proto.ChannelIPAM: d.deliverIPAM, proto.ChannelNames: d.deliverNames}
	rcfg := peering.Config{
		Secure: d.secure, Signing: d.signing,
		Name: d.name, Nickname: d.cfg.Nickname, Range: d.cfg.Range, MTU: d.mtu,
		Discovery: d.cfg.Discovery, ConnLimit: d.cfg.ConnLimit,
		Rand:     rand.New(rand.NewPCG(binary.LittleEndian.Uint64(seed[:8]), binary.LittleEndian.Uint64(seed[8:]))),
		Log:      d.log.Named("router"),
		Channels: channels,
	}
	if d.secure != nil {
		planeDev := dev
		if len(d.cfg.TrustedSubnets) > 0 {
			// The router sends plaintext peers' data from the plane's
			// reads, and writes theirs beside the plane.
			rcfg.TrustedSubnets, rcfg.Divert = d.cfg.TrustedSubnets, peering.NewDivert(dev)
			planeDev = rcfg.Divert
		}
		if err := d.openPlane(planeDev); err != nil {
			return err
		}
		rcfg.DataPlane, rcfg.DataPort, dev = d.plane, d.cfg.WGPort, nil // the plane owns the device now
	} else if len(d.cfg.TrustedSubnets) > 0 {
		d.log.Warn("--trusted-subnets has no effect without a password: all traffic is in clear")
	}
	d.router, err = peering.New(rcfg, dev, pc)
	if err != nil {
		return err
	}
	d.keeper = netconf.NewKeeper(netconf.KeeperConfig{Iface: d.cfg.Iface, MTU: d.mtu, Range: d.cfg.Range, Log: d.log.Named("netconf")})
	return nil
}

// openPlane starts the WireGuard data plane on dev, with the identity key
// and a key derived from the password. A peer that relays between two
// others decrypts and re-encrypts in its kernel's forwarding path, so
// forwarding is turned on.
func (d *Daemon) openPlane(dev tun.Device) error {
	plane, err := wgplane.Open(wgplane.Config{Iface: d.cfg.Iface, Port: d.cfg.WGPort, Identity: d.secure.Identity,
		PSK: d.secure.PSK.DataKey(), Log: d.log.Named("wireguard")}, dev)
	if err != nil {
		return err
	}
	d.plane = plane
	d.undo = append(d.undo, plane.Close)
	if err := netconf.EnableForwarding(); err != nil {
		d.log.Warn("IPv4 forwarding could not be turned on: this host cannot relay encrypted traffic between peers without a direct connection", zap.Error(err))
	}
	// Weave's start line about trusted subnets, then ours.
	if len(d.cfg.TrustedSubnets) > 0 {
		d.log.Info("Communication between peers via untrusted networks is encrypted.", zap.Stringers("trusted_subnets", d.cfg.TrustedSubnets))
	}
	d.log.Info("WireGuard data plane started: data to peers is encrypted; IPv4 forwarding is on so that this host can relay",
		zap.Uint16("wg_port", d.cfg.WGPort), zap.Stringer("public_key", d.secure.Identity.Public), zap.String("socket", wgplane.SocketPath(d.cfg.Iface)))
	return nil
}

func (d *Daemon) delRangeRoute() {
	if err := netconf.DelRoute(d.cfg.Iface, d.cfg.Range); err != nil {
		d.log.Warn("removing the range route", zap.Error(err))
	}
}

// openFirewall adds the FORWARD rules the containers' traffic needs;
// without iptables overlayd warns and goes on, unless the Docker plugin
// needs them.
func (d *Daemon) openFirewall() error {
	if !d.cfg.Firewall {
		return nil
	}
	fw, err := firewall.New(d.cfg.Iface)
	if err == nil {
		err = fw.Install()
	}
	switch {
	case err != nil && d.cfg.DockerPlugin:
		return err
	case err != nil:
		d.log.Warn("no FORWARD rules for the containers' traffic: it passes only if the FORWARD policy lets it", zap.Error(err))
	default:
		d.fw = fw
		d.undo = append(d.undo, d.removeFirewall)
	}
	return nil
}

func (d *Daemon) removeFirewall() {
	if err := d.fw.Remove(); err != nil {
		d.log.Warn("removing the FORWARD rules", zap.Error(err))
	}
}

// newServices makes the allocator, the name service and the containers'
// shell, each from its saved state.
func (d *Daemon) newServices() error {
	exposed, err := loadExposed(d.cfg.StateDir)
	if err != nil {
		return err
	}
	d.restoring = exposed
	var seed [24]byte
	crand.Read(seed[:])
	if d.cfg.Range.IsValid() {
		d.alloc, err = allocsrv.New(allocsrv.Config{
			Node: ipalloc.Config{Self: d.name, UID: d.router.UID(), Universe: d.cfg.Range, DefaultSubnet: d.cfg.DefaultSubnet,
				Mode: d.cfg.IPAMMode, Quorum: d.cfg.Quorum, Seeds: d.cfg.Seeds},
			StateDir: d.cfg.StateDir,
			Router:   channelRouter{d.router.Outbox(proto.ChannelIPAM), d.router},
			Publish:  d.publishOwnership,
			Lost:     d.addressesLost,
			Rand:     rand.New(rand.NewPCG(binary.LittleEndian.Uint64(seed[:8]), binary.LittleEndian.Uint64(seed[8:16]))),
			Log:      d.log.Named("ipam"),
		})
		if err != nil {
			return err
		}
		d.undo = append(d.undo, d.alloc.Close)
		if d.cfg.IPAMMode == ipalloc.Consensus {
			d.log.Info(fmt.Sprintf("Assuming quorum size of %d", d.cfg.Quorum))
		}
	}
	if d.cfg.DNS {
		rnd := rand.New(rand.NewPCG(binary.LittleEndian.Uint64(seed[16:]), 1))
		d.names, err = startNames(d.cfg, d.name, channelRouter{d.router.Outbox(proto.ChannelNames), d.router}, d.signing,
			d.router.SigningKey, rnd, d.log.Named("dns"))
		if err != nil {
			return err
		}
		d.undo = append(d.undo, d.names.server.Close)
	}
	d.boxes, err = newContainerShell(d, filepath.Join(d.cfg.StateDir, attachFile))
	return err
}

// newDocker connects to Docker (lazily: nothing is dialled yet) when it
// is there or the plugin needs it, and makes the driver and its socket.
func (d *Daemon) newDocker() error {
	if d.cfg.DockerAPI == "" || !d.cfg.DockerPlugin && !dockerSocketExists(d.cfg.DockerAPI) {
		return nil
	}
	var err error
	if d.docker, err = newDockerClient(d.cfg.DockerAPI); err != nil {
		return err
	}
	d.undo = append(d.undo, func() { d.docker.Close() })
	if !d.cfg.DockerPlugin {
		return nil
	}
	var names dockerplugin.Names
	if d.names != nil {
		names = driverNames{d}
	}
	d.driver, err = dockerplugin.NewDriver(dockerplugin.DriverConfig{
		Name: d.cfg.PluginName, Socket: filepath.Join(d.cfg.PluginDir, d.cfg.PluginName+".sock"), Network: d.cfg.DockerNetwork,
		Range: d.cfg.Range, DefaultSubnet: d.cfg.DefaultSubnet, MTU: d.containerMTU(), Domain: d.cfg.DNSDomain,
		StateDir: d.cfg.StateDir, Log: d.log.Named("plugin"),
	}, driverIPAM{d}, names, driverLinks{d}, dockerEngine{d.docker, d.log.Named("plugin")})
	if err != nil {
		return err
	}
	if d.plugin, err = dockerplugin.Listen(d.cfg.PluginDir, d.cfg.PluginName, d.driver, d.log.Named("plugin")); err != nil {
		return err
	}
	d.undo = append(d.undo, d.plugin.Close)
	return nil
}

// listen opens the control socket and the metrics listener.
func (d *Daemon) listen() error {
	srv, err := api.Listen(d.cfg.Socket, d, buildinfo.Version, d.log.Named("api"))
	if err != nil {
		return err
	}
	d.api = srv
	d.undo = append(d.undo, srv.Close)
	if d.cfg.MetricsAddr == "" {
		return nil
	}
	cs := []prometheus.Collector{d.router.Collector(), keeperCollector(d.keeper)}
	if d.alloc != nil {
		cs = append(cs, d.alloc.Collector())
	}
	if d.names != nil {
		cs = append(cs, d.names.collector())
	}
	if d.plane != nil {
		cs = append(cs, newPlaneCollector(d))
	}
	reg, err := metrics.NewRegistry(cs...)
	if err != nil {
		return err
	}
	if d.ms, err = metrics.Listen(d.cfg.MetricsAddr, reg); err != nil {
		return err
	}
	d.undo = append(d.undo, d.ms.Close)
	return nil
}

// teardown undoes what New set up, last first.
func (d *Daemon) teardown() {
	for _, f := range slices.Backward(d.undo) {
		f()
	}
	d.undo = nil
}

// Run runs every part until ctx ends or one of them fails, then tears
// down what New set up. The router closes the device, which takes its
// addresses and routes with it; the rest is removed here.
func (d *Daemon) Run(ctx context.Context) error {
	d.log.Info("overlayd started",
		zap.String("version", buildinfo.Version), zap.Stringer("peer", d.name), zap.String("nick", d.cfg.Nickname),
		zap.Stringer("range", d.cfg.Range), zap.String("iface", d.cfg.Iface), zap.Int("mtu", d.mtu),
		zap.Int("underlay_mtu", d.underlay), zap.Uint16("port", d.pc.LocalPort()), zap.String("socket", d.cfg.Socket),
		zap.Strings("targets", d.cfg.Targets), zap.String("metrics", d.cfg.MetricsAddr), zap.Bool("dns", d.cfg.DNS))
	if d.names != nil {
		d.log.Info("DNS server started", zap.String("endpoint", d.names.listen.String()), zap.String("name", d.cfg.DNSDomain),
			zap.Uint32("ttl", d.cfg.DNSTTL), zap.String("resolv_conf", d.cfg.ResolvConf), zap.Stringers("allow", d.cfg.DNSAllow))
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return d.router.Run(gctx) })
	g.Go(func() error { return d.api.Run(gctx) })
	g.Go(func() error { return d.keeper.Run(gctx) })
	g.Go(func() error { return d.boxes.Run(gctx) })
	if d.alloc != nil {
		g.Go(func() error { return d.alloc.Run(gctx) })
		g.Go(func() error { d.giveUp(gctx); return nil })
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
	if d.plugin != nil {
		d.log.Info("Docker plugin started", zap.String("socket", d.plugin.Path()), zap.String("driver", d.cfg.PluginName))
		g.Go(func() error { return d.plugin.Run(gctx) })
		g.Go(func() error { return d.driver.EnsureNetwork(gctx) })
	}
	if d.docker != nil {
		g.Go(func() error { return d.watchDocker(gctx) })
	}
	if d.ms != nil {
		g.Go(func() error { return d.ms.Run(gctx) })
	}
	g.Go(func() error { d.restoreExposed(gctx); return nil })
	if len(d.cfg.Targets) > 0 {
		if err := d.router.Connect(gctx, d.cfg.Targets); err != nil {
			d.log.Error("adding targets", zap.Error(err))
		}
	}
	err := g.Wait()
	// The parts that ran closed their sockets; the rest is undone here.
	if d.plane != nil {
		d.plane.Close() // and the TUN device with it
	}
	if d.cfg.Range.IsValid() {
		d.delRangeRoute()
	}
	if d.fw != nil {
		d.removeFirewall()
	}
	if d.docker != nil {
		d.docker.Close()
	}
	d.undo = nil
	d.log.Info("overlayd stopped")
	return err
}

// channelRouter is the router as the user of one gossip channel sees it:
// its outbox, and the peers it reaches.
type channelRouter struct {
	*peering.Outbox
	*peering.Router
}
