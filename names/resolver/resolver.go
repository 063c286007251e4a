// Package resolver answers DNS queries over a names.View, as WeaveDNS does
// (WEAVE.md §2.4), with github.com/miekg/dns:
//
//  1. A query for a name below the domain, or for a single label (which
//     gets the domain), is answered here: every live address of the name
//     as A records in a random order per answer, NOERROR with no answer
//     for another type of a known name, NXDOMAIN for an unknown name.
//  2. A PTR query under in-addr.arpa. for an address held here is
//     answered here; other types there are NXDOMAIN; PTR queries for other
//     addresses go upstream.
//  3. Everything else goes to the upstream servers of resolv.conf, in
//     turn, each with a fresh ID; the first answer that is not SERVFAIL
//     or REFUSED is relayed, SERVFAIL when none answers. At most
//     MaxForwards queries wait upstream at once; more fail at once.
//
// Only QUERY is served: other opcodes get NOTIMP.
//
// It is not an open resolver: a query from a client that Config.Allow
// refuses gets no answer over UDP (whose source could be forged, to aim
// the answer at someone else) and REFUSED over TCP. No client has more
// than MaxForwardsPerClient queries waiting upstream.
//
// Answers over UDP are rate-limited per client address (Config.RateLimit):
// beyond its rate a client gets an empty answer with TC set to every
// second query, which sends a real client to TCP (whose source cannot be
// forged, and which is not limited), and nothing to the others. So a
// forged source in an allowed subnet cannot aim a stream of answers at
// its owner.
//
// Answers over UDP are cut to 512 bytes, or the EDNS0 size the query
// offers up to 1232 (no IP fragments on any usual path), with TC set;
// over TCP they are never cut. Names compare without
// regard to case. The resolver decides nothing about the entries: it
// reads the View it is given, loading it once per query.
package resolver

import (
	"context"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/ratelimit"
	"github.com/overlayd/overlayd/names"
)

// Config configures a Resolver.
type Config struct {
	View     func() *names.View // the current view; never nil
	TTL      uint32             // of local answers, in seconds
	Upstream *Upstream          // nil: nothing is forwarded (SERVFAIL)
	Timeout  time.Duration      // per upstream server; 5 s
	// MaxForwards bounds the queries waiting for upstream servers at
	// once; more get SERVFAIL at once. 256 when zero.
	MaxForwards int
	// MaxForwardsPerClient bounds those of one client address, so that
	// one client cannot take them all. 32 when zero.
	MaxForwardsPerClient int
	// Allow says whether a client address may be answered; nil allows
	// every client.
	Allow func(netip.Addr) bool
	// RateLimit bounds the queries over UDP answered for one client
	// address, a second on average, RateBurst at once (RateLimit when
	// zero); beyond it, see the package comment. Zero: no limit.
	RateLimit float64
	RateBurst int
	Now       func() time.Time // the limit's clock; nil: time.Now
	Log       *zap.Logger
}

// Counts are the resolver's counters, safe for concurrent use.
type Counts struct {
	Answered  atomic.Uint64 // local answers with records
	NoData    atomic.Uint64 // NOERROR with no answer: a known name, another type
	NXDomain  atomic.Uint64 // local names not found
	Forwarded atomic.Uint64 // answered by an upstream server
	Failed    atomic.Uint64 // SERVFAIL: no upstream server answered, or too many waiting
	Truncated atomic.Uint64 // UDP answers cut, with TC set
	Refused   atomic.Uint64 // queries from clients Allow refused
	Limited   atomic.Uint64 // UDP queries beyond their client's rate: not answered
	Slipped   atomic.Uint64 // those answered with an empty TC answer instead
}

// Resolver is a dns.Handler. It is safe for concurrent use.
type Resolver struct {
	cfg      Config
	ctx      context.Context // ends with Close: forwards in flight give up
	cancel   context.CancelFunc
	udp      *dns.Client
	tcp      *dns.Client
	forwards chan struct{} // a token per query waiting upstream
	mu       sync.Mutex
	waiting  map[netip.Addr]int           // queries waiting upstream, by client; guarded by mu
	limit    *ratelimit.Table[netip.Addr] // nil: no RateLimit
	over     atomic.Uint64                // queries beyond their rate, for the slips
	Counts   Counts
}

var _ dns.Handler = (*Resolver)(nil)

