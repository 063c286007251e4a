package resolver_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/goleak"

	"github.com/overlayd/overlayd/names"
	"github.com/overlayd/overlayd/names/resolver"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const testTTL = 30 // not Weave's default of 1, so that a wrong TTL shows

// ent is a name entry to add to a store.
type ent struct{ host, addr, id string }

// newStore makes a store of peer 1 with the entries, for domain ("" is
// weave.local.).
func newStore(t *testing.T, domain string, es ...ent) *names.Store {
	t.Helper()
	s, err := names.New(names.Config{Self: 1, Domain: domain, Rand: rand.New(rand.NewPCG(1, 2))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if _, err := s.Add(e.host, netip.MustParseAddr(e.addr), e.id); err != nil {
			t.Fatalf("Add(%s, %s, %s): %v", e.host, e.addr, e.id, err)
		}
	}
	return s
}

// server is a resolver served on loopback by the real Server.
type server struct {
	r        *resolver.Resolver
	udp, tcp string
	view     atomic.Pointer[names.View]
}

// start serves a resolver of v at addr until the test ends; cfg.View is
// set to the server's view pointer, and cfg.TTL to testTTL when zero.
func start(t *testing.T, addr string, cfg resolver.Config, v *names.View) *server {
	t.Helper()
	s := &server{}
	s.view.Store(v)
	cfg.View = s.view.Load
	if cfg.TTL == 0 {
		cfg.TTL = testTTL
	}
	s.r = resolver.New(cfg)
	srv, err := resolver.Listen(addr, s.r)
	if err != nil {
		t.Fatal(err)
	}
	s.udp, s.tcp = srv.Addr().String(), srv.TCPAddr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Run did not return 10 s after its context ended")
		}
	})
	return s
}

func (s *server) addr(network string) string {
	if network == "tcp" {
		return s.tcp
	}
	return s.udp
}

// exchange sends m with a real miekg/dns client and checks that the answer
// carries m's ID.
func exchange(t *testing.T, network, addr string, m *dns.Msg) *dns.Msg {
	t.Helper()
	c := &dns.Client{Net: network, Timeout: 5 * time.Second}
	r, _, err := c.Exchange(m, addr)
	if err != nil {
		t.Fatalf("%s %s %s: %v", network, m.Question[0].Name, dns.TypeToString[m.Question[0].Qtype], err)
	}
	if r.Id != m.Id {
		t.Errorf("answer ID %d, want the query's %d", r.Id, m.Id)
	}
	return r
}

func query(name string, qtype uint16) *dns.Msg {
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	return m
}

// rrs parses zone-file lines.
func rrs(t *testing.T, lines ...string) []dns.RR {
	t.Helper()
	var out []dns.RR
	for _, l := range lines {
		rr, err := dns.NewRR(l)
		if err != nil {
			t.Fatalf("%q: %v", l, err)
		}
		out = append(out, rr)
	}
	return out
}

// texts are the records in zone-file form, sorted: for comparisons that
// ignore order.
func texts(rs []dns.RR) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.String()
	}
	slices.Sort(out)
	return out
}

func checkRRs(t *testing.T, what string, got, want []dns.RR) {
	t.Helper()
	g, w := texts(got), texts(want)
	if !slices.Equal(g, w) {
		t.Errorf("%s: records\n%s\nwant\n%s", what, strings.Join(g, "\n"), strings.Join(w, "\n"))
	}
}

func checkRcode(t *testing.T, what string, m *dns.Msg, rcode int) {
	t.Helper()
	if m.Rcode != rcode {
		t.Errorf("%s: rcode %s, want %s", what, dns.RcodeToString[m.Rcode], dns.RcodeToString[rcode])
	}
}

// counts is a snapshot of the counters.
type counts struct{ answered, noData, nxDomain, forwarded, failed, truncated uint64 }

func countsOf(r *resolver.Resolver) counts {
	c := &r.Counts
	return counts{c.Answered.Load(), c.NoData.Load(), c.NXDomain.Load(), c.Forwarded.Load(), c.Failed.Load(), c.Truncated.Load()}
}

func checkCounts(t *testing.T, r *resolver.Resolver, want counts) {
	t.Helper()
	if got := countsOf(r); got != want {
		t.Errorf("counts %+v, want %+v", got, want)
	}
}

var networks = []string{"udp", "tcp"}

func TestLocalA(t *testing.T) {
	st := newStore(t, "",
		ent{"web1", "10.32.0.1", "c1"},
		ent{"web1", "10.32.0.1", "c3"}, // the same address again: one record
		ent{"web1", "10.32.0.2", "c2"},
		ent{"web1", "10.32.0.3", "c4"}, // deleted below: a tombstone
		ent{"Db.weave.local", "10.32.0.9", "c5"},
	)
	if _, err := st.Delete("web1", netip.MustParseAddr("10.32.0.3"), "c4"); err != nil {
		t.Fatal(err)
	}
	s := start(t, "127.0.0.1:0", resolver.Config{}, st.View())
	web1 := func(name string) []dns.RR {
		return rrs(t, name+" 30 IN A 10.32.0.1", name+" 30 IN A 10.32.0.2")
	}
	tests := []struct {
		name  string
		qname string
		qtype uint16
		want  []dns.RR
	}{
		{"fqdn", "web1.weave.local.", dns.TypeA, web1("web1.weave.local.")},
		{"case is kept in the answer", "WEB1.Weave.LOCAL.", dns.TypeA, web1("WEB1.Weave.LOCAL.")},
		{"single label", "web1.", dns.TypeA, web1("web1.")},
		{"single label, upper case", "WeB1.", dns.TypeA, web1("WeB1.")},
		{"name registered in mixed case", "db.weave.local.", dns.TypeA, rrs(t, "db.weave.local. 30 IN A 10.32.0.9")},
		// ANY is answered with the A records (WEAVE.md §2.4 says only A;
		// the package comment and code answer ANY too).
		{"ANY", "db.weave.local.", dns.TypeANY, rrs(t, "db.weave.local. 30 IN A 10.32.0.9")},
	}
	n := uint64(0)
	for _, network := range networks {
		for _, tt := range tests {
			t.Run(network+"/"+tt.name, func(t *testing.T) {
				r := exchange(t, network, s.addr(network), query(tt.qname, tt.qtype))
				n++
				checkRcode(t, tt.qname, r, dns.RcodeSuccess)
				if !r.Authoritative || !r.RecursionAvailable || !r.Response {
					t.Errorf("AA %v RA %v QR %v, want all set", r.Authoritative, r.RecursionAvailable, r.Response)
				}
				if r.Truncated {
					t.Error("TC set")
				}
				if len(r.Question) != 1 || r.Question[0].Name != tt.qname {
					t.Errorf("question %v, want %s", r.Question, tt.qname)
				}
				checkRRs(t, tt.qname, r.Answer, tt.want)
			})
		}
	}
	checkCounts(t, s.r, counts{answered: n})
}

func TestOtherDomain(t *testing.T) {
	st := newStore(t, "Cluster.Internal", ent{"api", "10.1.0.1", "c1"})
	s := start(t, "127.0.0.1:0", resolver.Config{TTL: 1}, st.View())
	for _, tt := range []struct{ qname, want string }{
		{"api.", "api. 1 IN A 10.1.0.1"},
		{"api.cluster.internal.", "api.cluster.internal. 1 IN A 10.1.0.1"},
		{"API.CLUSTER.INTERNAL.", "API.CLUSTER.INTERNAL. 1 IN A 10.1.0.1"},
	} {
		r := exchange(t, "udp", s.udp, query(tt.qname, dns.TypeA))
		checkRcode(t, tt.qname, r, dns.RcodeSuccess)
		checkRRs(t, tt.qname, r.Answer, rrs(t, tt.want))
	}
	// weave.local. is not ours here: with no upstream it fails.
	r := exchange(t, "udp", s.udp, query("api.weave.local.", dns.TypeA))
	checkRcode(t, "api.weave.local.", r, dns.RcodeServerFailure)
	checkCounts(t, s.r, counts{answered: 3, failed: 1})
}

