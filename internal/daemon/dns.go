package daemon

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/netconf"
	"github.com/overlayd/overlayd/names"
	"github.com/overlayd/overlayd/names/namesrv"
	"github.com/overlayd/overlayd/names/resolver"
	"github.com/overlayd/overlayd/peering/secure"
	"github.com/overlayd/overlayd/proto"
)

// nameService is WeaveDNS: the name store's server, the resolver over its
// views, and the DNS sockets.
type nameService struct {
	store    *namesrv.Server
	resolver *resolver.Resolver
	upstream *resolver.Upstream
	server   *resolver.Server
	listen   netip.AddrPort
	ttl      uint32
}

// startNames makes the name service and opens its sockets; nothing runs
// until run.
//
// With a signing key (password mode) our entries are signed with it and an
// entry of another origin is taken only if signed by the key the topology
// knows that origin by (keyOf).
func startNames(cfg Config, self proto.PeerName, router namesrv.Router, signing *secure.SigningKey,
	keyOf func(proto.PeerName) ([32]byte, bool), rnd *rand.Rand, log *zap.Logger) (*nameService, error) {
	listen := cfg.DNSListen
	if !listen.IsValid() {
		listen = netip.AddrPortFrom(netip.IPv4Unspecified(), 53)
		if a, ok := netconf.LinkAddr4("docker0"); ok {
			listen = netip.AddrPortFrom(a, 53)
		}
	}
	store := names.Config{Self: self, Domain: cfg.DNSDomain}
	if signing != nil {
		store.Sign = func(msg []byte) [proto.NameSigLen]byte { return signing.Sign(msg) }
		store.Verify = func(origin proto.PeerName, msg []byte, sig [proto.NameSigLen]byte) bool {
			k, ok := keyOf(origin)
			return ok && ed25519.Verify(k[:], msg, sig[:])
		}
	}
	st, err := namesrv.New(namesrv.Config{
		Store:      store,
		StateDir:   cfg.StateDir,
		Tombstones: cfg.DNSTombstones,
		Router:     router,
		Rand:       rnd,
		Log:        log,
	})
	if err != nil {
		return nil, err
	}
	up := resolver.NewUpstream(cfg.ResolvConf, listen, log)
	clients := newDNSClients(append(slices.Clone(cfg.DNSAllow), cfg.Range), netconf.LocalNets)
	res := resolver.New(resolver.Config{View: st.View, TTL: cfg.DNSTTL, Upstream: up, Allow: clients.allow,
		RateLimit: float64(cfg.DNSRateLimit), RateBurst: 2 * cfg.DNSRateLimit, Log: log})
	srv, err := resolver.Listen(listen.String(), res)
	if err != nil {
		return nil, fmt.Errorf("DNS server: %w (choose another address with --dns-listen, or turn DNS off with --no-dns)",
			errors.Unwrap(err))
	}
	return &nameService{store: st, resolver: res, upstream: up, server: srv, listen: listen, ttl: cfg.DNSTTL}, nil
}

// dnsClients decides whom the DNS server answers, so that it is not an
// open resolver for whoever reaches its address: loopback, the fixed
// subnets (the range, --dns-allow), this host's own addresses (the kernel
// drops a packet from outside that claims one of them) and its bridges'
// subnets (local containers). The host's addresses and bridges are read
// again at most every dnsClientsRefresh, when a query from elsewhere comes.
type dnsClients struct {
	fixed []netip.Prefix
	list  func() ([]netip.Addr, []netip.Prefix, error)

	mu      sync.Mutex
	read    time.Time // of own and bridges; guarded by mu
	own     []netip.Addr
	bridges []netip.Prefix
}

const dnsClientsRefresh = 5 * time.Second

func newDNSClients(fixed []netip.Prefix, list func() ([]netip.Addr, []netip.Prefix, error)) *dnsClients {
	fixed = slices.DeleteFunc(fixed, func(p netip.Prefix) bool { return !p.IsValid() })
	return &dnsClients{fixed: fixed, list: list}
}