// New makes a Resolver.
func New(cfg Config) *Resolver {
	if cfg.Timeout == 0 {
		cfg.Timeout = 5 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.MaxForwards <= 0 {
		cfg.MaxForwards = 256
	}
	if cfg.MaxForwardsPerClient <= 0 {
		cfg.MaxForwardsPerClient = 32
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &Resolver{cfg: cfg, ctx: ctx, cancel: cancel, forwards: make(chan struct{}, cfg.MaxForwards), waiting: map[netip.Addr]int{},
		udp: &dns.Client{Net: "udp", Timeout: cfg.Timeout, UDPSize: 4096},
		tcp: &dns.Client{Net: "tcp", Timeout: cfg.Timeout}}
	if cfg.RateLimit > 0 {
		burst := cfg.RateBurst
		if burst <= 0 {
			burst = max(1, int(cfg.RateLimit))
		}
		r.limit = ratelimit.New[netip.Addr](cfg.RateLimit, burst)
	}
	return r
}

const reverseZone = "in-addr.arpa."

// Close makes queries waiting for upstream servers give up (SERVFAIL), so
// that a server shutting down is not held up by a silent upstream.
func (r *Resolver) Close() { r.cancel() }

// ServeDNS implements dns.Handler.
func (r *Resolver) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	if r.cfg.Allow != nil && !r.cfg.Allow(clientAddr(w)) {
		r.Counts.Refused.Add(1)
		if isTCP(w) {
			r.reply(w, req, failure(req, dns.RcodeRefused))
		}
		return
	}
	if r.limit != nil && !isTCP(w) && !r.limit.Allow(clientAddr(w), r.cfg.Now()) {
		r.Counts.Limited.Add(1)
		if r.over.Add(1)%2 == 1 {
			// The question and the OPT record echoed, no more: never
			// larger than the query.
			m := new(dns.Msg)
			m.SetReply(req)
			m.Truncated = true
			if opt := req.IsEdns0(); opt != nil {
				m.SetEdns0(opt.UDPSize(), false)
			}
			r.Counts.Slipped.Add(1)
			if err := w.WriteMsg(m); err != nil {
				r.cfg.Log.Debug("writing an answer", zap.Error(err))
			}
		}
		return
	}
	if len(req.Question) != 1 {
		// miekg/dns refuses these before they get here; this is a second
		// line.
		r.reply(w, req, failure(req, dns.RcodeFormatError))
		return
	}
	if req.Opcode != dns.OpcodeQuery {
		// miekg/dns lets NOTIFY through; we answer queries only.
		r.reply(w, req, failure(req, dns.RcodeNotImplemented))
		return
	}
	q := req.Question[0]
	v := r.cfg.View()
	domain := v.Domain()
	switch {
	case dns.IsSubDomain(reverseZone, strings.ToLower(q.Name)):
		r.reverse(w, req, v)
	case dns.IsSubDomain(domain, strings.ToLower(q.Name)):
		r.local(w, req, v, q.Name)
	case dns.CountLabel(q.Name) == 1:
		r.local(w, req, v, q.Name+domain)
	default:
		r.forward(w, req)
	}
}

// local answers a name of ours.
func (r *Resolver) local(w dns.ResponseWriter, req *dns.Msg, v *names.View, fqdn string) {
	q := req.Question[0]
	addrs := v.Lookup(fqdn)
	m := answer(req)
	switch {
	case len(addrs) == 0:
		m.Rcode = dns.RcodeNameError
		r.Counts.NXDomain.Add(1)
	case q.Qtype != dns.TypeA && q.Qtype != dns.TypeANY:
		r.Counts.NoData.Add(1)
	default:
		m.Answer = make([]dns.RR, len(addrs))
		hdr := dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: r.cfg.TTL}
		for i, a := range addrs {
			m.Answer[i] = &dns.A{Hdr: hdr, A: net.IP(a.AsSlice())}
		}
		rand.Shuffle(len(m.Answer), func(i, j int) { m.Answer[i], m.Answer[j] = m.Answer[j], m.Answer[i] })
		r.Counts.Answered.Add(1)
	}
	r.reply(w, req, m)
}

// reverse answers a PTR query for an address held here, and sends others
// upstream.
func (r *Resolver) reverse(w dns.ResponseWriter, req *dns.Msg, v *names.View) {
	q := req.Question[0]
	addr, ok := reverseAddr(q.Name)
	if q.Qtype != dns.TypePTR {
		m := answer(req)
		m.Rcode = dns.RcodeNameError
		r.Counts.NXDomain.Add(1)
		r.reply(w, req, m)
		return
	}
	host, found := v.Reverse(addr)
	if !ok || !found {
		r.forward(w, req)
		return
	}
	m := answer(req)
	m.Answer = []dns.RR{&dns.PTR{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypePTR, Class: dns.ClassINET, Ttl: r.cfg.TTL}, Ptr: host}}
	r.Counts.Answered.Add(1)
	r.reply(w, req, m)
}

// reverseAddr reads the IPv4 address of a name like 4.3.2.1.in-addr.arpa.
func reverseAddr(name string) (netip.Addr, bool) {
	labels := dns.SplitDomainName(name)
	if len(labels) != 6 {
		return netip.Addr{}, false
	}
	a, err := netip.ParseAddr(labels[3] + "." + labels[2] + "." + labels[1] + "." + labels[0])
	return a, err == nil && a.Is4()
}