func TestLocalNegative(t *testing.T) {
	st := newStore(t, "", ent{"web1", "10.32.0.1", "c1"}, ent{"gone", "10.32.0.7", "c7"})
	if _, err := st.Delete("gone", netip.Addr{}, ""); err != nil {
		t.Fatal(err)
	}
	s := start(t, "127.0.0.1:0", resolver.Config{}, st.View())
	tests := []struct {
		name  string
		qname string
		qtype uint16
		rcode int
	}{
		{"unknown", "nobody.weave.local.", dns.TypeA, dns.RcodeNameError},
		{"unknown single label", "nobody.", dns.TypeA, dns.RcodeNameError},
		{"unknown, another type", "nobody.weave.local.", dns.TypeMX, dns.RcodeNameError},
		{"deleted", "gone.weave.local.", dns.TypeA, dns.RcodeNameError},
		{"below a known name", "x.web1.weave.local.", dns.TypeA, dns.RcodeNameError},
		{"the domain itself", "weave.local.", dns.TypeA, dns.RcodeNameError},
		{"the domain itself, SOA", "weave.local.", dns.TypeSOA, dns.RcodeNameError},
		{"MX of a known name", "web1.weave.local.", dns.TypeMX, dns.RcodeSuccess},
		{"AAAA of a known name", "web1.weave.local.", dns.TypeAAAA, dns.RcodeSuccess},
		{"TXT of a known name", "WEB1.weave.local.", dns.TypeTXT, dns.RcodeSuccess},
		{"SRV of a known single label", "web1.", dns.TypeSRV, dns.RcodeSuccess},
	}
	var want counts
	for _, network := range networks {
		for _, tt := range tests {
			t.Run(network+"/"+tt.name, func(t *testing.T) {
				r := exchange(t, network, s.addr(network), query(tt.qname, tt.qtype))
				checkRcode(t, tt.qname, r, tt.rcode)
				if !r.Authoritative || !r.RecursionAvailable {
					t.Errorf("AA %v RA %v, want both set", r.Authoritative, r.RecursionAvailable)
				}
				if len(r.Answer)+len(r.Ns) != 0 {
					t.Errorf("answer %v, authority %v: want none", r.Answer, r.Ns)
				}
				if tt.rcode == dns.RcodeNameError {
					want.nxDomain++
				} else {
					want.noData++
				}
			})
		}
	}
	checkCounts(t, s.r, want)
}

// TestShuffle checks that every answer holds all the addresses, in an order
// chosen per answer.
func TestShuffle(t *testing.T) {
	st := newStore(t, "",
		ent{"web", "10.32.0.1", "c1"}, ent{"web", "10.32.0.2", "c2"},
		ent{"web", "10.32.0.3", "c3"}, ent{"web", "10.32.0.4", "c4"})
	s := start(t, "127.0.0.1:0", resolver.Config{}, st.View())
	want := rrs(t, "web.weave.local. 30 IN A 10.32.0.1", "web.weave.local. 30 IN A 10.32.0.2",
		"web.weave.local. 30 IN A 10.32.0.3", "web.weave.local. 30 IN A 10.32.0.4")
	orders := map[string]int{}
	firsts := map[string]bool{}
	for i := range 60 {
		r := exchange(t, networks[i%2], s.addr(networks[i%2]), query("web.weave.local.", dns.TypeA))
		checkRRs(t, "web.weave.local.", r.Answer, want)
		var order []string
		for _, rr := range r.Answer {
			order = append(order, rr.(*dns.A).A.String())
		}
		if len(order) > 0 {
			firsts[order[0]] = true
		}
		orders[strings.Join(order, " ")]++
	}
	// 60 answers in one order of 24, or with only one or two first
	// addresses, would be a failure of the shuffle, not bad luck.
	if len(orders) < 5 || len(firsts) < 3 {
		t.Errorf("60 answers came in %d orders with %d first addresses: %v", len(orders), len(firsts), orders)
	}
}

func TestReverse(t *testing.T) {
	st := newStore(t, "",
		ent{"zeta", "10.32.0.5", "c1"},
		ent{"Alpha", "10.32.0.5", "c2"}, // first in sort order
		ent{"web1", "10.32.0.6", "c3"},
	)
	s := start(t, "127.0.0.1:0", resolver.Config{}, st.View())
	var want counts
	for _, network := range networks {
		for _, tt := range []struct{ qname, want string }{
			{"5.0.32.10.in-addr.arpa.", "5.0.32.10.in-addr.arpa. 30 IN PTR Alpha.weave.local."},
			{"5.0.32.10.IN-ADDR.ARPA.", "5.0.32.10.IN-ADDR.ARPA. 30 IN PTR Alpha.weave.local."},
			{"6.0.32.10.In-Addr.Arpa.", "6.0.32.10.In-Addr.Arpa. 30 IN PTR web1.weave.local."},
		} {
			r := exchange(t, network, s.addr(network), query(tt.qname, dns.TypePTR))
			checkRcode(t, tt.qname, r, dns.RcodeSuccess)
			if !r.Authoritative || !r.RecursionAvailable {
				t.Errorf("%s: AA %v RA %v, want both set", tt.qname, r.Authoritative, r.RecursionAvailable)
			}
			checkRRs(t, tt.qname, r.Answer, rrs(t, tt.want))
			want.answered++
		}
		// Only PTR is answered there.
		for _, tt := range []struct {
			qname string
			qtype uint16
		}{
			{"5.0.32.10.in-addr.arpa.", dns.TypeA},
			{"5.0.32.10.in-addr.arpa.", dns.TypeTXT},
			{"5.0.32.10.in-addr.arpa.", dns.TypeANY},
			{"9.9.9.9.in-addr.arpa.", dns.TypeA},
			{"in-addr.arpa.", dns.TypeSOA},
			{"x.5.0.32.10.IN-ADDR.arpa.", dns.TypeNS},
		} {
			r := exchange(t, network, s.addr(network), query(tt.qname, tt.qtype))
			checkRcode(t, tt.qname+" "+dns.TypeToString[tt.qtype], r, dns.RcodeNameError)
			if len(r.Answer) != 0 {
				t.Errorf("%s: answer %v", tt.qname, r.Answer)
			}
			want.nxDomain++
		}
	}
	checkCounts(t, s.r, want)

	// With Alpha gone, zeta is the first live entry.
	if _, err := st.Delete("alpha", netip.Addr{}, ""); err != nil {
		t.Fatal(err)
	}
	s.view.Store(st.View())
	r := exchange(t, "udp", s.udp, query("5.0.32.10.in-addr.arpa.", dns.TypePTR))
	checkRRs(t, "after a delete", r.Answer, rrs(t, "5.0.32.10.in-addr.arpa. 30 IN PTR zeta.weave.local."))
}

// TestViewPerQuery checks that each query reads the view current then.
func TestViewPerQuery(t *testing.T) {
	st := newStore(t, "")
	s := start(t, "127.0.0.1:0", resolver.Config{}, st.View())
	checkRcode(t, "before", exchange(t, "udp", s.udp, query("web1.weave.local.", dns.TypeA)), dns.RcodeNameError)
	if _, err := st.Add("web1", netip.MustParseAddr("10.32.0.1"), "c1"); err != nil {
		t.Fatal(err)
	}
	s.view.Store(st.View())
	r := exchange(t, "udp", s.udp, query("web1.weave.local.", dns.TypeA))
	checkRRs(t, "after", r.Answer, rrs(t, "web1.weave.local. 30 IN A 10.32.0.1"))
}

// bigStore has 50 addresses for big.weave.local.
func bigStore(t *testing.T) (*names.Store, []dns.RR) {
	st := newStore(t, "")
	var want []dns.RR
	for i := range 50 {
		a := fmt.Sprintf("10.40.0.%d", i+1)
		if _, err := st.Add("big", netip.MustParseAddr(a), fmt.Sprintf("c%d", i)); err != nil {
			t.Fatal(err)
		}
		want = append(want, rrs(t, "big.weave.local. 30 IN A "+a)...)
	}
	return st, want
}

