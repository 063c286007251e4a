// Package link is the life of this peer's links to other peers: dialling
// targets (configured or discovered), the hello/accept/reject handshake, the
// connection limit, heartbeats, time-outs and retries with back-off. Gossip
// from connected peers is checked and handed up; what it means is the
// business of other cores (topology).
//
// The package is pure and deterministic: no sockets, clocks, goroutines or
// globals. Time enters as Tick (one tick is a fixed interval the shell
// chooses, 100 ms in overlayd); randomness (retry jitter) comes from
// Config.Rand. Inputs arrive through Step (a datagram from a peer), Tick,
// Connect, Forget, Resolved and SetLocal; outputs collect in Ready (datagrams
// to send, host names to resolve, events to log, a new route set) until the
// caller acknowledges them with Advance. A Machine is not safe for
// concurrent use: exactly one goroutine owns it.
package link

import (
	"cmp"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"

	"github.com/overlayd/overlayd/peering/handshake"
	"github.com/overlayd/overlayd/peering/secure"
	"github.com/overlayd/overlayd/proto"
)

// Config configures a Machine. Zero tick counts take the defaults listed
// (in ticks of 100 ms).
type Config struct {
	Self handshake.Config // our identity and what we accept
	Rand *rand.Rand       // retry jitter; required
	// Secure turns on password mode (see secure.go); nil is plaintext.
	Secure *secure.Config

	HeartbeatTicks    int // 4: between heartbeats on a connection
	TimeoutTicks      int // 20: silence after which a connection is dead
	HelloTicks        int // 10: between hellos while dialling
	HelloAttempts     int // 5: hellos before a dial fails
	RetryInitialTicks int // 20: first wait after a failure (±50 % jitter)
	RetryMaxTicks     int // 600: cap of the exponential back-off
	// ConnLimit bounds connections (0: MaxConnLimit, the most there may
	// be); see room.
	ConnLimit int
	// LongLivedTicks: a connection that lasted longer is retried at once
	// when it fails (600).
	LongLivedTicks int
	// MaxPendingInbound bounds inbound connections still waiting for their
	// first heartbeat, so that spoofed hellos cannot grow our state (64).
	MaxPendingInbound int
	// RejectBurst is how many rejects (and cookies) may go out at once;
	// the budget refills by one per tick, so spoofed hellos cannot make us
	// a reflector (20).
	RejectBurst int
	// CookieTicks is how often the cookie secret changes (1200).
	CookieTicks int
	// ProofKey keys the proofs of plaintext accepts (see
	// proto.Hello.Proof); zero: drawn from Rand, which must then be
	// seeded unpredictably.
	ProofKey [32]byte
	// Trusted are the underlay subnets whose peers may exchange data in
	// clear with us (password mode, Weave's --trusted-subnets): a
	// connection's data is plaintext only if each side trusts the other's
	// address. Control messages are sealed all the same.
	Trusted []netip.Prefix
}

