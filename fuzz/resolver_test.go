package fuzz

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/overlayd/overlayd/names"
	"github.com/overlayd/overlayd/names/resolver"
)

// dnsWriter is a dns.ResponseWriter that records what it is given, over
// UDP or TCP as its local address says.
type dnsWriter struct {
	local, remote net.Addr
	msgs          []*dns.Msg
	packed        [][]byte
	packErr       error
}

var _ dns.ResponseWriter = (*dnsWriter)(nil)

func (w *dnsWriter) LocalAddr() net.Addr  { return w.local }
func (w *dnsWriter) RemoteAddr() net.Addr { return w.remote }
func (w *dnsWriter) WriteMsg(m *dns.Msg) error {
	b, err := m.Pack() // as the server does
	if err != nil && w.packErr == nil {
		w.packErr = err
	}
	w.msgs, w.packed = append(w.msgs, m), append(w.packed, b)
	return err
}
func (w *dnsWriter) Write(b []byte) (int, error) {
	m := new(dns.Msg)
	if err := m.Unpack(b); err != nil {
		w.packErr = fmt.Errorf("raw write of a message that does not unpack: %w", err)
	}
	w.msgs, w.packed = append(w.msgs, m), append(w.packed, b)
	return len(b), nil
}
func (w *dnsWriter) Close() error        { return nil }
func (w *dnsWriter) TsigStatus() error   { return nil }
func (w *dnsWriter) TsigTimersOnly(bool) {}
func (w *dnsWriter) Hijack()             {}

// dnsView is a view with a few names, one of them with 50 addresses (an
// answer that must be cut over UDP).
func dnsView(tb testing.TB) *names.View {
	s, err := names.New(names.Config{Self: 1, Rand: rand.New(rand.NewPCG(1, 2))}, nil)
	if err != nil {
		tb.Fatal(err)
	}
	add := func(host, addr string) {
		if _, err := s.Add(host, netip.MustParseAddr(addr), "c-"+host); err != nil {
			tb.Fatal(err)
		}
	}
	add("web", "10.40.0.1")
	add("web", "10.40.0.2")
	add("DB.sub.weave.local.", "10.40.1.1")
	for i := range 50 {
		add("big", fmt.Sprintf("10.40.2.%d", i+1))
	}
	return s.View()
}

func dnsQuery(name string, qtype uint16, edns uint16, tweak func(*dns.Msg)) []byte {
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	m.Id = 0x1234
	if edns != 0 {
		m.SetEdns0(edns, false)
	}
	if tweak != nil {
		tweak(m)
	}
	b, err := m.Pack()
	if err != nil {
		panic(err)
	}
	return b
}

// Bits of FuzzResolverServeDNS's how argument.
const (
	dnsHowTCP     = 1 // the query came over TCP
	dnsHowRefused = 2 // from a client Allow refuses
	dnsHowLimited = 4 // from a client beyond its rate (over UDP)
)