// rawUDP sends a datagram and returns the answer, or nil when none comes
// within wait.
func rawUDP(t *testing.T, addr string, pkt []byte, wait time.Duration) []byte {
	t.Helper()
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(pkt); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 65536)
	n, err := c.Read(buf)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil
		}
		t.Fatal(err)
	}
	return buf[:n]
}

func pack(t *testing.T, m *dns.Msg) []byte {
	t.Helper()
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func unpack(t *testing.T, b []byte) *dns.Msg {
	t.Helper()
	m := new(dns.Msg)
	if err := m.Unpack(b); err != nil {
		t.Fatalf("answer of %d bytes: %v", len(b), err)
	}
	return m
}

func TestTruncation(t *testing.T) {
	st, all := bigStore(t)
	s := start(t, "127.0.0.1:0", resolver.Config{}, st.View())
	// A compressed A record here is 16 bytes: an answer cut to size is as
	// full as it can be when one more record would not fit.
	const rrLen = 16
	tests := []struct {
		name  string
		edns  uint16 // 0: no EDNS0
		limit int    // the most bytes allowed
		cut   bool
	}{
		{"no EDNS0", 0, 512, true},
		{"EDNS0 700", 700, 700, true},
		{"EDNS0 below 512 is 512", 100, 512, true},
		{"EDNS0 4096", 4096, 4096, false},
	}
	var want counts
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want.answered++
			q := query("big.weave.local.", dns.TypeA)
			if tt.edns != 0 {
				q.SetEdns0(tt.edns, false)
			}
			b := rawUDP(t, s.udp, pack(t, q), 5*time.Second)
			if b == nil {
				t.Fatal("no answer")
			}
			r := unpack(t, b)
			checkRcode(t, "big", r, dns.RcodeSuccess)
			if len(b) > tt.limit {
				t.Errorf("answer of %d bytes, over %d", len(b), tt.limit)
			}
			if r.Truncated != tt.cut {
				t.Errorf("TC %v, want %v", r.Truncated, tt.cut)
			}
			if tt.cut {
				want.truncated++
				if len(r.Answer) == 0 || len(r.Answer) >= 50 {
					t.Errorf("%d records in a cut answer", len(r.Answer))
				}
				if len(b)+rrLen <= tt.limit {
					t.Errorf("cut answer of %d bytes has room for another record under %d", len(b), tt.limit)
				}
				for _, rr := range r.Answer {
					if !slices.ContainsFunc(all, func(w dns.RR) bool { return w.String() == rr.String() }) {
						t.Errorf("record %v is not one of big's", rr)
					}
				}
			} else {
				checkRRs(t, "big", r.Answer, all)
			}
			if (tt.edns != 0) != (r.IsEdns0() != nil) {
				t.Errorf("OPT in the answer %v, want %v", r.IsEdns0() != nil, tt.edns != 0)
			}
		})
	}
	t.Run("miekg client", func(t *testing.T) {
		r := exchange(t, "udp", s.udp, query("big.weave.local.", dns.TypeA))
		want.answered++
		want.truncated++
		if !r.Truncated || len(r.Answer) >= 50 {
			t.Errorf("TC %v with %d records, want TC with fewer than 50", r.Truncated, len(r.Answer))
		}
	})
	t.Run("TCP is never cut", func(t *testing.T) {
		r := exchange(t, "tcp", s.tcp, query("big.weave.local.", dns.TypeA))
		want.answered++
		if r.Truncated {
			t.Error("TC set over TCP")
		}
		checkRRs(t, "big over TCP", r.Answer, all)
	})
	checkCounts(t, s.r, want)
}

// hugeCount addresses for one name make an answer that fits in a TCP
// message (65535 bytes) only when compressed: 16 bytes a record instead of
// 32 or more.
const hugeCount = 2100

// TestTCPLargeAnswer checks that an answer too big for a TCP message
// uncompressed, but not compressed, is sent (compressed), both for a local
// name and when relayed from upstream (WEAVE.md §2.4: "relayed (compressed
// if too big)"; TCP is never cut).
func TestTCPLargeAnswer(t *testing.T) {
	up := startUpstream(t, upstreamAnswer)
	s := startForwarding(t, 2*time.Second, up.ip)
	st := newStore(t, "")
	for i := range hugeCount {
		if _, err := st.Add("many", netip.AddrFrom4([4]byte{10, 50, byte(i / 256), byte(i % 256)}), fmt.Sprintf("c%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	s.view.Store(st.View())
	c := &dns.Client{Net: "tcp", Timeout: 3 * time.Second}
	for _, name := range []string{"many.weave.local.", "huge.example.com."} {
		r, _, err := c.Exchange(query(name, dns.TypeA), s.tcp)
		if err != nil {
			t.Errorf("TCP %s with %d addresses: %v", name, hugeCount, err)
			continue
		}
		if len(r.Answer) != hugeCount || r.Truncated {
			t.Errorf("TCP %s: %d records, TC %v; want %d records", name, len(r.Answer), r.Truncated, hugeCount)
		}
	}
	t.Logf("counts after the TCP queries: %+v", countsOf(s.r))
	// Over UDP, even with the largest EDNS0 size, the answer is cut to
	// MaxUDPAnswer bytes with TC set: the client asks again over TCP.
	q := query("many.weave.local.", dns.TypeA)
	q.SetEdns0(65535, false)
	r := exchange(t, "udp", s.udp, q)
	r.Compress = true // as it came on the wire
	packed, err := r.Pack()
	if err != nil {
		t.Fatal(err)
	}
	if !r.Truncated || len(packed) > resolver.MaxUDPAnswer || len(r.Answer) == 0 {
		t.Errorf("UDP many.weave.local. offering 65535: %d records in %d bytes, TC %v; want some, cut to at most %d bytes, TC set",
			len(r.Answer), len(packed), r.Truncated, resolver.MaxUDPAnswer)
	}
}

// upstream is a fake upstream DNS server on port 53 of a loopback address
// (resolv.conf has no port), over UDP and TCP.
type upstream struct {
	ip string

	mu   sync.Mutex
	seen []*seenQuery
}

type seenQuery struct {
	net string
	msg *dns.Msg
}

// loopback53 returns a random loopback address other than 127.0.0.1.
func loopback53() string {
	return fmt.Sprintf("127.%d.%d.%d", 10+rand.IntN(240), rand.IntN(256), 1+rand.IntN(254))
}

// startUpstream serves h at port 53 of a random loopback address until the
// test ends; h returning nil means no answer. It skips the test when port
// 53 cannot be bound (not root).
func startUpstream(t *testing.T, h func(*dns.Msg) *dns.Msg) *upstream {
	t.Helper()
	var (
		pc net.PacketConn
		l  net.Listener
		ip string
	)
	for try := 0; ; try++ {
		ip = loopback53()
		var err error
		pc, err = net.ListenPacket("udp", ip+":53")
		if err == nil {
			l, err = net.Listen("tcp", ip+":53")
			if err != nil {
				pc.Close()
			}
		}
		if err == nil {
			break
		}
		if errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) {
			t.Skipf("cannot bind port 53 for a fake upstream server (resolv.conf has no port): %v", err)
		}
		if try == 20 {
			t.Fatal(err)
		}
	}
	u := &upstream{ip: ip}
	handler := dns.HandlerFunc(func(w dns.ResponseWriter, req *dns.Msg) {
		network := "udp"
		if _, ok := w.LocalAddr().(*net.TCPAddr); ok {
			network = "tcp"
		}
		u.mu.Lock()
		u.seen = append(u.seen, &seenQuery{network, req.Copy()})
		u.mu.Unlock()
		if m := h(req); m != nil {
			w.WriteMsg(m)
		}
	})
	var wg sync.WaitGroup
	servers := []*dns.Server{{PacketConn: pc, Handler: handler}, {Listener: l, Handler: handler}}
	for _, srv := range servers {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		wg.Go(func() { srv.ActivateAndServe() })
		<-started
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for _, srv := range servers {
			srv.ShutdownContext(ctx)
		}
		wg.Wait()
	})
	return u
}

func (u *upstream) queries() []*seenQuery {
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.seen)
}

