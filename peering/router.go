// Package peering is overlayd's router: it keeps connections to peers over
// one UDP socket (handshake, heartbeats, retries), learns from them which
// addresses they serve, and forwards IP packets between the TUN device and
// those peers.
//
// Goroutines, all started by Run and all stopped when its context ends:
//
//   - the control loop (control.go) owns every connection, target and
//     announcement; nothing else touches them. It publishes what the data
//     path needs as an immutable snapshot behind an atomic.Pointer;
//   - tunToPeers and peersToTun (datapath.go) move packets in batches and
//     read that snapshot once per batch;
//   - one goroutine per hostname resolution of a target.
//
// Policy lives in pure packages (handshake, routes, proto); this package
// carries it out.
//
// Files: router.go (the Router and the methods the rest of overlayd calls),
// control.go (the control loop), datapath.go (the forwarding loops),
// outbox.go (the gossip channels' outbound queues), status.go (what the
// router reports) and metrics.go.
package peering

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/ratelimit"
	"github.com/overlayd/overlayd/peering/conn"
	"github.com/overlayd/overlayd/peering/handshake"
	"github.com/overlayd/overlayd/peering/link"
	"github.com/overlayd/overlayd/peering/routes"
	"github.com/overlayd/overlayd/peering/secure"
	"github.com/overlayd/overlayd/peering/topology"
	"github.com/overlayd/overlayd/proto"
	"github.com/overlayd/overlayd/tun"
)

// DefaultPort is the UDP port peers use when none is given.
const DefaultPort = link.DefaultPort

// Config configures a Router. Zero durations take the defaults listed; the
// link Machine counts them in ticks of TickEvery.
type Config struct {
	Name     proto.PeerName // required, never zero
	Nickname string
	UID      uint64       // 0 draws a random one from Rand
	Range    netip.Prefix // IPAM range, compared in the handshake; invalid = IPAM off
	MTU      int          // MTU of the TUN device, reported in status
	Rand     *rand.Rand   // every random choice (UID, retry jitter); required
	Log      *zap.Logger  // required

	// Secure turns on password mode: peers prove the password in a Noise
	// handshake and seal every control message after it. Nil: plaintext.
	Secure *secure.Config
	// DataPlane, when set, carries the data packets instead of the router
	// (the WireGuard plane of password mode): New takes no TUN device, the
	// router refuses data messages on its socket, and it hands the plane
	// the peers to reach and the prefixes to send each, on every change.
	DataPlane DataPlane
	// DataPort is the port of that plane, told to peers in the handshake.
	DataPort uint16
	// TrustedSubnets are the underlay subnets whose peers may exchange
	// data with us in clear (password mode, Weave's --trusted-subnets):
	// with a peer that trusts our address too, data goes by the router,
	// not the plane. It needs Divert.
	TrustedSubnets []netip.Prefix
	// Divert is the TUN device as the data plane reads it when
	// TrustedSubnets is set: the router takes the packets for plaintext
	// peers out of the plane's reads and writes theirs into it.
	Divert *Divert
	// Signing signs our topology entry (password mode): its public key
	// goes in the handshake and the entry, and entries of other peers must
	// be signed by theirs. Nil: plaintext.
	Signing *secure.SigningKey

	Discovery bool // dial the peers the topology tells of
	// Channels are the gossip channels other subsystems serve: a message
	// for us on one of them is handed, whole, to its function, on the
	// control goroutine (it must not block; payload is its own).
	Channels          map[string]func(src proto.PeerName, payload []byte)
	ConnLimit         int           // connections at most; 0: MaxConnLimit
	TickEvery         time.Duration // 100 ms: the link Machine's clock
	GossipInterval    time.Duration // 1 s: a topology gossip round
	HeartbeatInterval time.Duration // 400 ms: between heartbeats on a connection
	HeartbeatTimeout  time.Duration // 2 s: silence after which a connection is dead
	HelloInterval     time.Duration // 1 s: between hellos while dialling
	HelloAttempts     int           // 5: hellos before a dial fails
	RetryInitial      time.Duration // 2 s: first wait after a failure (±50 % jitter)
	RetryMax          time.Duration // 60 s: cap of the exponential back-off
}