// trusts reports whether a is in a trusted subnet.
func (c *Config) trusts(a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range c.Trusted {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func (c *Config) setDefaults() {
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	def(&c.HeartbeatTicks, 4)
	def(&c.TimeoutTicks, 20)
	def(&c.HelloTicks, 10)
	def(&c.HelloAttempts, 5)
	def(&c.RetryInitialTicks, 20)
	def(&c.RetryMaxTicks, 600)
	def(&c.LongLivedTicks, 600)
	def(&c.ConnLimit, MaxConnLimit)
	def(&c.MaxPendingInbound, 64)
	def(&c.RejectBurst, 20)
	def(&c.CookieTicks, 1200)
}

// MaxConnLimit is the most connections a Machine keeps, whatever ConnLimit
// says: each costs memory and a heartbeat, and a mesh this size already
// gossips more than it carries.
const MaxConnLimit = 4096

func (c *Config) validate() error {
	switch {
	case c.ConnLimit > MaxConnLimit:
		return fmt.Errorf("link: a connection limit of %d is over the most there may be, %d", c.ConnLimit, MaxConnLimit)
	case c.Self.Name == 0:
		return errors.New("link: config has no peer name")
	case c.Self.UID == 0:
		return errors.New("link: config has no UID")
	case c.Rand == nil:
		return errors.New("link: config has no random source")
	case c.TimeoutTicks <= c.HeartbeatTicks:
		return errors.New("link: the time-out must be longer than the heartbeat interval")
	case c.Self.Range.IsValid() && !c.Self.Range.Addr().Is4():
		return fmt.Errorf("link: range %v is not IPv4", c.Self.Range)
	case c.Secure != nil && c.Secure.Random == nil:
		return errors.New("link: password mode needs a source of random bytes")
	}
	return nil
}

// Endpoint is the path of a datagram: the peer's address and port, and our
// address on that path (the zero Addr lets the kernel choose).
type Endpoint struct {
	Remote netip.AddrPort
	Local  netip.Addr
}

// Datagram is a message to send. Msg belongs to the receiver of Ready.
type Datagram struct {
	To  Endpoint
	Msg []byte
}

// Resolve asks the shell to look up a target's host name and report the
// result with Resolved(Target, Gen, ...).
type Resolve struct {
	Target string // host:port, the target's key
	Host   string
	Port   uint16
	Gen    int
}

// EventKind says what an Event reports.
type EventKind int

// Events worth a log line.
const (
	EventEstablished     EventKind = iota + 1 // a connection is established
	EventLost                                 // a connection ended; Err says why
	EventRefused                              // a handshake was refused (either side); Err says why
	EventRestarted                            // a peer came back as a new incarnation
	EventTargetAdded                          // Endpoint is the target
	EventTargetForgotten                      // Endpoint is the target
	EventRetry                                // a target will be retried in RetryTicks
)

// Event is something that happened, for the shell to log.
type Event struct {
	Kind       EventKind
	Peer       proto.PeerName
	Nick       string
	Endpoint   string // the peer's address and port, or the target
	Err        error
	Prefixes   []netip.Prefix
	RetryTicks int
}

// PeerPath is an established peer and where its datagrams go.
type PeerPath struct {
	Name     proto.PeerName
	UID      uint64
	Nickname string
	Via      Endpoint
	Outbound bool
	// Key is the peer's identity key, proven in the handshake (password
	// mode; zero otherwise), and DataPort the port its WireGuard data
	// plane listens on (0: none).
	Key      secure.Key
	DataPort uint16
	// SignKey is the Ed25519 key that signs the peer's gossip, from its
	// hello (password mode only: there the hello is authenticated).
	SignKey [32]byte
	// Plaintext says data to and from this peer goes in clear, by the
	// router, not the data plane: password mode, and each side trusts the
	// other's address (Config.Trusted, Hello.Trusted).
	Plaintext bool
}

// Routing is the set of established peers, rebuilt whole on every change.
type Routing struct {
	Peers []PeerPath // in name order
}

// Gossip is a gossip message from a connected peer, checked: it came from
// the peer it names as origin, or was relayed (Hops > 0).
type Gossip struct {
	From    proto.PeerName // the neighbour it came from
	FromUID uint64         // that neighbour's incarnation
	Via     Endpoint
	Msg     proto.Gossip // Payload is a copy, owned by the receiver
}

// Ready is the work produced since the last Advance.
type Ready struct {
	Sends   []Datagram
	Resolve []Resolve
	Events  []Event
	Gossip  []Gossip
	Routing *Routing // nil unless it changed
}

// Empty reports whether there is nothing to do.
func (rd *Ready) Empty() bool {
	return len(rd.Sends) == 0 && len(rd.Resolve) == 0 && len(rd.Events) == 0 && len(rd.Gossip) == 0 && rd.Routing == nil
}

// state is where a connection stands, as Weave shows it.
type state int

const (
	stateConnecting  state = iota // hello sent, no answer yet
	statePending                  // handshake done, waiting for the peer to confirm
	stateEstablished              // both sides have confirmed
)

func (s state) String() string { return [...]string{"connecting", "pending", "established"}[s] }

// connection is one association with a peer at one remote endpoint.
type connection struct {
	ep       Endpoint
	outbound bool    // we dialled it (it serves a target)
	target   *target // the first target it serves; nil for inbound connections
	state    state
	started  int64 // tick the handshake completed; 0 while connecting
	// remote is the peer's hello; its Name is zero until we have one.
	remote    proto.Hello
	hellos    int   // hellos sent while connecting
	nextHello int64 // tick of the next hello
	lastHeard int64 // tick of the last hello, accept or heartbeat
	nextBeat  int64
	// remoteEstablished is the peer's own view, from its heartbeats.
	remoteEstablished bool
	// configured is set on an inbound connection whose peer dialled us
	// because we are one of its configured targets (hello flag).
	configured bool
	// Plaintext mode: proof is what our accept asked an inbound dialler
	// to send back (proven once it has), echo what an accept asked of us.
	proof  uint64
	proven bool
	echo   uint64

	// Password mode (secure.go).
	init        *secure.Initiator // our handshake attempt while connecting
	cookie      proto.Cookie      // the last cookie the peer gave us
	wantsCookie bool              // an init went out since the last cookie we took
	sess        *secure.Session   // seals and opens everything after the handshake
	finish      []byte            // our finish message, sent again until the peer answers sealed
}

// targetState is where a target stands while it has no connection.
type targetState int

const (
	targetConnecting targetState = iota // first attempt in progress
	targetRetrying                      // attempt in progress after a failure
	targetFailed                        // waiting to retry
)

// target is an address we keep dialling.
type target struct {
	addr      string // host:port as normalised by ParseTarget
	host      string
	port      uint16
	gen       int // bumped whenever a pending lookup must be ignored
	state     targetState
	resolving bool
	conn      *connection
	lastErr   error
	retryAt   int64 // tick of the next attempt
	never     bool  // failed for good (our own address, name collision)
	backoff   int   // ticks
	// discovered targets come from the topology, not from the operator:
	// they are not listed as targets and go when the topology drops them.
	discovered bool
}

// Machine is the link state of one peer.
type Machine struct {
	cfg  Config
	now  int64 // ticks since New
	rd   Ready
	conn map[netip.AddrPort]*connection

	targets map[string]*target
	order   []string // target keys in the order they were added

	rejectBudget int
	// answering is the length of the datagram Step is taking: no reject
	// sent in answer to it is longer (the sender's address is not proven).
	answering int

	malformed uint64 // control messages that did not decode
	// Impostors counts gossip from a peer that claims another's name.
	Impostors uint64
	// Unproven counts what a plaintext peer does not answer or take from
	// an address nobody has proven: hellos shorter than
	// proto.HelloMinLen, heartbeats of inbound connections that did not
	// bring back our accept's proof, and datagrams shorter than the
	// reject they would get.
	Unproven uint64

	// Password mode (secure.go).
	cookies    *secure.Cookies
	responding map[netip.AddrPort]*responding
	// Sealed counts what password mode refused.
	Sealed SealedStats
}

// New checks cfg and makes a Machine.
func New(cfg Config) (*Machine, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	m := &Machine{
		cfg:          cfg,
		conn:         make(map[netip.AddrPort]*connection),
		targets:      make(map[string]*target),
		rejectBudget: cfg.RejectBurst,
		responding:   make(map[netip.AddrPort]*responding),
	}
	if cfg.Secure != nil {
		var err error
		if m.cookies, err = secure.NewCookies(cfg.Secure.Random); err != nil {
			return nil, err
		}
	}
	if m.cfg.ProofKey == [32]byte{} {
		for i := 0; i < len(m.cfg.ProofKey); i += 8 {
			binary.LittleEndian.PutUint64(m.cfg.ProofKey[i:], cfg.Rand.Uint64())
		}
	}
	return m, nil
}

// proofFor is the proof our accept asks of the dialler h at ep: a keyed
// hash of both, so it needs no state and a retransmitted accept carries
// the same one.
func (m *Machine) proofFor(ep netip.AddrPort, h *proto.Hello) uint64 {
	mac := hmac.New(sha256.New, m.cfg.ProofKey[:])
	b, _ := ep.MarshalBinary()
	mac.Write(b)
	mac.Write(binary.BigEndian.AppendUint64(nil, uint64(h.Name)))
	mac.Write(binary.BigEndian.AppendUint64(nil, h.UID))
	return max(binary.BigEndian.Uint64(mac.Sum(nil)), 1) // 0 is "none"
}

// unproven says cn is an inbound plaintext connection whose dialler has
// not yet sent back our accept's proof: we do not know it receives at the
// address it claims, so it gets no gossip taken and no establishment.
func (m *Machine) unproven(cn *connection) bool {
	return m.cfg.Secure == nil && !cn.outbound && !cn.proven
}

// Now is the number of ticks since New.
func (m *Machine) Now() int64 { return m.now }

// Malformed counts the control messages Step rejected.
func (m *Machine) Malformed() uint64 { return m.malformed }

// Ready returns the work produced since the last Advance; the same value
// until Advance.
func (m *Machine) Ready() Ready { return m.rd }

// Advance tells the Machine the caller has acted on all of Ready.
func (m *Machine) Advance() { m.rd = Ready{} }

func (m *Machine) event(e Event) { m.rd.Events = append(m.rd.Events, e) }

func (m *Machine) send(to Endpoint, msg []byte) {
	m.rd.Sends = append(m.rd.Sends, Datagram{To: to, Msg: msg})
}

func (m *Machine) sendHello(cn *connection, t proto.Type) {
	h := m.cfg.Self.Hello()
	if t == proto.TypeAccept {
		h.Proof = cn.proof
	}
	msg := proto.AppendHello(nil, t, &h)
	if t == proto.TypeHello && cn.target != nil && !cn.target.discovered {
		msg[2] |= proto.FlagConfigured
	}
	m.send(cn.ep, msg)
}

func (m *Machine) sendHeartbeat(cn *connection) {
	msg := proto.AppendHeartbeat(nil, proto.Heartbeat{
		Name: m.cfg.Self.Name, UID: m.cfg.Self.UID, Established: cn.state == stateEstablished, Proof: cn.echo})
	if m.cfg.Secure != nil {
		var ok bool
		if msg, ok = m.seal(cn, msg); !ok {
			return
		}
	}
	m.send(cn.ep, msg)
}

// Tick advances time by one tick and runs the timers: dials, hello
// retries, heartbeats, time-outs.
func (m *Machine) Tick() {
	m.now++
	cfg := &m.cfg
	m.rejectBudget = min(m.rejectBudget+1, cfg.RejectBurst)
	if m.cfg.Secure != nil {
		m.tickSecure()
	}
	for _, key := range m.order {
		t := m.targets[key]
		if t.conn == nil && !t.resolving && !t.never && m.now >= t.retryAt && m.room(!t.discovered) {
			t.state = targetConnecting
			if t.lastErr != nil {
				t.state = targetRetrying
			}
			m.dial(t)
		}
	}
	for _, cn := range m.sorted() {
		switch {
		case cn.state == stateConnecting && m.now >= cn.nextHello:
			if cn.hellos >= cfg.HelloAttempts {
				m.drop(cn, fmt.Errorf("no answer to %d hellos", cn.hellos))
				continue
			}
			if m.cfg.Secure != nil {
				m.sendInit(cn)
			} else {
				m.sendHello(cn, proto.TypeHello)
			}
			cn.hellos++
			cn.nextHello = m.now + int64(cfg.HelloTicks)
		case cn.state != stateConnecting && m.now-cn.lastHeard > int64(cfg.TimeoutTicks):
			m.drop(cn, errTimeout)
			continue
		}
		if cn.state != stateConnecting && m.now >= cn.nextBeat {
			if cn.finish != nil {
				m.send(cn.ep, cn.finish) // the peer has not answered it yet
			}
			m.sendHeartbeat(cn)
			cn.nextBeat = m.now + int64(cfg.HeartbeatTicks)
		}
	}
}

// room says whether one more connection fits: a configured one up to
// ConnLimit, a discovered one while a tenth of the limit stays free.
func (m *Machine) room(configured bool) bool {
	switch {
	case configured:
		return len(m.conn) < m.cfg.ConnLimit
	}
	return len(m.conn) < m.cfg.ConnLimit-m.cfg.ConnLimit/10
}

// ConnLimitError refuses a connection beyond the limit; Weave's text.
type ConnLimitError struct{ Limit int }

func (e *ConnLimitError) Error() string { return fmt.Sprintf("Connection limit reached (%d)", e.Limit) }

var (
	errTimeout                = errors.New("timed out waiting for heartbeat")
	errCannotConnectToOurself = errors.New("cannot connect to ourself")
)

// dial starts an attempt on a target: an address is dialled at once, a host
// name is first resolved by the shell.
func (m *Machine) dial(t *target) {
	if a, err := netip.ParseAddr(t.host); err == nil {
		m.connectTarget(t, netip.AddrPortFrom(a.Unmap(), t.port))
		return
	}
	t.resolving = true
	t.gen++
	m.rd.Resolve = append(m.rd.Resolve, Resolve{Target: t.addr, Host: t.host, Port: t.port, Gen: t.gen})
}

// Resolved reports the result of a Resolve request. Results for forgotten
// targets or superseded requests are ignored.
func (m *Machine) Resolved(key string, gen int, ep netip.AddrPort, err error) {
	t := m.targets[key]
	if t == nil || gen != t.gen || !t.resolving {
		return
	}
	t.resolving = false
	if err != nil {
		m.targetFailed(t, fmt.Errorf("resolving %s: %w", t.host, err), 0)
		return
	}
	m.connectTarget(t, netip.AddrPortFrom(ep.Addr().Unmap(), ep.Port()))
}

// connectTarget attaches t to the connection at ep, making one if needed.
func (m *Machine) connectTarget(t *target, ep netip.AddrPort) {
	if cn := m.conn[ep]; cn != nil {
		// Already talking to that endpoint (the peer dialled us first, or
		// another target names the same endpoint): share the connection.
		if cn.target == nil {
			cn.target = t
		}
		cn.outbound, t.conn = true, cn
		return
	}
	cn := &connection{ep: Endpoint{Remote: ep}, outbound: true, target: t, state: stateConnecting, nextHello: m.now}
	m.conn[ep] = cn
	t.conn = cn
}

// Step handles one control datagram from a peer. It returns an error, and
// changes nothing, for a message that does not decode. msg is not retained.
func (m *Machine) Step(from Endpoint, msg []byte) error {
	m.answering = len(msg)
	defer func() { m.answering = 0 }()
	hd, err := proto.ParseHeader(msg)
	if err != nil {
		m.malformed++
		return err
	}
	if hd.Type >= proto.TypeInit || m.cfg.Secure != nil && hd.Type != proto.TypeReject {
		return m.stepSecure(from, hd, msg)
	}
	switch hd.Type {
	case proto.TypeHello, proto.TypeAccept:
		h, err := proto.ParseHello(msg)
		if err != nil {
			m.malformed++
			return err
		}
		if hd.Type == proto.TypeHello && len(msg) < proto.HelloMinLen {
			// Unpadded: our answer could be larger than the hello, to an
			// address nobody has proven.
			m.Unproven++
			return ErrShortHello
		}
		if hd.Type == proto.TypeHello {
			m.onHello(from, &h, hd.Flags&proto.FlagConfigured != 0)
		} else {
			m.onAccept(from, &h)
		}
	case proto.TypeReject:
		rj, err := proto.ParseReject(msg)
		if err != nil {
			m.malformed++
			return err
		}
		m.onReject(from, &rj)
	case proto.TypeHeartbeat:
		hb, err := proto.ParseHeartbeat(msg)
		if err != nil {
			m.malformed++
			return err
		}
		m.onHeartbeat(from, hb)
	case proto.TypeGossip:
		g, err := proto.ParseGossip(msg)
		if err != nil {
			m.malformed++
			return err
		}
		return m.onGossip(from, &g)
	case proto.TypeData:
		return errors.New("link: data messages belong to the data path")
	}
	return nil
}

func (m *Machine) onHello(from Endpoint, h *proto.Hello, configured bool) {
	if !m.acceptable(from, h) {
		return
	}
	cn := m.admit(from, h, configured, secure.Key{})
	if cn == nil {
		return
	}
	if !cn.outbound {
		cn.proof = m.proofFor(from.Remote, h)
	}
	m.sendHello(cn, proto.TypeAccept)
	if cn.state == stateConnecting {
		// Both sides dialled at once: wait for their accept or heartbeat.
		cn.state = statePending
	}
	if cn.started == 0 {
		cn.started = m.now
	}
}

// acceptable checks a dialler's hello against our identity and
// configuration, refusing it (and dropping what we have at its endpoint)
// if it does not pass.
func (m *Machine) acceptable(from Endpoint, h *proto.Hello) bool {
	cn := m.conn[from.Remote]
	if h.Name == m.cfg.Self.Name && h.UID == m.cfg.Self.UID {
		// Our own hello: a target is one of our own addresses.
		if cn != nil {
			m.drop(cn, errCannotConnectToOurself)
		}
		return false
	}
	if _, err := m.cfg.Self.Check(h); err != nil {
		m.refuse(from, h, err)
		if cn != nil {
			m.drop(cn, err)
		}
		return false
	}
	return true
}

// admit takes a dialler's checked hello: it settles other connections to
// the same peer and returns the connection at from, made if needed, or nil
// when there is no room for it.
//
// key is the key the dialler proved (password mode; zero otherwise).
func (m *Machine) admit(from Endpoint, h *proto.Hello, configured bool, key secure.Key) *connection {
	cn := m.conn[from.Remote]
	if cn != nil && cn.remote.Name != 0 && (cn.remote.Name != h.Name || cn.remote.UID != h.UID) {
		// Another incarnation (or another peer) at this endpoint: start over.
		m.event(Event{Kind: EventRestarted, Peer: h.Name, Nick: h.Nickname, Endpoint: from.Remote.String()})
		m.drop(cn, errors.New("peer restarted"))
		cn = nil
	}
	if err := m.settleDuplicates(from.Remote, h, key); err != nil {
		m.refuse(from, h, err)
		if cn != nil {
			m.drop(cn, err)
		}
		return nil
	}
	if cn == nil {
		if all, same := m.pendingInbound(from.Remote.Addr()); all >= m.cfg.MaxPendingInbound || same >= MaxPendingPerSource {
			return nil // a flood of hellos; real peers retry
		}
		if !m.room(configured) {
			m.refuse(from, h, &ConnLimitError{Limit: m.cfg.ConnLimit})
			return nil
		}
		cn = &connection{ep: from, state: statePending, configured: configured}
		m.conn[from.Remote] = cn
		m.adoptTarget(cn)
	}
	cn.remote = *h
	cn.lastHeard = m.now
	cn.ep.Local = from.Local
	return cn
}

func (m *Machine) onAccept(from Endpoint, h *proto.Hello) {
	cn := m.conn[from.Remote]
	if cn == nil || cn.state == stateEstablished {
		return // unsolicited, or a duplicate of one we already took
	}
	if _, err := m.cfg.Self.Check(h); err != nil {
		m.event(Event{Kind: EventRefused, Peer: h.Name, Nick: h.Nickname, Endpoint: from.Remote.String(), Err: err})
		m.drop(cn, err)
		return
	}
	if cn.remote.Name != 0 && (cn.remote.Name != h.Name || cn.remote.UID != h.UID) {
		m.drop(cn, errors.New("peer changed identity during the handshake"))
		return
	}
	if err := m.settleDuplicates(from.Remote, h, secure.Key{}); err != nil {
		m.drop(cn, err)
		return
	}
	cn.remote = *h
	cn.lastHeard = m.now
	cn.ep.Local = from.Local
	cn.echo = h.Proof
	if cn.started == 0 {
		cn.started = m.now
	}
	m.establish(cn)
}

func (m *Machine) onReject(from Endpoint, rj *proto.Reject) {
	cn := m.conn[from.Remote]
	if cn == nil || cn.state != stateConnecting {
		return // rejects only answer our hellos
	}
	err := m.cfg.Self.FromReject(rj)
	m.event(Event{Kind: EventRefused, Peer: rj.Name, Endpoint: from.Remote.String(), Err: err})
	m.drop(cn, err)
}

func (m *Machine) onHeartbeat(from Endpoint, hb proto.Heartbeat) {
	cn := m.conn[from.Remote]
	if cn == nil || cn.remote.Name == 0 {
		return
	}
	if m.unproven(cn) {
		if hb.Proof != cn.proof {
			m.Unproven++ // forged, or from a dialler that never got our accept
			return
		}
		cn.proven = true
	}
	if hb.Name != cn.remote.Name || hb.UID != cn.remote.UID {
		m.drop(cn, errors.New("heartbeat from another incarnation of the peer"))
		return
	}
	cn.lastHeard = m.now
	cn.remoteEstablished = hb.Established
	if cn.ep.Local != from.Local {
		// The peer now reaches us at another of our addresses: answer from
		// that one, data included.
		cn.ep.Local = from.Local
		if cn.state == stateEstablished {
			m.reroute()
		}
	}
	if cn.state == statePending {
		m.establish(cn)
	}
}

// ErrImpostor is returned by Step for gossip whose origin is not the peer
// it came from, though it claims to come straight from it.
var ErrImpostor = errors.New("link: gossip from a peer that claims another peer's name")

// ErrShortHello is returned by Step for a plaintext hello shorter than
// proto.HelloMinLen: it is not answered.
var ErrShortHello = errors.New("link: hello shorter than proto.HelloMinLen: not answered")

// ErrStranger is returned by Step for gossip from an endpoint we have no
// connection with.
var ErrStranger = errors.New("link: gossip from a peer we are not connected to")

func (m *Machine) onGossip(from Endpoint, g *proto.Gossip) error {
	cn := m.conn[from.Remote]
	// Pending is enough: the handshake has told us who the peer is, and its
	// gossip may overtake the heartbeat that establishes us. But not from
	// a dialler that has not proven its address (plaintext): answers to
	// gossip can be far larger than a forged hello.
	if cn == nil || cn.state == stateConnecting || m.unproven(cn) {
		return ErrStranger
	}
	if g.Hops == 0 && g.Src != cn.remote.Name {
		m.Impostors++
		return fmt.Errorf("%w: %v sent it as %v", ErrImpostor, cn.remote.Name, g.Src)
	}
	c := *g
	c.Payload = slices.Clone(g.Payload)
	if g.Chunk != nil {
		ch := *g.Chunk
		c.Chunk = &ch
	}
	m.rd.Gossip = append(m.rd.Gossip, Gossip{From: cn.remote.Name, FromUID: cn.remote.UID, Via: cn.ep, Msg: c})
	return nil
}

// establish marks cn established and tells the peer what we serve.
func (m *Machine) establish(cn *connection) {
	cn.state = stateEstablished
	for _, t := range m.targets {
		if t.conn == cn {
			t.backoff, t.lastErr = 0, nil
		}
	}
	m.event(Event{Kind: EventEstablished, Peer: cn.remote.Name, Nick: cn.remote.Nickname, Endpoint: cn.ep.Remote.String()})
	m.sendHeartbeat(cn)
	cn.nextBeat = m.now + int64(m.cfg.HeartbeatTicks)
	m.reroute()
}

// settleDuplicates decides between a handshake from the peer h at ep and
// other connections to the same peer at other endpoints. An established
// connection to the same incarnation wins: the new one is a duplicate (a
// multi-homed peer reached through two targets) and an error says so.
// Otherwise the others are dropped: the peer restarted or moved.
//
// In password mode (key not zero) a name belongs to the key that holds it:
// while an established connection to the name proved another key, the new
// one is refused (a member spoofing another's name; a peer that really got
// a new key is let in once its old connection has timed out).
func (m *Machine) settleDuplicates(ep netip.AddrPort, h *proto.Hello, key secure.Key) error {
	others := m.sorted()
	for _, other := range others { // refuse before dropping anything
		if key != (secure.Key{}) && other.ep.Remote != ep && other.remote.Name == h.Name &&
			other.state == stateEstablished && other.sess != nil && other.sess.Peer() != key {
			return &KeyError{Name: h.Name}
		}
	}
	for _, other := range others {
		if other.ep.Remote == ep || other.remote.Name != h.Name {
			continue
		}
		if other.state == stateEstablished && other.remote.UID == h.UID {
			return fmt.Errorf("already connected to %v(%s) via %v", h.Name, h.Nickname, other.ep.Remote)
		}
		m.drop(other, fmt.Errorf("peer %v now connected at %v", h.Name, ep))
	}
	return nil
}

// KeyError refuses, in password mode, a peer that claims the name of a
// connected peer with another identity key.
type KeyError struct{ Name proto.PeerName }

func (e *KeyError) Error() string {
	return fmt.Sprintf("peer name %v is connected with another identity key: refusing a second key for it (a spoofed name, or a peer with a new key whose old connection has not timed out yet)", e.Name)
}

// adoptTarget links an inbound connection to the target with its endpoint.
func (m *Machine) adoptTarget(cn *connection) {
	for _, key := range m.order {
		t := m.targets[key]
		if t.conn == nil && !t.resolving {
			if a, err := netip.ParseAddr(t.host); err == nil && netip.AddrPortFrom(a.Unmap(), t.port) == cn.ep.Remote {
				cn.outbound, cn.target, t.conn = true, t, cn
				return
			}
		}
	}
}

// MaxPendingPerSource bounds the inbound connections from one address still
// waiting for their first heartbeat: one source cannot take every pending
// slot (MaxPendingInbound) from the others.
const MaxPendingPerSource = 4

// pendingInbound counts the inbound connections still waiting for their
// first heartbeat, all of them and those from addr.
func (m *Machine) pendingInbound(addr netip.Addr) (all, from int) {
	for _, cn := range m.conn {
		if cn.state == statePending && !cn.outbound {
			all++
			if cn.ep.Remote.Addr() == addr {
				from++
			}
		}
	}
	return all, from
}

// refuse answers a hello with a reject, within the reject budget.
func (m *Machine) refuse(from Endpoint, h *proto.Hello, err error) {
	m.event(Event{Kind: EventRefused, Peer: h.Name, Nick: h.Nickname, Endpoint: from.Remote.String(), Err: err})
	if m.rejectBudget <= 0 {
		return
	}
	rj := m.cfg.Self.Reject(err)
	b := proto.AppendReject(nil, &rj)
	if m.answering > 0 && len(b) > m.answering {
		m.Unproven++ // larger than what it answers: an amplifier
		return
	}
	m.rejectBudget--
	m.send(from, b)
}

// drop ends a connection. The targets it served are retried after a back-off
// (at once if the connection had lasted long).
func (m *Machine) drop(cn *connection, reason error) {
	if m.conn[cn.ep.Remote] != cn {
		return
	}
	delete(m.conn, cn.ep.Remote)
	if cn.state != stateConnecting {
		m.event(Event{Kind: EventLost, Peer: cn.remote.Name, Nick: cn.remote.Nickname,
			Endpoint: cn.ep.Remote.String(), Err: reason})
	}
	var lasted int64
	if cn.started != 0 {
		lasted = m.now - cn.started
	}
	for _, key := range m.order {
		if t := m.targets[key]; t.conn == cn {
			t.conn = nil
			m.targetFailed(t, reason, lasted)
		}
	}
	if cn.state == stateEstablished {
		m.reroute()
	}
}

// targetFailed records a failed attempt and schedules the next one.
func (m *Machine) targetFailed(t *target, reason error, lasted int64) {
	t.lastErr = reason
	t.state = targetFailed
	if errors.Is(reason, errCannotConnectToOurself) || handshake.Permanent(reason) {
		t.never = true
		return
	}
	if lasted > int64(m.cfg.LongLivedTicks) {
		t.backoff = 0
		t.retryAt = m.now
		return
	}
	t.backoff = nextBackoff(t.backoff, m.cfg.RetryInitialTicks, m.cfg.RetryMaxTicks)
	t.retryAt = m.now + int64(jitter(t.backoff, m.cfg.Rand.Float64()))
	m.event(Event{Kind: EventRetry, Endpoint: t.addr, Err: reason, RetryTicks: int(t.retryAt - m.now)})
}

// nextBackoff is the wait after one more failure: initial at first, then
// half as long again each time, up to max (Weave's policy, with a lower cap:
// a UDP hello costs little).
func nextBackoff(prev, initial, max int) int {
	if prev <= 0 {
		return initial
	}
	return min(prev+prev/2, max)
}

// jitter spreads d over [d/2, 3d/2) with u drawn uniformly from [0, 1), so
// that peers that failed together do not retry together.
func jitter(d int, u float64) int {
	return d/2 + int(float64(d)*u)
}

// sorted lists connections by remote endpoint, so that every loop over them
// is deterministic.
func (m *Machine) sorted() []*connection {
	cs := make([]*connection, 0, len(m.conn))
	for _, cn := range m.conn {
		cs = append(cs, cn)
	}
	slices.SortFunc(cs, func(a, b *connection) int { return a.ep.Remote.Compare(b.ep.Remote) })
	return cs
}

// reroute puts the established peers, in name order, in Ready.
func (m *Machine) reroute() {
	rt := &Routing{Peers: []PeerPath{}}
	cs := m.sorted()
	slices.SortStableFunc(cs, func(a, b *connection) int { return cmp.Compare(a.remote.Name, b.remote.Name) })
	for _, cn := range cs {
		if cn.state == stateEstablished {
			p := PeerPath{Name: cn.remote.Name, UID: cn.remote.UID, Nickname: cn.remote.Nickname,
				Via: cn.ep, Outbound: cn.outbound, DataPort: cn.remote.DataPort}
			if cn.sess != nil {
				p.Key, p.SignKey = cn.sess.Peer(), cn.remote.SignKey
				p.Plaintext = cn.plaintext(&m.cfg)
			}
			rt.Peers = append(rt.Peers, p)
		}
	}
	m.rd.Routing = rt
}