func (c *dnsClients) allow(a netip.Addr) bool {
	if !a.IsValid() {
		return false
	}
	if a.IsLoopback() || slices.ContainsFunc(c.fixed, func(p netip.Prefix) bool { return p.Contains(a) }) {
		return true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if now := time.Now(); now.Sub(c.read) >= dnsClientsRefresh {
		if own, bridges, err := c.list(); err == nil {
			c.own, c.bridges = own, bridges
		}
		c.read = now
	}
	return slices.Contains(c.own, a) || slices.ContainsFunc(c.bridges, func(p netip.Prefix) bool { return p.Contains(a) })
}

// deliverNames is the router's handler of the names channel.
func (d *Daemon) deliverNames(from proto.PeerName, payload []byte) {
	if d.names != nil {
		d.names.store.Deliver(from, payload)
	}
}

// dnsAddress is the address containers are given as their DNS server: the
// listening address, or on a wildcard, docker0's, or the first exposed.
func (d *Daemon) dnsAddress() string {
	a := d.names.listen.Addr()
	if a.IsUnspecified() {
		if b, ok := netconf.LinkAddr4("docker0"); ok {
			a = b
		} else if ex := d.exposedAddrs(); len(ex) > 0 {
			a = ex[0].Addr()
		}
	}
	if a.IsUnspecified() {
		return ""
	}
	return a.String()
}

// DNS implements api.Backend: the name service's state with every entry
// held, tombstones too.
func (d *Daemon) DNS(ctx context.Context) (api.DNSStatus, error) {
	st := d.dnsStatus()
	if d.names == nil {
		return st, nil
	}
	es, err := d.names.store.Entries(ctx)
	if err != nil {
		return st, err
	}
	st.Entries = apiEntries(es)
	return st, nil
}

// dnsStatus is the name service's state without the entries, which can be
// many: GET /v1/dns has them.
func (d *Daemon) dnsStatus() api.DNSStatus {
	if d.names == nil {
		return api.DNSStatus{Enabled: false, Entries: []api.DNSEntry{}, Upstream: []string{}}
	}
	n := d.names
	v := n.store.View()
	live, local := v.Live()
	c := &n.resolver.Counts
	st := api.DNSStatus{Enabled: true, Domain: v.Domain(), Listen: n.listen.String(), Address: d.dnsAddress(),
		ResolvConf: n.upstream.Path(), Upstream: slices.Clone(n.upstream.Servers()), TTL: n.ttl,
		Live: live, Local: local,
		Rejected: n.store.Rejected.Load(), Dropped: n.store.Dropped.Load(),
		Forwarded: c.Forwarded.Load(), ServerFails: c.Failed.Load(), Refused: c.Refused.Load(),
		RateLimited: c.Limited.Load()}
	st.Queries = c.Answered.Load() + c.NoData.Load() + c.NXDomain.Load() + st.Forwarded + st.ServerFails
	if st.Upstream == nil {
		st.Upstream = []string{}
	}
	return st
}

func apiEntries(es []proto.NameEntry) []api.DNSEntry {
	out := make([]api.DNSEntry, len(es))
	for i, e := range es {
		out[i] = api.DNSEntry{Hostname: e.Hostname, Address: e.Addr, ContainerID: e.ContainerID,
			Origin: e.Origin, Version: e.Version, Tombstone: e.Tombstone}
	}
	return out
}

// DNSAdd implements api.Backend.
func (d *Daemon) DNSAdd(ctx context.Context, req api.DNSRequest) (api.DNSResponse, error) {
	if d.names == nil {
		return api.DNSResponse{}, api.ErrDNSOff
	}
	var added []proto.NameEntry
	for _, a := range req.Addresses {
		e, err := d.names.store.Add(ctx, req.Name, a, req.ContainerID)
		if err != nil {
			var de *names.DomainError
			if errors.As(err, &de) {
				d.log.Warn(de.Error())
			}
			return api.DNSResponse{Entries: apiEntries(added)}, requestError(err)
		}
		added = append(added, e)
	}
	return api.DNSResponse{Entries: apiEntries(added)}, nil
}

// DNSRemove implements api.Backend.
func (d *Daemon) DNSRemove(ctx context.Context, req api.DNSRequest) (api.DNSResponse, error) {
	if d.names == nil {
		return api.DNSResponse{}, api.ErrDNSOff
	}
	addrs := req.Addresses
	if len(addrs) == 0 {
		addrs = []netip.Addr{{}} // any address
	}
	var gone []proto.NameEntry
	for _, a := range addrs {
		es, err := d.names.store.Delete(ctx, req.Name, a, req.ContainerID)
		if err != nil {
			return api.DNSResponse{Entries: apiEntries(gone)}, requestError(err)
		}
		gone = append(gone, es...)
	}
	return api.DNSResponse{Entries: apiEntries(gone)}, nil
}

// DNSLookup implements api.Backend: a name of the domain, looked up in the
// current view (what the DNS server answers, in a stable order).
func (d *Daemon) DNSLookup(ctx context.Context, name string) (api.LookupResponse, error) {
	if d.names == nil {
		return api.LookupResponse{}, api.ErrDNSOff
	}
	fqdn, err := d.names.store.FQDN(ctx, name)
	if err != nil {
		return api.LookupResponse{Name: fqdn}, requestError(err)
	}
	addrs := slices.Clone(d.names.store.View().Lookup(fqdn))
	if len(addrs) == 0 {
		return api.LookupResponse{Name: fqdn}, api.BadRequest("%s: no such name", fqdn)
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	return api.LookupResponse{Name: fqdn, Addresses: addrs}, nil
}

// requestError makes the name store's refusals the request's fault; any
// other error (a state that could not be saved, a stopped server, a
// cancelled request) stays the daemon's.
func requestError(err error) error {
	var re *namesrv.RefusedError
	if errors.As(err, &re) {
		return &api.RequestError{Err: err}
	}
	return err
}

// forgetNames removes the names registered here for an address that IPAM
// has freed, whatever container they were registered for: the address may
// go to another container next.
func (d *Daemon) forgetNames(ctx context.Context, addr netip.Addr) {
	if d.names == nil || !addr.IsValid() {
		return
	}
	if _, err := d.names.store.Delete(ctx, "", addr, ""); err != nil {
		d.log.Warn("removing the names of a released address", zap.Stringer("addr", addr), zap.Error(err))
	}
}

// collector exposes the name service to Prometheus.
func (n *nameService) collector() prometheus.Collector {
	c := &n.resolver.Counts
	return collectors{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "overlayd_dns_entries", Help: "Live DNS entries, of every peer (scope all) and registered here (scope local).",
			ConstLabels: prometheus.Labels{"scope": "all"}}, func() float64 { a, _ := n.store.View().Live(); return float64(a) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "overlayd_dns_entries", Help: "Live DNS entries, of every peer (scope all) and registered here (scope local).",
			ConstLabels: prometheus.Labels{"scope": "local"}}, func() float64 { _, l := n.store.View().Live(); return float64(l) }),
		queries("answered", &c.Answered), queries("nodata", &c.NoData), queries("nxdomain", &c.NXDomain),
		queries("forwarded", &c.Forwarded), queries("servfail", &c.Failed),
		queries("refused", &c.Refused), queries("rate_limited", &c.Limited),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "overlayd_dns_truncated_total", Help: "UDP answers cut to the client's size, with TC set."},
			func() float64 { return float64(c.Truncated.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "overlayd_dns_messages_total", Help: "Name messages from peers that were dropped (the store lagged) or rejected.",
			ConstLabels: prometheus.Labels{"result": "dropped"}}, func() float64 { return float64(n.store.Dropped.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "overlayd_dns_messages_total", Help: "Name messages from peers that were dropped (the store lagged) or rejected.",
			ConstLabels: prometheus.Labels{"result": "rejected"}}, func() float64 { return float64(n.store.Rejected.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "overlayd_dns_unsigned_entries_total",
			Help: "Name entries refused in password mode: not signed by their origin (or its key not known yet; they come again)."},
			func() float64 { return float64(n.store.Forged.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "overlayd_dns_relayed_entries_total",
			Help: "Name entries refused in plaintext mode: sent by another peer than their origin (the origin is asked instead)."},
			func() float64 { return float64(n.store.NotOrigin.Load()) }),
	}
}

func queries(result string, v interface{ Load() uint64 }) prometheus.Collector {
	return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "overlayd_dns_queries_total",
		Help:        "DNS queries by outcome: answered here, known name of another type, unknown name, forwarded, failed upstream, from a client not served, beyond the client's rate over UDP.",
		ConstLabels: prometheus.Labels{"result": result}}, func() float64 { return float64(v.Load()) })
}

// collectors is several collectors as one.
type collectors []prometheus.Collector

func (cs collectors) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range cs {
		c.Describe(ch)
	}
}

func (cs collectors) Collect(ch chan<- prometheus.Metric) {
	for _, c := range cs {
		c.Collect(ch)
	}
}

// driverNames is the name service as the Docker driver sees it.
type driverNames struct{ d *Daemon }

func (n driverNames) Register(ctx context.Context, name string, addr netip.Addr, container string) error {
	_, err := n.d.DNSAdd(ctx, api.DNSRequest{Addresses: []netip.Addr{addr}, Name: name, ContainerID: container})
	return err
}

func (n driverNames) Forget(ctx context.Context, container string) error {
	_, err := n.d.DNSRemove(ctx, api.DNSRequest{ContainerID: container})
	return err
}