func (c *Config) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.TickEvery, 100*time.Millisecond)
	def(&c.HeartbeatInterval, 400*time.Millisecond)
	def(&c.HeartbeatTimeout, 2*time.Second)
	def(&c.HelloInterval, time.Second)
	def(&c.RetryInitial, 2*time.Second)
	def(&c.RetryMax, 60*time.Second)
	def(&c.GossipInterval, time.Second)
	if c.HelloAttempts == 0 {
		c.HelloAttempts = 5
	}
}

func (c *Config) validate() error {
	switch {
	case c.Name == 0:
		return errors.New("peering: config has no peer name")
	case c.Rand == nil:
		return errors.New("peering: config has no random source")
	case c.Log == nil:
		return errors.New("peering: config has no logger")
	case c.MTU < 576 || c.MTU > 65535-proto.DataHeaderLen:
		return fmt.Errorf("peering: MTU %d out of range", c.MTU)
	case c.TickEvery <= 0 || c.HeartbeatInterval < c.TickEvery:
		return errors.New("peering: the heartbeat interval must be at least one tick")
	}
	return nil
}

// toTicks converts a duration to whole ticks, rounding up.
func (c *Config) toTicks(d time.Duration) int {
	return int((d + c.TickEvery - 1) / c.TickEvery)
}

// ticks converts a tick count back to a duration.
func (r *Router) ticks(n int) time.Duration { return time.Duration(n) * r.cfg.TickEvery }

// A DataPlane carries data packets to the peers the router programs.
type DataPlane interface {
	// Program replaces the plane's peers with peers (in name order). It is
	// called on the control goroutine and must not block for long; on
	// failure the plane keeps what it had.
	Program(peers []DataPeer) error
}

// A DataPeer is a directly connected peer as the data plane sees it: its
// key, where its plane listens, and the prefixes whose packets go to it
// first: those it serves and those of the peers it relays to.
type DataPeer struct {
	Name     proto.PeerName
	Key      secure.Key
	Endpoint netip.AddrPort
	Prefixes []netip.Prefix // sorted
}

// MaxConnLimit is the most connections a router keeps (Config.ConnLimit).
const MaxConnLimit = link.MaxConnLimit

// ctrlQueueLen bounds the control datagrams from strangers (endpoints with
// no established connection: hellos, and anything spoofed) waiting for the
// control loop, and peerQueueLen those from established peers, which the
// loop takes first: a flood of the first kind cannot delay heartbeats and
// gossip. Each entry is at most one datagram long.
const (
	ctrlQueueLen = 256
	peerQueueLen = 256
)

// Each source has a share of the control loop, so that one cannot take
// what all share: a stranger's address (however many ports it sends from)
// strangerRate control datagrams a second on average, strangerBurst at
// once, far more than a handshake and its retries need; an established
// peer's endpoint peerRate and peerBurst, more than the largest state
// transfer (a names store of MaxPayload bytes in gossip chunks). A source
// that sends more loses the rest, counted as source_limit or peer_limit.
const (
	strangerRate, strangerBurst = 100, 200
	peerRate, peerBurst         = 5000, 10000
)

// ErrStopped is returned by calls on a Router whose Run has ended.
var ErrStopped = errors.New("peering: the router has stopped")

// A Router connects this host to its peers. Make one with New, then call Run.
type Router struct {
	cfg  Config
	link *link.Machine  // owned by the control loop once Run starts
	topo *topology.Node // the same
	// gossipTicks is the length of a gossip round in link ticks.
	gossipTicks int
	port        uint16
	log         *zap.Logger
	dev         tun.Device
	pc          conn.PacketConn

	snap atomic.Pointer[snapshot] // written by the control loop only

	ctrl     chan inbound // control datagrams of strangers from peersToTun to the control loop
	peerCtrl chan inbound // those of established peers, taken first
	// strangers and peerLimit share the control loop out among sources
	// (see strangerRate).
	strangers *ratelimit.Table[netip.Addr]
	peerLimit *ratelimit.Table[netip.AddrPort]
	requests  chan request    // API calls to the control loop
	resolved  chan resolution // hostname lookups finished
	// wake tells the control loop that an outbox has messages or that
	// SetLocal or SetOwners left something pending; room for one.
	wake     chan struct{}
	outboxes map[string]*Outbox // by channel, one for each of Config.Channels
	channels []string           // their names, sorted

	pendMu sync.Mutex
	// pendLocal and pendOwners are the latest SetLocal and SetOwners the
	// control loop has not taken yet (nil: none); guarded by pendMu.
	pendLocal  []netip.Prefix
	pendOwners []Owner

	bg sync.WaitGroup // resolver goroutines

	// stopped is closed when the control loop has stopped, so that API
	// calls fail instead of waiting for it.
	stopped chan struct{}

	stats Stats
}