// upstreamAnswer is the fake upstream's answer: nx.* is NXDOMAIN,
// big.example.com. has 50 addresses and huge.example.com. hugeCount, PTR
// queries get upstream.example.com., everything else 192.0.2.1.
func upstreamAnswer(req *dns.Msg) *dns.Msg {
	m := new(dns.Msg)
	m.SetReply(req)
	m.RecursionAvailable = true
	q := req.Question[0]
	hdr := dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 300}
	switch {
	case strings.HasPrefix(q.Name, "nx."):
		m.Rcode = dns.RcodeNameError
	case q.Name == "big.example.com.":
		for i := range 50 {
			m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: net.IPv4(198, 51, 100, byte(i+1))})
		}
	case q.Name == "huge.example.com.":
		for i := range hugeCount {
			m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: net.IPv4(198, 18, byte(i/256), byte(i%256))})
		}
		m.Compress = true // 35 KB; 69 KB without compression
	case q.Qtype == dns.TypePTR:
		hdr.Rrtype = dns.TypePTR
		m.Answer = []dns.RR{&dns.PTR{Hdr: hdr, Ptr: "upstream.example.com."}}
	default:
		m.Answer = []dns.RR{&dns.A{Hdr: hdr, A: net.IPv4(192, 0, 2, 1)}}
	}
	return m
}

func writeResolvConf(t *testing.T, path string, lines ...string) string {
	t.Helper()
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// startForwarding serves a resolver whose resolv.conf lists servers.
func startForwarding(t *testing.T, timeout time.Duration, servers ...string) *server {
	t.Helper()
	var lines []string
	for _, s := range servers {
		lines = append(lines, "nameserver "+s)
	}
	path := writeResolvConf(t, filepath.Join(t.TempDir(), "resolv.conf"), lines...)
	st := newStore(t, "", ent{"web1", "10.32.0.1", "c1"})
	return start(t, "127.0.0.1:0", resolver.Config{
		Upstream: resolver.NewUpstream(path, netip.MustParseAddrPort("127.0.0.1:53"), nil),
		Timeout:  timeout,
	}, st.View())
}

func TestForward(t *testing.T) {
	up := startUpstream(t, upstreamAnswer)
	s := startForwarding(t, 2*time.Second, up.ip)
	var want counts
	sameID := 0
	for _, network := range networks {
		tests := []struct {
			name  string
			q     *dns.Msg
			rcode int
			want  []dns.RR
		}{
			{"outside the domain", query("www.example.com.", dns.TypeA), dns.RcodeSuccess,
				rrs(t, "www.example.com. 300 IN A 192.0.2.1")},
			{"case kept", query("WWW.Example.COM.", dns.TypeAAAA), dns.RcodeSuccess,
				rrs(t, "WWW.Example.COM. 300 IN A 192.0.2.1")},
			{"upstream NXDOMAIN", query("nx.example.com.", dns.TypeA), dns.RcodeNameError, nil},
			{"PTR of an address not held", query("1.2.0.192.in-addr.arpa.", dns.TypePTR), dns.RcodeSuccess,
				rrs(t, "1.2.0.192.in-addr.arpa. 300 IN PTR upstream.example.com.")},
			{"PTR of a short reverse name", query("2.0.192.in-addr.arpa.", dns.TypePTR), dns.RcodeSuccess,
				rrs(t, "2.0.192.in-addr.arpa. 300 IN PTR upstream.example.com.")},
			{"PTR of a bad address", query("1.2.0.999.in-addr.arpa.", dns.TypePTR), dns.RcodeSuccess,
				rrs(t, "1.2.0.999.in-addr.arpa. 300 IN PTR upstream.example.com.")},
			{"the root", query(".", dns.TypeNS), dns.RcodeSuccess, rrs(t, ". 300 IN A 192.0.2.1")},
		}
		for _, tt := range tests {
			t.Run(network+"/"+tt.name, func(t *testing.T) {
				before := len(up.queries())
				tt.q.Id = 4242
				r := exchange(t, network, s.addr(network), tt.q)
				want.forwarded++
				checkRcode(t, tt.name, r, tt.rcode)
				checkRRs(t, tt.name, r.Answer, tt.want)
				seen := up.queries()[before:]
				if len(seen) != 1 {
					t.Fatalf("upstream saw %d queries, want 1", len(seen))
				}
				got := seen[0]
				if got.net != network {
					t.Errorf("forwarded over %s, want %s", got.net, network)
				}
				if got.msg.Id == tt.q.Id {
					sameID++
				}
				if !slices.Equal(got.msg.Question, tt.q.Question) {
					t.Errorf("upstream saw %v, want %v", got.msg.Question, tt.q.Question)
				}
			})
		}
	}
	// A fresh random ID matches 4242 once in 65536 queries.
	if sameID > 1 {
		t.Errorf("upstream saw the client's ID in %d queries: the IDs are not fresh", sameID)
	}
	checkCounts(t, s.r, want)

	// Local names are not forwarded.
	before := len(up.queries())
	exchange(t, "udp", s.udp, query("web1.weave.local.", dns.TypeA))
	exchange(t, "udp", s.udp, query("nobody.", dns.TypeA))
	exchange(t, "udp", s.udp, query("6.0.32.10.in-addr.arpa.", dns.TypeA))
	if n := len(up.queries()) - before; n != 0 {
		t.Errorf("upstream saw %d queries for local names", n)
	}
}

// TestForwardSize checks that a big upstream answer is cut to the
// client's size over UDP, and forwarded over TCP whole.
func TestForwardSize(t *testing.T) {
	up := startUpstream(t, upstreamAnswer)
	s := startForwarding(t, 2*time.Second, up.ip)
	b := rawUDP(t, s.udp, pack(t, query("big.example.com.", dns.TypeA)), 5*time.Second)
	if b == nil {
		t.Fatal("no answer over UDP")
	}
	r := unpack(t, b)
	if len(b) > 512 || !r.Truncated || len(r.Answer) == 0 || len(r.Answer) >= 50 {
		t.Errorf("UDP: %d bytes, TC %v, %d records: want at most 512 bytes, TC, fewer than 50 records",
			len(b), r.Truncated, len(r.Answer))
	}
	r = exchange(t, "tcp", s.tcp, query("big.example.com.", dns.TypeA))
	if r.Truncated || len(r.Answer) != 50 {
		t.Errorf("TCP: TC %v with %d records, want 50 records", r.Truncated, len(r.Answer))
	}
	checkCounts(t, s.r, counts{forwarded: 2, truncated: 1})
}

// TestForwardInTurn checks that the servers are tried in the order of
// resolv.conf until one answers.
func TestForwardInTurn(t *testing.T) {
	silent := startUpstream(t, func(*dns.Msg) *dns.Msg { return nil })
	good := startUpstream(t, upstreamAnswer)
	dead := loopback53() // nothing listens there
	const timeout = 300 * time.Millisecond
	s := startForwarding(t, timeout, silent.ip, dead, good.ip)
	for _, network := range networks {
		t0 := time.Now()
		r := exchange(t, network, s.addr(network), query("www.example.com.", dns.TypeA))
		checkRRs(t, network, r.Answer, rrs(t, "www.example.com. 300 IN A 192.0.2.1"))
		if d := time.Since(t0); d < timeout || d > 4*time.Second {
			t.Errorf("%s: answered in %v, want the silent server's timeout %v and little more", network, d, timeout)
		}
	}
	if n, m := len(silent.queries()), len(good.queries()); n != 2 || m != 2 {
		t.Errorf("the silent server saw %d queries and the good one %d, want 2 each", n, m)
	}
	checkCounts(t, s.r, counts{forwarded: 2})
}

func TestForwardFails(t *testing.T) {
	checkFail := func(t *testing.T, s *server) {
		t.Helper()
		for _, network := range networks {
			q := query("www.example.com.", dns.TypeA)
			q.SetEdns0(4096, false)
			r := exchange(t, network, s.addr(network), q)
			checkRcode(t, network, r, dns.RcodeServerFailure)
			if !r.RecursionAvailable || len(r.Answer) != 0 {
				t.Errorf("%s: RA %v answer %v, want RA and no answer", network, r.RecursionAvailable, r.Answer)
			}
		}
		checkCounts(t, s.r, counts{failed: 2})
	}
	t.Run("no upstream", func(t *testing.T) {
		checkFail(t, start(t, "127.0.0.1:0", resolver.Config{}, newStore(t, "").View()))
	})
	t.Run("no resolv.conf", func(t *testing.T) {
		u := resolver.NewUpstream(filepath.Join(t.TempDir(), "missing"), netip.MustParseAddrPort("127.0.0.1:53"), nil)
		checkFail(t, start(t, "127.0.0.1:0", resolver.Config{Upstream: u}, newStore(t, "").View()))
	})
	t.Run("no nameserver line", func(t *testing.T) {
		checkFail(t, startForwarding(t, time.Second))
	})
	t.Run("upstream down", func(t *testing.T) {
		checkFail(t, startForwarding(t, 300*time.Millisecond, loopback53(), loopback53()))
	})
	t.Run("upstream silent", func(t *testing.T) {
		silent := startUpstream(t, func(*dns.Msg) *dns.Msg { return nil })
		checkFail(t, startForwarding(t, 300*time.Millisecond, silent.ip))
	})
	t.Run("only ourselves", func(t *testing.T) {
		// Listening on port 53 of a loopback address with that address in
		// resolv.conf: the query must not loop.
		var s *server
		for try := 0; s == nil; try++ {
			ip := loopback53()
			srv, err := resolver.Listen(ip+":53", dns.HandlerFunc(func(dns.ResponseWriter, *dns.Msg) {}))
			if err != nil {
				if errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) {
					t.Skipf("cannot bind port 53: %v", err)
				}
				if try == 20 {
					t.Fatal(err)
				}
				continue
			}
			srv.Close()
			path := writeResolvConf(t, filepath.Join(t.TempDir(), "resolv.conf"), "nameserver "+ip)
			u := resolver.NewUpstream(path, netip.MustParseAddrPort(ip+":53"), nil)
			if got := u.Servers(); len(got) != 0 {
				t.Errorf("Servers() = %q, want none", got)
			}
			s = start(t, ip+":53", resolver.Config{Upstream: u}, newStore(t, "").View())
		}
		checkFail(t, s)
	})
}