// FuzzResolverServeDNS hands the resolver a query decoded from the input,
// over UDP or TCP, from a client it answers or not, with no upstream
// server. It never panics, and:
//   - a refused client gets nothing over UDP and REFUSED over TCP; any
//     other gets exactly one answer, with the query's ID and question;
//   - a query without exactly one question gets FORMERR, another opcode
//     than QUERY NOTIMP;
//   - an answer over UDP packs to at most 512 bytes, or the EDNS0 size
//     the query offers up to 1232; over TCP to at most 65535;
//   - it has an OPT record if and only if the query had one;
//   - a client beyond its rate over UDP gets nothing, or an empty answer
//     with TC set no larger than its query as it decodes;
//   - every A record is an address of its name in the view, every PTR
//     record the name of its address.
func FuzzResolverServeDNS(f *testing.F) {
	for _, s := range []struct {
		b   []byte
		how uint8
	}{
		{dnsQuery("web.weave.local.", dns.TypeA, 0, nil), 0},
		{dnsQuery("WEB.Weave.Local.", dns.TypeANY, 1232, nil), 0},
		{dnsQuery("web.", dns.TypeA, 0, nil), dnsHowTCP},
		{dnsQuery("db.sub.weave.local.", dns.TypeAAAA, 0, nil), 0},
		{dnsQuery("nobody.weave.local.", dns.TypeA, 0, nil), 0},
		{dnsQuery("big.weave.local.", dns.TypeA, 0, nil), 0},
		{dnsQuery("big.weave.local.", dns.TypeA, 4096, nil), 0},
		{dnsQuery("big.weave.local.", dns.TypeA, 700, nil), 0},
		{dnsQuery("big.weave.local.", dns.TypeA, 100, nil), 0},
		{dnsQuery("big.weave.local.", dns.TypeA, 0, nil), dnsHowTCP},
		{dnsQuery("1.0.40.10.in-addr.arpa.", dns.TypePTR, 0, nil), 0},
		{dnsQuery("1.0.40.10.in-addr.arpa.", dns.TypeA, 0, nil), 0},
		{dnsQuery("9.9.9.10.in-addr.arpa.", dns.TypePTR, 512, nil), 0},
		{dnsQuery("example.com.", dns.TypeMX, 0, nil), 0},
		{dnsQuery("web.weave.local.", dns.TypeA, 0, nil), dnsHowRefused},
		{dnsQuery("web.weave.local.", dns.TypeA, 0, nil), dnsHowRefused | dnsHowTCP},
		{dnsQuery("web.weave.local.", dns.TypeA, 0, nil), dnsHowLimited},
		{dnsQuery("big.weave.local.", dns.TypeA, 4096, nil), dnsHowLimited},
		{dnsQuery("big.weave.local.", dns.TypeA, 0, nil), dnsHowLimited | dnsHowTCP},
		{dnsQuery("web.weave.local.", dns.TypeA, 0, func(m *dns.Msg) { m.Opcode = dns.OpcodeNotify }), 0},
		{dnsQuery("web.weave.local.", dns.TypeA, 0, func(m *dns.Msg) {
			m.Question = append(m.Question, dns.Question{Name: "db.sub.weave.local.", Qtype: dns.TypeA, Qclass: dns.ClassINET})
		}), 0},
		{dnsQuery("web.weave.local.", dns.TypeA, 0, func(m *dns.Msg) { m.Question = nil }), 0},
		{dnsQuery("web.weave.local.", dns.TypeA, 1232, func(m *dns.Msg) { m.Response, m.Truncated = true, true }), 0},
		{[]byte{0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, 'w', 'e', 'b', 0, 0, 1, 0}, 0},
		{nil, 0},
	} {
		f.Add(s.b, s.how)
	}
	v := dnsView(f)
	allowed := netip.MustParsePrefix("127.0.0.0/8")
	r := resolver.New(resolver.Config{View: func() *names.View { return v }, TTL: 30,
		Allow: func(a netip.Addr) bool { return allowed.Contains(a) }})
	f.Cleanup(r.Close)
	// limited is the same with a rate limit its client has spent: a clock
	// that stands still, one answer a second, the one spent here.
	limited := resolver.New(resolver.Config{View: func() *names.View { return v }, TTL: 30,
		Allow: func(a netip.Addr) bool { return allowed.Contains(a) }, RateLimit: 1, RateBurst: 1,
		Now: func() time.Time { return time.Unix(1e9, 0) }})
	f.Cleanup(limited.Close)
	limited.ServeDNS(&dnsWriter{local: &net.UDPAddr{IP: net.IPv4(127, 0, 0, 53), Port: 53}, remote: &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5353}},
		new(dns.Msg).SetQuestion("web.weave.local.", dns.TypeA))
	f.Fuzz(func(t *testing.T, b []byte, how uint8) {
		req := new(dns.Msg)
		if err := req.Unpack(b); err != nil {
			return
		}
		tcp, refused := how&dnsHowTCP != 0, how&dnsHowRefused != 0
		client := net.IPv4(127, 0, 0, 1)
		if refused {
			client = net.IPv4(192, 0, 2, 7)
		}
		w := &dnsWriter{local: &net.UDPAddr{IP: net.IPv4(127, 0, 0, 53), Port: 53}, remote: &net.UDPAddr{IP: client, Port: 5353}}
		if tcp {
			w.local, w.remote = &net.TCPAddr{IP: net.IPv4(127, 0, 0, 53), Port: 53}, &net.TCPAddr{IP: client, Port: 5353}
		}
		q := req.Copy()
		if how&dnsHowLimited != 0 && !tcp && !refused {
			// Beyond its rate: nothing, or an empty answer with TC set,
			// never larger than the query as it decodes (q.Len: a name
			// that points into the query's own header is shorter on
			// the wire than the question echoed; see RELIABILITY.md).
			limited.ServeDNS(w, req)
			if len(w.msgs) > 1 {
				t.Fatalf("%d answers to one query", len(w.msgs))
			}
			if len(w.msgs) == 1 {
				if m := w.msgs[0]; m.Id != q.Id || !m.Response || !m.Truncated || len(m.Answer)+len(m.Ns) != 0 || len(w.packed[0]) > q.Len() {
					t.Fatalf("beyond the rate, a %d-byte query got %d bytes: %v", q.Len(), len(w.packed[0]), m)
				}
			}
			return
		}
		r.ServeDNS(w, req)

		if refused && !tcp {
			if len(w.msgs) != 0 {
				t.Fatalf("answered a refused client over UDP: %v", w.msgs[0])
			}
			return
		}
		if len(w.msgs) != 1 {
			t.Fatalf("%d answers to one query", len(w.msgs))
		}
		if w.packErr != nil {
			t.Fatalf("answer does not pack: %v\n%v", w.packErr, w.msgs[0])
		}
		m, packed := w.msgs[0], w.packed[0]
		if m.Id != q.Id || !m.Response {
			t.Fatalf("answer ID %d (response %v) to query %d", m.Id, m.Response, q.Id)
		}
		if len(q.Question) > 0 && (len(m.Question) != 1 || m.Question[0] != q.Question[0]) {
			t.Fatalf("answer's question %v, query's %v", m.Question, q.Question)
		}
		switch {
		case refused:
			if m.Rcode != dns.RcodeRefused {
				t.Fatalf("a refused client got %s over TCP", dns.RcodeToString[m.Rcode])
			}
		case len(q.Question) != 1:
			if m.Rcode != dns.RcodeFormatError {
				t.Fatalf("%d questions: %s", len(q.Question), dns.RcodeToString[m.Rcode])
			}
		case q.Opcode != dns.OpcodeQuery:
			if m.Rcode != dns.RcodeNotImplemented {
				t.Fatalf("opcode %d: %s", q.Opcode, dns.RcodeToString[m.Rcode])
			}
		}
		limit := dns.MaxMsgSize
		if !tcp {
			limit = dns.MinMsgSize
			if opt := q.IsEdns0(); opt != nil {
				limit = min(max(limit, int(opt.UDPSize())), resolver.MaxUDPAnswer)
			}
		}
		if len(packed) > limit {
			t.Fatalf("answer of %d bytes over %s, limit %d", len(packed), map[bool]string{false: "UDP", true: "TCP"}[tcp], limit)
		}
		if (q.IsEdns0() != nil) != (m.IsEdns0() != nil) {
			t.Fatalf("query's OPT %v, answer's %v", q.IsEdns0(), m.IsEdns0())
		}
		for _, rr := range m.Answer {
			switch rr := rr.(type) {
			case *dns.A:
				a, _ := netip.AddrFromSlice(rr.A)
				name := strings.ToLower(rr.Hdr.Name)
				if dns.CountLabel(name) == 1 {
					name += v.Domain()
				}
				if !slices.Contains(v.Lookup(name), a.Unmap()) {
					t.Fatalf("answered %v, which the view does not hold for %s", rr, name)
				}
			case *dns.PTR:
				ok := false
				for _, e := range v.Entries() {
					rev, err := dns.ReverseAddr(e.Addr.String())
					h, _ := v.Reverse(e.Addr)
					ok = ok || err == nil && strings.EqualFold(rev, rr.Hdr.Name) && h == rr.Ptr
				}
				if !ok {
					t.Fatalf("answered %v, which the view does not hold", rr)
				}
			default:
				t.Fatalf("answered %v with no upstream server", rr)
			}
		}
	})
}