// New checks cfg and makes a Router that will forward between dev and pc.
// It starts nothing; Run takes ownership of dev and pc and closes both.
// With a DataPlane, dev must be nil: the plane owns the device.
func New(cfg Config, dev tun.Device, pc conn.PacketConn) (*Router, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if (dev == nil) != (cfg.DataPlane != nil) {
		return nil, errors.New("peering: a router needs either a TUN device or a data plane, not both")
	}
	if (cfg.Divert != nil) != (cfg.DataPlane != nil && len(cfg.TrustedSubnets) > 0) {
		return nil, errors.New("peering: trusted subnets need a data plane and a Divert, and a Divert needs them")
	}
	if cfg.UID == 0 {
		for cfg.UID == 0 {
			cfg.UID = cfg.Rand.Uint64()
		}
	}
	m, err := link.New(link.Config{
		Self: handshake.Config{Name: cfg.Name, UID: cfg.UID, Nickname: cfg.Nickname,
			Port: pc.LocalPort(), Range: cfg.Range, DataPort: cfg.DataPort, SignKey: signKey(cfg.Signing)},
		Rand:              cfg.Rand,
		Secure:            cfg.Secure,
		HeartbeatTicks:    cfg.toTicks(cfg.HeartbeatInterval),
		TimeoutTicks:      cfg.toTicks(cfg.HeartbeatTimeout),
		HelloTicks:        cfg.toTicks(cfg.HelloInterval),
		HelloAttempts:     cfg.HelloAttempts,
		RetryInitialTicks: cfg.toTicks(cfg.RetryInitial),
		RetryMaxTicks:     cfg.toTicks(cfg.RetryMax),
		LongLivedTicks:    cfg.toTicks(time.Minute),
		ConnLimit:         cfg.ConnLimit,
		Trusted:           cfg.TrustedSubnets,
	})
	if err != nil {
		return nil, err
	}
	tcfg := topology.Config{Self: cfg.Name, UID: cfg.UID, Nickname: cfg.Nickname, Port: pc.LocalPort(), Rand: cfg.Rand}
	if k := cfg.Signing; k != nil {
		tcfg.Signer = &topology.Signer{Key: k.Public, Sign: k.Sign}
	}
	topo, err := topology.New(tcfg)
	if err != nil {
		return nil, err
	}
	r := &Router{
		cfg:         cfg,
		link:        m,
		topo:        topo,
		gossipTicks: max(1, cfg.toTicks(cfg.GossipInterval)),
		port:        pc.LocalPort(),
		log:         cfg.Log,
		dev:         dev,
		pc:          pc,
		ctrl:        make(chan inbound, ctrlQueueLen),
		peerCtrl:    make(chan inbound, peerQueueLen),
		strangers:   ratelimit.New[netip.Addr](strangerRate, strangerBurst),
		peerLimit:   ratelimit.New[netip.AddrPort](peerRate, peerBurst),
		requests:    make(chan request),
		resolved:    make(chan resolution, 16),
		wake:        make(chan struct{}, 1),
		outboxes:    map[string]*Outbox{},
		stopped:     make(chan struct{}),
	}
	for _, name := range slices.Sorted(maps.Keys(cfg.Channels)) {
		r.outboxes[name] = &Outbox{channel: name, wake: r.wake}
		r.channels = append(r.channels, name)
	}
	r.snap.Store(&snapshot{routes: routes.New[*path](nil)})
	if cfg.Divert != nil {
		cfg.Divert.r.Store(r)
	}
	return r, nil
}

// signKey is the public half of k; zero without one.
func signKey(k *secure.SigningKey) [proto.TopoKeyLen]byte {
	if k == nil {
		return [proto.TopoKeyLen]byte{}
	}
	return k.Public
}