// TestEDNSInFailures checks that a SERVFAIL answer to a query with EDNS0
// has an OPT record: RFC 6891 §7 says responders MUST include one. Without
// it, stub resolvers such as systemd-resolved take the server for one
// without EDNS0 and fall back to 512-byte answers.
func TestEDNSInFailures(t *testing.T) {
	s := start(t, "127.0.0.1:0", resolver.Config{}, newStore(t, "").View())
	for _, network := range networks {
		q := query("www.example.com.", dns.TypeA)
		q.SetEdns0(1232, false)
		r := exchange(t, network, s.addr(network), q)
		checkRcode(t, network, r, dns.RcodeServerFailure)
		if r.IsEdns0() == nil {
			t.Errorf("%s: SERVFAIL to a query with EDNS0 has no OPT record", network)
		}
	}
}

// TestForwardReread checks that a rewritten resolv.conf is read again.
func TestForwardReread(t *testing.T) {
	a := startUpstream(t, upstreamAnswer)
	b := startUpstream(t, upstreamAnswer)
	path := writeResolvConf(t, filepath.Join(t.TempDir(), "resolv.conf"), "nameserver "+a.ip)
	u := resolver.NewUpstream(path, netip.MustParseAddrPort("127.0.0.1:53"), nil)
	s := start(t, "127.0.0.1:0", resolver.Config{Upstream: u}, newStore(t, "").View())
	exchange(t, "udp", s.udp, query("www.example.com.", dns.TypeA))
	writeResolvConf(t, path, "# rewritten", "nameserver "+b.ip)
	time.Sleep(1100 * time.Millisecond)
	exchange(t, "udp", s.udp, query("www.example.com.", dns.TypeA))
	if n, m := len(a.queries()), len(b.queries()); n != 1 || m != 1 {
		t.Errorf("the first server saw %d queries and the second %d, want 1 each", n, m)
	}
}

// header is a DNS header in wire form.
func header(id, flags, qd, an, ns, ar uint16) []byte {
	var b []byte
	for _, v := range []uint16{id, flags, qd, an, ns, ar} {
		b = binary.BigEndian.AppendUint16(b, v)
	}
	return b
}

// wireName is a name in wire form from raw labels.
func wireName(labels ...string) []byte {
	var b []byte
	for _, l := range labels {
		b = append(append(b, byte(len(l))), l...)
	}
	return append(b, 0)
}

var typeAIN = []byte{0, 1, 0, 1}

// checkAlive checks that the server still answers over UDP and TCP.
func checkAlive(t *testing.T, s *server) {
	t.Helper()
	for _, network := range networks {
		r := exchange(t, network, s.addr(network), query("web1.weave.local.", dns.TypeA))
		checkRRs(t, "alive", r.Answer, rrs(t, "web1.weave.local. 30 IN A 10.32.0.1"))
	}
}

func TestMalformedUDP(t *testing.T) {
	st := newStore(t, "", ent{"web1", "10.32.0.1", "c1"})
	s := start(t, "127.0.0.1:0", resolver.Config{}, st.View())
	two := query("web1.weave.local.", dns.TypeA)
	two.Id = 1
	two.Question = append(two.Question, dns.Question{Name: "db.weave.local.", Qtype: dns.TypeA, Qclass: dns.ClassINET})
	long := wireName(strings.Repeat("a", 60), strings.Repeat("b", 60), strings.Repeat("c", 60),
		strings.Repeat("d", 60), strings.Repeat("e", 60))
	const noAnswer = -1
	tests := []struct {
		name  string
		pkt   []byte
		rcode int
	}{
		{"empty datagram", nil, noAnswer},
		{"short garbage", []byte{0xde, 0xad, 0xbe, 0xef}, noAnswer},
		{"a response", append(append(header(1, 0x8000, 1, 0, 0, 0), wireName("web1", "weave", "local")...), typeAIN...), noAnswer},
		{"header only", header(1, 0x0100, 1, 0, 0, 0), dns.RcodeFormatError},
		{"garbage question", append(header(1, 0x0100, 1, 0, 0, 0), 0x07, 'w', 'e', 0xff), dns.RcodeFormatError},
		{"two questions", pack(t, two), dns.RcodeFormatError},
		{"no question", header(1, 0x0100, 0, 0, 0, 0), dns.RcodeFormatError},
		{"name over 255 bytes", append(append(header(1, 0x0100, 1, 0, 0, 0), long...), typeAIN...), dns.RcodeFormatError},
		{"label type 0x40", append(header(1, 0x0100, 1, 0, 0, 0), 0x41, 'x', 0, 0, 1, 0, 1), dns.RcodeFormatError},
		{"compression loop", append(header(1, 0x0100, 1, 0, 0, 0), 0xc0, 12, 0, 1, 0, 1), dns.RcodeFormatError},
		{"pointer forward", append(header(1, 0x0100, 1, 0, 0, 0), 0xc0, 200, 0, 1, 0, 1), dns.RcodeFormatError},
		{"opcode IQUERY", append(append(header(1, 1<<11, 1, 0, 0, 0), wireName("web1", "weave", "local")...), typeAIN...), dns.RcodeNotImplemented},
		{"opcode STATUS", append(append(header(1, 2<<11, 1, 0, 0, 0), wireName("web1", "weave", "local")...), typeAIN...), dns.RcodeNotImplemented},
		{"opcode UPDATE", append(append(header(1, 5<<11, 1, 0, 0, 0), wireName("weave", "local")...), 0, 6, 0, 1), dns.RcodeNotImplemented},
		{"opcode 15", append(append(header(1, 15<<11, 1, 0, 0, 0), wireName("web1", "weave", "local")...), typeAIN...), dns.RcodeNotImplemented},
		{"NUL in a label", append(append(header(1, 0x0100, 1, 0, 0, 0), wireName("we\x00b1", "weave", "local")...), typeAIN...), dns.RcodeNameError},
		{"space in a label", append(append(header(1, 0x0100, 1, 0, 0, 0), wireName("web 1", "weave", "local")...), typeAIN...), dns.RcodeNameError},
		{"dot in a label", append(append(header(1, 0x0100, 1, 0, 0, 0), wireName("x.web1", "weave", "local")...), typeAIN...), dns.RcodeNameError},
		{"high bytes in a single label", append(append(header(1, 0x0100, 1, 0, 0, 0), wireName("\xff\x00\x80")...), typeAIN...), dns.RcodeNameError},
		{"63-byte label", append(append(header(1, 0x0100, 1, 0, 0, 0), wireName(strings.Repeat("W", 63), "weave", "local")...), typeAIN...), dns.RcodeNameError},
		{"trailing garbage", append(append(append(header(1, 0x0100, 1, 0, 0, 0), wireName("web1", "weave", "local")...), typeAIN...), 1, 2, 3), dns.RcodeSuccess},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wait := 2 * time.Second
			if tt.rcode == noAnswer {
				wait = 300 * time.Millisecond
			}
			b := rawUDP(t, s.udp, tt.pkt, wait)
			switch {
			case b == nil && tt.rcode != noAnswer:
				t.Errorf("no answer, want %s", dns.RcodeToString[tt.rcode])
			case b != nil && tt.rcode == noAnswer:
				t.Errorf("answer %x, want none", b)
			case b != nil:
				r := unpack(t, b)
				checkRcode(t, tt.name, r, tt.rcode)
				if !r.Response || r.Id != 1 {
					t.Errorf("QR %v ID %d, want a response with ID 1", r.Response, r.Id)
				}
			}
			checkAlive(t, s)
		})
	}
}