// forward relays a query to the upstream servers in turn. An answer of
// SERVFAIL or REFUSED moves on to the next server; if none does better,
// the last such answer is relayed.
func (r *Resolver) forward(w dns.ResponseWriter, req *dns.Msg) {
	client := clientAddr(w)
	if !r.take(client) {
		// Too many queries wait upstream (a dead server, a query that
		// loops back to us, or one client asking too much): fail fast
		// rather than pile up.
		r.Counts.Failed.Add(1)
		r.reply(w, req, failure(req, dns.RcodeServerFailure))
		return
	}
	defer r.give(client)
	var servers []string
	if r.cfg.Upstream != nil {
		servers = r.cfg.Upstream.Servers()
	}
	c := r.udp
	if isTCP(w) {
		c = r.tcp
	}
	fq := req.Copy()
	var last *dns.Msg
	for _, s := range servers {
		fq.Id = dns.Id()
		resp, err := r.exchange(c, fq, s)
		if err != nil || resp == nil {
			r.cfg.Log.Debug("upstream server did not answer", zap.String("endpoint", s), zap.Error(err))
			continue
		}
		resp.Id = req.Id
		if resp.Rcode == dns.RcodeServerFailure || resp.Rcode == dns.RcodeRefused {
			last = resp
			continue
		}
		r.Counts.Forwarded.Add(1)
		r.reply(w, req, resp)
		return
	}
	r.Counts.Failed.Add(1)
	if last == nil {
		last = failure(req, dns.RcodeServerFailure)
	}
	r.reply(w, req, last)
}

// take reserves a place upstream for one query of client, if the client
// and the whole resolver are both under their bounds.
func (r *Resolver) take(client netip.Addr) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.waiting[client] >= r.cfg.MaxForwardsPerClient {
		return false
	}
	select {
	case r.forwards <- struct{}{}:
	default:
		return false
	}
	r.waiting[client]++
	return true
}

// give returns the place take reserved.
func (r *Resolver) give(client netip.Addr) {
	r.mu.Lock()
	defer r.mu.Unlock()
	<-r.forwards
	if r.waiting[client]--; r.waiting[client] == 0 {
		delete(r.waiting, client)
	}
}

// exchange asks one upstream server, for at most Timeout, and gives up at
// once when the resolver is closed (miekg/dns heeds only a context's
// deadline, so the socket is closed under it).
func (r *Resolver) exchange(c *dns.Client, m *dns.Msg, server string) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(r.ctx, r.cfg.Timeout)
	defer cancel()
	conn, err := c.DialContext(ctx, server)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	resp, _, err := c.ExchangeWithConnContext(ctx, m, conn)
	return resp, err
}

// reply writes m, cut to the size the client can take over UDP; over TCP
// it is compressed if it must be, and cut only if even that is too large.
func (r *Resolver) reply(w dns.ResponseWriter, req *dns.Msg, m *dns.Msg) {
	if isTCP(w) {
		m.Truncate(dns.MaxMsgSize)
	} else {
		size := dns.MinMsgSize
		if opt := req.IsEdns0(); opt != nil {
			size = min(max(size, int(opt.UDPSize())), MaxUDPAnswer)
		}
		m.Truncate(size)
		if m.Truncated {
			r.Counts.Truncated.Add(1)
		}
	}
	if err := w.WriteMsg(m); err != nil {
		r.cfg.Log.Debug("writing an answer", zap.Error(err))
	}
}

// answer starts an authoritative answer to req, with EDNS0 if req had it.
func answer(req *dns.Msg) *dns.Msg {
	m := new(dns.Msg)
	m.SetReply(req)
	m.Authoritative, m.RecursionAvailable = true, true
	if opt := req.IsEdns0(); opt != nil {
		m.SetEdns0(4096, false)
	}
	return m
}

func failure(req *dns.Msg, rcode int) *dns.Msg {
	m := new(dns.Msg)
	m.SetRcode(req, rcode)
	m.RecursionAvailable = true
	if req.IsEdns0() != nil {
		m.SetEdns0(4096, false)
	}
	return m
}

// MaxUDPAnswer is the largest answer sent over UDP, whatever EDNS0 size
// the query offers: the DNS flag day 2020's figure, which fits the usual
// paths' MTU without fragments.
const MaxUDPAnswer = 1232

// clientAddr is the address a query came from (unmapped; the zero Addr if
// the writer has none).
func clientAddr(w dns.ResponseWriter) netip.Addr {
	var a netip.Addr
	switch ra := w.RemoteAddr().(type) {
	case *net.UDPAddr:
		a, _ = netip.AddrFromSlice(ra.IP)
	case *net.TCPAddr:
		a, _ = netip.AddrFromSlice(ra.IP)
	}
	return a.Unmap()
}

func isTCP(w dns.ResponseWriter) bool {
	_, ok := w.LocalAddr().(*net.TCPAddr)
	return ok
}