// SigningKey is the key peer name signs its gossip with, as the topology
// knows it (password mode); false if not known (yet). Safe from any
// goroutine.
func (r *Router) SigningKey(name proto.PeerName) ([proto.TopoKeyLen]byte, bool) {
	k, ok := r.snap.Load().keys[name]
	return k, ok
}

// UID is this process's random incarnation number.
func (r *Router) UID() uint64 { return r.cfg.UID }

// Name is our peer name.
func (r *Router) Name() proto.PeerName { return r.cfg.Name }

// Run forwards packets and keeps connections until ctx ends or the TUN
// device or socket fails. It closes the device and the socket before it
// returns, and returns nil after a clean shutdown.
func (r *Router) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	c := newControl(r, r.link, r.topo)
	wg.Go(func() {
		defer close(r.stopped)
		errs <- c.run(ctx)
	})
	wg.Go(func() { errs <- r.peersToTun() })
	if r.dev != nil {
		wg.Go(func() { errs <- r.tunToPeers() })
		wg.Go(func() {
			for range r.dev.Events() { // the device blocks if nobody drains these
			}
		})
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errs: // one loop stopped on its own: the router cannot work
		if err == nil {
			err = errors.New("peering: the TUN device or the UDP socket was closed under us")
		}
	}
	cancel()
	r.pc.Close()
	if r.dev != nil {
		r.dev.Close()
	}
	wg.Wait()
	r.bg.Wait()
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	return err
}

// snapshot is what the data path needs, published whole by the control loop.
type snapshot struct {
	routes *routes.Table[*path]
	// peers maps the endpoint of every established connection to its path:
	// data from any other endpoint is dropped.
	peers map[netip.AddrPort]*path
	// byName is where data for each reachable peer goes (relays use it).
	byName map[proto.PeerName]*path
	// nicks are the nicknames of the reachable peers whose topology
	// entry arrived.
	nicks map[proto.PeerName]string
	// keys are the signing keys peers are known by (password mode).
	keys map[proto.PeerName][proto.TopoKeyLen]byte
}

// path is where packets for one peer go. Immutable once published.
type path struct {
	name    proto.PeerName
	ep      conn.Endpoint  // of the first hop
	hop     proto.PeerName // the first hop: name itself unless relayed
	local   bool           // the prefix is ours: packets for it belong to our TUN
	relayed bool           // the first hop is not the destination
	// plain: in password mode, the first hop takes data in clear from the
	// router (trusted subnets); otherwise the data plane carries it.
	plain bool
}

// Stats counts what the data path did. All fields are updated atomically.
type Stats struct {
	TunPackets      atomic.Uint64 // read from the TUN device
	SentPackets     atomic.Uint64 // data messages handed to the socket
	SentBytes       atomic.Uint64
	ReceivedPackets atomic.Uint64 // data messages written to the TUN device
	ReceivedBytes   atomic.Uint64
	DropUnroutable  atomic.Uint64 // from the TUN, no peer serves the destination
	DropSendError   atomic.Uint64 // the socket refused them
	DropUnknownPeer atomic.Uint64 // data from an endpoint with no established connection
	DropNotForUs    atomic.Uint64 // data for an address we do not serve
	DropMalformed   atomic.Uint64 // undecodable datagrams of any type
	// DecodeErrors breaks DropMalformed down by message type; index 0 is a
	// bad header (unknown version or type, too short).
	DecodeErrors   [proto.TypeMax + 1]atomic.Uint64
	DropCtrlQueue  atomic.Uint64 // control messages of strangers dropped because the control loop lagged
	DropPeerQueue  atomic.Uint64 // the same, of established peers
	DropSourceRate atomic.Uint64 // control messages of a stranger beyond its rate (strangerRate)
	DropPeerRate   atomic.Uint64 // the same, of an established peer (peerRate)
	DropTunWrite   atomic.Uint64 // batches the TUN device refused (in part)
	DropTunRead    atomic.Uint64 // failed reads from the TUN device
	DropHops       atomic.Uint64 // data that crossed too many relays (a routing loop)
	DropPlainData  atomic.Uint64 // data messages in password mode from a peer whose data goes by WireGuard
	RelayedPackets atomic.Uint64 // data for other peers passed on
	RelayedBytes   atomic.Uint64

	GossipSentBytes      atomic.Uint64 // topology gossip datagrams sent
	GossipReceivedBytes  atomic.Uint64 // topology gossip payload received
	OtherSentBytes       atomic.Uint64 // the same for the other channels
	OtherReceivedBytes   atomic.Uint64
	GossipRejected       atomic.Uint64 // gossip refused: bad chunks, bad entries, forged origin
	GossipUnknownChannel atomic.Uint64
	// GossipUnsigned counts messages for us on a channel other than
	// topology, in password mode, without a valid signature of their
	// origin (or whose origin's key is not known yet).
	GossipUnsigned atomic.Uint64
	GossipRelayed  atomic.Uint64 // unicast gossip passed on to another peer
}