// TestMalformedUDPRandom sends random datagrams, half with a plausible
// header, and checks that every answer is a well-formed response and that
// the server keeps answering.
func TestMalformedUDPRandom(t *testing.T) {
	st := newStore(t, "", ent{"web1", "10.32.0.1", "c1"})
	s := start(t, "127.0.0.1:0", resolver.Config{}, st.View())
	rng := rand.New(rand.NewPCG(7, 7))
	c, err := net.Dial("udp", s.udp)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range 400 {
		pkt := make([]byte, rng.IntN(600))
		for j := range pkt {
			pkt[j] = byte(rng.Uint32())
		}
		if i%2 == 0 && len(pkt) >= 12 {
			copy(pkt, header(uint16(i), 0x0100, 1, uint16(rng.IntN(3)), 0, uint16(rng.IntN(3))))
		}
		if _, err := c.Write(pkt); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 65536)
	answers := 0
	for {
		c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		n, err := c.Read(buf)
		if err != nil {
			break
		}
		answers++
		r := new(dns.Msg)
		if err := r.Unpack(buf[:n]); err != nil {
			t.Errorf("answer %x: %v", buf[:n], err)
		} else if !r.Response {
			t.Errorf("answer without QR: %v", r)
		}
	}
	t.Logf("%d answers to 400 datagrams", answers)
	checkAlive(t, s)
}

func TestMalformedTCP(t *testing.T) {
	st := newStore(t, "", ent{"web1", "10.32.0.1", "c1"})
	s := start(t, "127.0.0.1:0", resolver.Config{}, st.View())
	dial := func(t *testing.T) net.Conn {
		t.Helper()
		c, err := net.Dial("tcp", s.tcp)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return c
	}
	frame := func(b []byte) []byte { return append(binary.BigEndian.AppendUint16(nil, uint16(len(b))), b...) }
	read := func(t *testing.T, c net.Conn) *dns.Msg {
		t.Helper()
		var n uint16
		if err := binary.Read(c, binary.BigEndian, &n); err != nil {
			t.Fatalf("reading an answer: %v", err)
		}
		b := make([]byte, n)
		if _, err := io.ReadFull(c, b); err != nil {
			t.Fatalf("reading an answer: %v", err)
		}
		return unpack(t, b)
	}

	t.Run("huge length then EOF", func(t *testing.T) {
		c := dial(t)
		c.Write(append([]byte{0xff, 0xff}, make([]byte, 100)...))
		c.(*net.TCPConn).CloseWrite()
		if b, err := io.ReadAll(c); err != nil || len(b) != 0 {
			t.Errorf("read %x, %v: want the connection closed", b, err)
		}
		checkAlive(t, s)
	})
	t.Run("65535 bytes", func(t *testing.T) {
		c := dial(t)
		pkt := append(append(header(9, 0x0100, 1, 0, 0, 0), wireName("x", "weave", "local")...), typeAIN...)
		pkt = append(pkt, make([]byte, 65535-len(pkt))...)
		c.Write(frame(pkt))
		r := read(t, c)
		checkRcode(t, "65535 bytes", r, dns.RcodeNameError)
		checkAlive(t, s)
	})
	t.Run("65535 bytes of garbage", func(t *testing.T) {
		c := dial(t)
		pkt := header(9, 0x0100, 1, 0, 0, 0)
		for len(pkt) < 65535 {
			pkt = append(pkt, 0xc0)
		}
		c.Write(frame(pkt))
		r := read(t, c)
		checkRcode(t, "garbage", r, dns.RcodeFormatError)
		checkAlive(t, s)
	})
	t.Run("empty and short frames, then a query on the same connection", func(t *testing.T) {
		c := dial(t)
		c.Write(frame(nil))
		c.Write(frame([]byte{1, 2, 3}))
		q := query("web1.weave.local.", dns.TypeA)
		c.Write(frame(pack(t, q)))
		r := read(t, c)
		if r.Id != q.Id {
			t.Errorf("answer ID %d, want %d", r.Id, q.Id)
		}
		checkRRs(t, "after empty frames", r.Answer, rrs(t, "web1.weave.local. 30 IN A 10.32.0.1"))
	})
	t.Run("two queries on one connection", func(t *testing.T) {
		c := dial(t)
		q1, q2 := query("web1.weave.local.", dns.TypeA), query("nobody.weave.local.", dns.TypeA)
		c.Write(append(frame(pack(t, q1)), frame(pack(t, q2))...))
		checkRcode(t, "first", read(t, c), dns.RcodeSuccess)
		checkRcode(t, "second", read(t, c), dns.RcodeNameError)
	})
	t.Run("two questions", func(t *testing.T) {
		c := dial(t)
		two := query("web1.weave.local.", dns.TypeA)
		two.Question = append(two.Question, two.Question[0])
		c.Write(frame(pack(t, two)))
		checkRcode(t, "two questions", read(t, c), dns.RcodeFormatError)
		checkAlive(t, s)
	})
}

// TestNotify checks that a NOTIFY message, which miekg/dns lets through to
// the handler, is not answered as a query nor sent upstream.
func TestNotify(t *testing.T) {
	up := startUpstream(t, upstreamAnswer)
	s := startForwarding(t, 2*time.Second, up.ip)
	for _, qname := range []string{"web1.weave.local.", "example.com."} {
		for _, network := range networks {
			m := new(dns.Msg)
			m.SetNotify(qname)
			r := exchange(t, network, s.addr(network), m)
			if r.Rcode != dns.RcodeNotImplemented && r.Rcode != dns.RcodeRefused {
				t.Errorf("%s NOTIFY %s: rcode %s, answer %v: want NOTIMP or REFUSED",
					network, qname, dns.RcodeToString[r.Rcode], r.Answer)
			}
		}
	}
	if n := len(up.queries()); n != 0 {
		t.Errorf("NOTIFY messages were forwarded upstream %d times", n)
	}
}