// Connect adds targets (HOST[:PORT]) and dials them at once. A target we
// already have has its back-off reset. Nothing is added if any address is
// malformed.
func (r *Router) Connect(ctx context.Context, addrs []string) error {
	var err error
	if derr := r.do(ctx, func(c *control) { err = c.m.Connect(addrs) }); derr != nil {
		return derr
	}
	return err
}

// ErrUnknownTarget is returned by Forget for an address that is not a target.
var ErrUnknownTarget = link.ErrUnknownTarget

// Forget removes targets and closes their connections. It fails, changing
// nothing, if an address is malformed or not a target.
func (r *Router) Forget(ctx context.Context, addrs []string) error {
	var err error
	if derr := r.do(ctx, func(c *control) { err = c.m.Forget(addrs) }); derr != nil {
		return derr
	}
	return err
}

// SetLocal replaces the prefixes this host serves (its exposed addresses)
// and announces them to every peer. It does not wait for the control loop:
// the latest call wins, and the router's status and routes show it from
// the next call that reads them.
func (r *Router) SetLocal(prefixes []netip.Prefix) error {
	ps := slices.Clone(prefixes)
	for _, p := range ps {
		if !p.IsValid() || !p.Addr().Is4() {
			return fmt.Errorf("peering: cannot serve %v: only IPv4 prefixes", p)
		}
	}
	if len(ps) > proto.MaxPrefixes {
		return fmt.Errorf("peering: cannot serve more than %d prefixes", proto.MaxPrefixes)
	}
	slices.SortFunc(ps, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	if ps == nil {
		ps = []netip.Prefix{} // none: not "nothing pending"
	}
	r.pendMu.Lock()
	r.pendLocal = ps
	r.pendMu.Unlock()
	r.poke()
	return nil
}

// Owner says which peer owns a part of the allocation range.
type Owner = routes.Owner[proto.PeerName]

// SetOwners replaces the allocator's view of who owns the range: packets
// for an address go to its owner (a prefix a peer announces, such as an
// exposed address, is more specific and wins). Like SetLocal, it does not
// wait.
func (r *Router) SetOwners(owners []Owner) error {
	own := slices.Clone(owners)
	for _, o := range own {
		if !o.Prefix.IsValid() || !o.Prefix.Addr().Is4() || o.Peer == 0 {
			return fmt.Errorf("peering: bad owner %v of %v", o.Peer, o.Prefix)
		}
	}
	if own == nil {
		own = []Owner{}
	}
	r.pendMu.Lock()
	r.pendOwners = own
	r.pendMu.Unlock()
	r.poke()
	return nil
}

// poke wakes the control loop.
func (r *Router) poke() { notify(r.wake) }

// Reachable returns the peers the router can send to now, directly or
// through others.
func (r *Router) Reachable() []proto.PeerName {
	snap := r.snap.Load()
	out := make([]proto.PeerName, 0, len(snap.byName))
	for name := range snap.byName {
		out = append(out, name)
	}
	slices.Sort(out)
	return out
}

// Nickname returns the nickname of a reachable peer, "" if it is not
// reachable or its topology entry has not arrived.
func (r *Router) Nickname(p proto.PeerName) string {
	if snap := r.snap.Load(); snap != nil {
		return snap.nicks[p]
	}
	return ""
}

// ParseTarget checks a peer address given as HOST, HOST:PORT, [IPv6] or
// [IPv6]:PORT and returns its host and port.
func ParseTarget(s string) (host string, port uint16, err error) { return link.ParseTarget(s) }