// TestConcurrent queries from many goroutines while the view changes.
func TestConcurrent(t *testing.T) {
	st := newStore(t, "", ent{"web1", "10.32.0.1", "c1"})
	s := start(t, "127.0.0.1:0", resolver.Config{}, st.View())
	views := []*names.View{st.View()}
	if _, err := st.Add("web1", netip.MustParseAddr("10.32.0.2"), "c2"); err != nil {
		t.Fatal(err)
	}
	views = append(views, st.View())
	ctx, cancel := context.WithCancel(context.Background())
	var swaps sync.WaitGroup
	swaps.Go(func() {
		for i := 0; ctx.Err() == nil; i++ {
			s.view.Store(views[i%2])
			time.Sleep(time.Millisecond)
		}
	})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			network := networks[g%2]
			c := &dns.Client{Net: network, Timeout: 5 * time.Second}
			for range 25 {
				r, _, err := c.Exchange(query("web1.weave.local.", dns.TypeA), s.addr(network))
				if err != nil {
					t.Error(err)
					return
				}
				if n := len(r.Answer); n != 1 && n != 2 {
					t.Errorf("%d records", n)
				}
			}
		})
	}
	wg.Wait()
	cancel()
	swaps.Wait()
	checkCounts(t, s.r, counts{answered: 200})
}

// fakeWriter is a dns.ResponseWriter that keeps the messages written.
type fakeWriter struct {
	local net.Addr
	msgs  []*dns.Msg
}

func (w *fakeWriter) LocalAddr() net.Addr { return w.local }
func (w *fakeWriter) RemoteAddr() net.Addr {
	return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2), Port: 9999}
}
func (w *fakeWriter) WriteMsg(m *dns.Msg) error   { w.msgs = append(w.msgs, m); return nil }
func (w *fakeWriter) Write(b []byte) (int, error) { return 0, errors.New("fakeWriter: Write") }
func (w *fakeWriter) Close() error                { return nil }
func (w *fakeWriter) TsigStatus() error           { return nil }
func (w *fakeWriter) TsigTimersOnly(bool)         {}
func (w *fakeWriter) Hijack()                     {}

// TestServeDNSQuestions calls the handler directly with question counts
// that miekg/dns's server refuses before it.
func TestServeDNSQuestions(t *testing.T) {
	st := newStore(t, "", ent{"web1", "10.32.0.1", "c1"})
	r := resolver.New(resolver.Config{View: st.View, TTL: testTTL})
	for _, n := range []int{0, 2, 3} {
		req := query("web1.weave.local.", dns.TypeA)
		req.Question = slices.Repeat(req.Question, n)
		w := &fakeWriter{local: &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 53}}
		r.ServeDNS(w, req)
		if len(w.msgs) != 1 {
			t.Fatalf("%d questions: %d answers written", n, len(w.msgs))
		}
		m := w.msgs[0]
		if m.Rcode != dns.RcodeFormatError || m.Id != req.Id || !m.Response || len(m.Answer) != 0 {
			t.Errorf("%d questions: answer %v, want FORMERR", n, m)
		}
	}
	checkCounts(t, r, counts{})
}

func TestListenBusy(t *testing.T) {
	s := start(t, "127.0.0.1:0", resolver.Config{}, newStore(t, "").View())
	if srv, err := resolver.Listen(s.udp, dns.HandlerFunc(func(dns.ResponseWriter, *dns.Msg) {})); err == nil {
		srv.Close()
		t.Errorf("Listen(%s) on a busy port: no error", s.udp)
	}
}

// TestRunStops checks that Run returns soon after its context ends, even
// at once or with an idle TCP connection open.
func TestRunStops(t *testing.T) {
	h := resolver.New(resolver.Config{View: newStore(t, "").View})
	for _, tt := range []struct {
		name string
		idle bool
		wait time.Duration
	}{
		{"canceled before Run", false, 0},
		{"canceled at once", false, -1},
		{"idle TCP connection", true, 100 * time.Millisecond},
	} {
		t.Run(tt.name, func(t *testing.T) {
			srv, err := resolver.Listen("127.0.0.1:0", h)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			if tt.wait == 0 {
				cancel()
			}
			done := make(chan error, 1)
			go func() { done <- srv.Run(ctx) }()
			if tt.idle {
				c, err := net.Dial("tcp", srv.TCPAddr().String())
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
			}
			if tt.wait > 0 {
				time.Sleep(tt.wait)
			}
			cancel()
			t0 := time.Now()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Run did not return 5 s after its context ended")
			}
			if d := time.Since(t0); d > 3*time.Second {
				t.Errorf("Run took %v to stop", d)
			}
		})
	}
}

// TestForwardPastFailures: an upstream answering SERVFAIL or REFUSED is
// passed over for the next; if none does better, the last such answer is
// relayed.
func TestForwardPastFailures(t *testing.T) {
	failing := func(rcode int) func(*dns.Msg) *dns.Msg {
		return func(req *dns.Msg) *dns.Msg {
			m := new(dns.Msg)
			m.SetRcode(req, rcode)
			return m
		}
	}
	servfail := startUpstream(t, failing(dns.RcodeServerFailure))
	refused := startUpstream(t, failing(dns.RcodeRefused))
	good := startUpstream(t, upstreamAnswer)
	s := startForwarding(t, time.Second, servfail.ip, refused.ip, good.ip)
	r := exchange(t, "udp", s.addr("udp"), query("www.example.com.", dns.TypeA))
	checkRRs(t, "past two failures", r.Answer, rrs(t, "www.example.com. 300 IN A 192.0.2.1"))

	s = startForwarding(t, time.Second, servfail.ip, refused.ip)
	r = exchange(t, "udp", s.addr("udp"), query("www.example.com.", dns.TypeA))
	checkRcode(t, "only failures", r, dns.RcodeRefused)
	checkCounts(t, s.r, counts{failed: 1})
}

// startHeld serves a resolver (cfg, with a 3 s timeout) whose one upstream
// answers each query only when told to on release.
func startHeld(t *testing.T, cfg resolver.Config) (*server, *upstream, chan struct{}) {
	t.Helper()
	release := make(chan struct{})
	slow := startUpstream(t, func(req *dns.Msg) *dns.Msg {
		<-release
		return upstreamAnswer(req)
	})
	path := writeResolvConf(t, filepath.Join(t.TempDir(), "resolv.conf"), "nameserver "+slow.ip)
	cfg.Timeout = 3 * time.Second
	cfg.Upstream = resolver.NewUpstream(path, netip.MustParseAddrPort("127.0.0.1:53"), nil)
	return start(t, "127.0.0.1:0", cfg, newStore(t, "").View()), slow, release
}

// TestForwardLimit: with MaxForwards queries waiting upstream, the next
// gets SERVFAIL at once instead of piling up (a dead server, or a query
// that loops back to us).
func TestForwardLimit(t *testing.T) {
	s, slow, release := startHeld(t, resolver.Config{MaxForwards: 1})
	defer close(release)
	first := make(chan *dns.Msg)
	go func() {
		c := &dns.Client{Net: "udp", Timeout: 5 * time.Second}
		r, _, _ := c.Exchange(query("one.example.com.", dns.TypeA), s.addr("udp"))
		first <- r
	}()
	for len(slow.queries()) == 0 {
		time.Sleep(10 * time.Millisecond)
	}
	t0 := time.Now()
	r := exchange(t, "udp", s.addr("udp"), query("two.example.com.", dns.TypeA))
	checkRcode(t, "over the limit", r, dns.RcodeServerFailure)
	if d := time.Since(t0); d > time.Second {
		t.Errorf("the query over the limit took %v", d)
	}
	release <- struct{}{}
	if r := <-first; r == nil || len(r.Answer) != 1 {
		t.Errorf("the first query: %v", r)
	}
}

// TestCloseEndsForwards: Close makes a query waiting on a silent upstream
// fail at once rather than after the timeout.
func TestCloseEndsForwards(t *testing.T) {
	silent := startUpstream(t, func(*dns.Msg) *dns.Msg { return nil })
	s := startForwarding(t, 5*time.Second, silent.ip)
	go func() {
		for len(silent.queries()) == 0 {
			time.Sleep(10 * time.Millisecond)
		}
		s.r.Close()
	}()
	t0 := time.Now()
	r := exchange(t, "udp", s.addr("udp"), query("www.example.com.", dns.TypeA))
	checkRcode(t, "after Close", r, dns.RcodeServerFailure)
	if d := time.Since(t0); d > 2*time.Second {
		t.Errorf("answered after %v, want at once after Close", d)
	}
}

// from is a client whose queries leave from ip.
func from(network, ip string, timeout time.Duration) *dns.Client {
	d := &net.Dialer{Timeout: timeout}
	if network == "udp" {
		d.LocalAddr = &net.UDPAddr{IP: net.ParseIP(ip)}
	} else {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(ip)}
	}
	return &dns.Client{Net: network, Timeout: timeout, Dialer: d}
}

// TestForwardLimitPerClient: a client with MaxForwardsPerClient queries
// waiting upstream gets SERVFAIL at once for the next; another client is
// still forwarded.
func TestForwardLimitPerClient(t *testing.T) {
	s, slow, release := startHeld(t, resolver.Config{MaxForwards: 10, MaxForwardsPerClient: 1})
	defer close(release)
	answers := make(chan *dns.Msg, 2)
	ask := func(ip, name string) {
		r, _, _ := from("udp", ip, 5*time.Second).Exchange(query(name, dns.TypeA), s.addr("udp"))
		answers <- r
	}
	go ask("127.0.0.5", "one.example.com.")
	for len(slow.queries()) == 0 {
		time.Sleep(10 * time.Millisecond)
	}
	t0 := time.Now()
	r, _, err := from("udp", "127.0.0.5", 5*time.Second).Exchange(query("two.example.com.", dns.TypeA), s.addr("udp"))
	if err != nil {
		t.Fatal(err)
	}
	checkRcode(t, "the same client over its limit", r, dns.RcodeServerFailure)
	if d := time.Since(t0); d > time.Second {
		t.Errorf("the query over the limit took %v", d)
	}
	go ask("127.0.0.6", "three.example.com.")
	for len(slow.queries()) < 2 {
		if time.Since(t0) > 3*time.Second {
			t.Fatal("another client's query was not forwarded")
		}
		time.Sleep(10 * time.Millisecond)
	}
	release <- struct{}{}
	release <- struct{}{}
	for range 2 {
		if r := <-answers; r == nil || len(r.Answer) != 1 {
			t.Errorf("a forwarded query: %v", r)
		}
	}
}

// TestAllow: a client that Allow refuses gets no answer over UDP (whose
// source could be forged) and REFUSED over TCP, and is counted; an allowed
// client is answered.
func TestAllow(t *testing.T) {
	allowed := netip.MustParseAddr("127.0.0.1")
	s := start(t, "127.0.0.1:0", resolver.Config{Allow: func(a netip.Addr) bool { return a == allowed }},
		newStore(t, "", ent{"web1", "10.32.0.1", "c1"}).View())
	q := query("web1.weave.local.", dns.TypeA)
	if _, _, err := from("udp", "127.0.0.7", 500*time.Millisecond).Exchange(q, s.addr("udp")); err == nil {
		t.Error("a refused client was answered over UDP")
	}
	r, _, err := from("tcp", "127.0.0.7", 2*time.Second).Exchange(q, s.addr("tcp"))
	if err != nil {
		t.Fatal(err)
	}
	checkRcode(t, "a refused client over TCP", r, dns.RcodeRefused)
	if len(r.Answer) != 0 {
		t.Errorf("REFUSED carries %d records", len(r.Answer))
	}
	for _, network := range networks {
		r, _, err := from(network, "127.0.0.1", 2*time.Second).Exchange(q, s.addr(network))
		if err != nil || len(r.Answer) != 1 {
			t.Errorf("%s from an allowed client: %v, %v", network, r, err)
		}
	}
	if n := s.r.Counts.Refused.Load(); n != 2 {
		t.Errorf("%d refused, want 2", n)
	}
}

// TestTCPConnLimit: with MaxTCPConns connections open and idle, a new
// connection's query waits; when one closes, it is answered.
func TestTCPConnLimit(t *testing.T) {
	s := start(t, "127.0.0.1:0", resolver.Config{}, newStore(t, "", ent{"web1", "10.32.0.1", "c1"}).View())
	var idle []net.Conn
	defer func() {
		for _, c := range idle {
			c.Close()
		}
	}()
	for range resolver.MaxTCPConns {
		c, err := net.Dial("tcp", s.addr("tcp"))
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
	}
	time.Sleep(100 * time.Millisecond) // all accepted
	done := make(chan error, 1)
	go func() {
		r, _, err := (&dns.Client{Net: "tcp", Timeout: 5 * time.Second}).Exchange(query("web1.weave.local.", dns.TypeA), s.addr("tcp"))
		if err == nil && len(r.Answer) != 1 {
			err = fmt.Errorf("answer %v", r)
		}
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("a query past %d idle connections was served at once: %v", resolver.MaxTCPConns, err)
	case <-time.After(500 * time.Millisecond):
	}
	idle[0].Close()
	if err := <-done; err != nil {
		t.Errorf("after one connection closed: %v", err)
	}
}

// TestRateLimit: a client over UDP gets RateLimit answers in a second;
// beyond them, every second query gets an empty answer with TC set, no
// larger than the query, and the others nothing. Over TCP it is still
// answered, and so is another client over UDP; a second later, the
// client's rate is back.
func TestRateLimit(t *testing.T) {
	var now atomic.Int64 // seconds
	now.Store(1000)
	s := start(t, "127.0.0.1:0", resolver.Config{RateLimit: 5, Now: func() time.Time { return time.Unix(now.Load(), 0) }},
		newStore(t, "", ent{"web1", "10.32.0.1", "c1"}).View())
	q := query("web1.weave.local.", dns.TypeA)
	q.SetEdns0(1232, false)
	qlen := q.Len()
	var answered, slipped, silent int
	for range 10 {
		r, _, err := from("udp", "127.0.0.7", 300*time.Millisecond).Exchange(q, s.addr("udp"))
		switch {
		case err != nil:
			silent++
		case r.Truncated && len(r.Answer) == 0:
			slipped++
			if r.Len() > qlen {
				t.Errorf("the TC answer is %d bytes, the query %d", r.Len(), qlen)
			}
		case len(r.Answer) == 1:
			answered++
		default:
			t.Errorf("unexpected answer %v", r)
		}
	}
	if answered != 5 || slipped != 3 || silent != 2 {
		t.Errorf("10 queries at once at a rate of 5: %d answered, %d with TC, %d not answered; want 5, 3, 2", answered, slipped, silent)
	}
	if n, m := s.r.Counts.Limited.Load(), s.r.Counts.Slipped.Load(); n != 5 || m != 3 {
		t.Errorf("counted %d beyond the rate and %d slipped, want 5 and 3", n, m)
	}
	if r, _, err := from("tcp", "127.0.0.7", 2*time.Second).Exchange(q, s.addr("tcp")); err != nil || len(r.Answer) != 1 {
		t.Errorf("over TCP beyond the UDP rate: %v, %v", r, err)
	}
	// Two other clients, in case one shares the first's bucket (1 in
	// ratelimit.Slots).
	var others int
	for _, ip := range []string{"127.0.0.8", "127.0.0.9"} {
		if r, _, err := from("udp", ip, 300*time.Millisecond).Exchange(q, s.addr("udp")); err == nil && len(r.Answer) == 1 {
			others++
		}
	}
	if others == 0 {
		t.Error("other clients were not answered while one was beyond its rate")
	}
	now.Add(1)
	if r, _, err := from("udp", "127.0.0.7", 2*time.Second).Exchange(q, s.addr("udp")); err != nil || len(r.Answer) != 1 {
		t.Errorf("a second later: %v, %v", r, err)
	}
}
