package lab_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/overlayd/overlayd/internal/lab"
)

// dig runs the real dig in h against the DNS server at server (port 53)
// and returns its full output.
func dig(t *testing.T, h *lab.Host, server string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := h.Exec(ctx, "dig", append([]string{"@" + server, "+time=2", "+tries=1"}, args...)...)
	if err != nil && !strings.Contains(out, "status:") {
		t.Fatalf("dig %s in %s: %v\n%s", strings.Join(args, " "), h.NS, err, out)
	}
	return out
}

var (
	digStatus = regexp.MustCompile(`status: ([A-Z]+)`)
	digFlags  = regexp.MustCompile(`;; flags: ([a-z ]+);`)
	digA      = regexp.MustCompile(`(?m)^\S+\s+\d+\s+IN\s+A\s+(\S+)$`)
	digPTR    = regexp.MustCompile(`(?m)^\S+\s+\d+\s+IN\s+PTR\s+(\S+)$`)
)

// answer is what dig printed, taken apart.
type answer struct {
	status string
	flags  []string
	addrs  []string // A records, sorted
	ptrs   []string
	raw    string
}

func parseDig(out string) answer {
	a := answer{raw: out}
	if m := digStatus.FindStringSubmatch(out); m != nil {
		a.status = m[1]
	}
	if m := digFlags.FindStringSubmatch(out); m != nil {
		a.flags = strings.Fields(m[1])
	}
	for _, m := range digA.FindAllStringSubmatch(out, -1) {
		a.addrs = append(a.addrs, m[1])
	}
	slices.Sort(a.addrs)
	for _, m := range digPTR.FindAllStringSubmatch(out, -1) {
		a.ptrs = append(a.ptrs, m[1])
	}
	return a
}

func query(t *testing.T, h *lab.Host, args ...string) answer {
	t.Helper()
	return parseDig(dig(t, h, "127.0.0.1", args...))
}

// upstream serves *.upstream.test. (A 10.99.0.1) and 1.0.99.10.in-addr.arpa.
// in h's namespace at addr:53, standing in for the host's real resolver.
func upstream(t *testing.T, h *lab.Host) {
	t.Helper()
	var pc net.PacketConn
	var ln net.Listener
	if err := h.Do(func() (err error) {
		addr := netip.AddrPortFrom(h.Addr, 53).String()
		if pc, err = net.ListenPacket("udp", addr); err != nil {
			return err
		}
		ln, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	handler := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		q := r.Question[0]
		switch {
		case q.Qtype == dns.TypeA && dns.IsSubDomain("upstream.test.", q.Name):
			m.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60},
				A: net.IPv4(10, 99, 0, 1)}}
		case q.Qtype == dns.TypeMX && dns.IsSubDomain("upstream.test.", q.Name):
			m.Answer = []dns.RR{&dns.MX{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeMX, Class: dns.ClassINET, Ttl: 60},
				Preference: 10, Mx: "mail.upstream.test."}}
		case q.Qtype == dns.TypePTR && strings.EqualFold(q.Name, "1.0.99.10.in-addr.arpa."):
			m.Answer = []dns.RR{&dns.PTR{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypePTR, Class: dns.ClassINET, Ttl: 60},
				Ptr: "one.upstream.test."}}
		default:
			m.Rcode = dns.RcodeNameError
		}
		w.WriteMsg(m)
	})
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: handler}, {Listener: ln, Handler: handler}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go srv.ActivateAndServe()
		<-started
		t.Cleanup(func() { srv.Shutdown() })
	}
}

// TestDNS runs WeaveDNS on three hosts: names registered on each resolve
// from the others (by the real dig) within 2 s; a name on two hosts gives
// both addresses; a removed name and the names of a stopped peer are gone
// everywhere within 5 s and those of the peer come back when it restarts;
// other names go upstream; 50 A records cross over TCP and are cut with
// TC over UDP; the answer rules of WEAVE.md §2.4 hold.
func TestDNS(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 4)
	h1, h2, h3, h4 := l.Host(1), l.Host(2), l.Host(3), l.Host(4)
	upstream(t, h4)
	resolv := filepath.Join(l.Dir(), "resolv.conf")
	if err := os.WriteFile(resolv, fmt.Appendf(nil, "# the lab's upstream\nnameserver %v\n", h4.Addr), 0o644); err != nil {
		t.Fatal(err)
	}
	start := func(h *lab.Host, args ...string) *lab.Daemon {
		return h.Start(append([]string{"--range", "10.32.0.0/12", "--resolv-conf", resolv}, args...)...)
	}
	d1 := start(h1)
	d2 := start(h2, "--peer", h1.Addr.String(), "--dns-listen", h2.Addr.String()+":53")
	d3 := start(h3, "--peer", h1.Addr.String())
	for _, d := range []*lab.Daemon{d1, d2, d3} {
		waitConnected(t, d, 2, 10*time.Second)
	}
	// h2 serves DNS on its underlay address only.
	on := map[*lab.Host]string{h1: "127.0.0.1", h2: h2.Addr.String(), h3: "127.0.0.1"}
	ask := func(h *lab.Host, args ...string) answer {
		t.Helper()
		return parseDig(dig(t, h, on[h], args...))
	}
	wait := func(h *lab.Host, timeout time.Duration, want string, args ...string) time.Duration {
		t.Helper()
		start := time.Now()
		var last answer
		for time.Since(start) < timeout {
			last = ask(h, args...)
			got := strings.Join(last.addrs, " ")
			if last.status != "NOERROR" {
				got = last.status
			}
			if got == want {
				return time.Since(start)
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("%s: dig %s: want %q within %v, last answer:\n%s", h.NS, strings.Join(args, " "), want, timeout, last.raw)
		return 0
	}
	hosts := []*lab.Host{h1, h2, h3}
	daemons := []*lab.Daemon{d1, d2, d3}

	t.Run("registered names resolve everywhere within 2s", func(t *testing.T) {
		for i, d := range daemons {
			name, addr := fmt.Sprintf("web%d", i+1), fmt.Sprintf("10.32.0.%d", i+1)
			d.MustCtl("dns-add", addr, name, "--container", fmt.Sprintf("c%d", i+1))
			for _, h := range hosts {
				took := wait(h, 2*time.Second, addr, name+".weave.local")
				t.Logf("%s registered on %s, resolved on %s after %v", name, d.Host.NS, h.NS, took.Round(time.Millisecond))
			}
		}
	})

	t.Run("answer rules", func(t *testing.T) {
		a := ask(h3, "WEB1.Weave.LOCAL")
		if a.status != "NOERROR" || !slices.Equal(a.addrs, []string{"10.32.0.1"}) {
			t.Errorf("mixed case: %s", a.raw)
		}
		for _, f := range []string{"aa", "ra"} {
			if !slices.Contains(a.flags, f) {
				t.Errorf("flags %v lack %s", a.flags, f)
			}
		}
		if !regexp.MustCompile(`(?m)^WEB1\.Weave\.LOCAL\.\s+1\s+IN\s+A`).MatchString(a.raw) {
			t.Errorf("want the question's name and TTL 1 in the answer:\n%s", a.raw)
		}
		if a := ask(h3, "web2"); !slices.Equal(a.addrs, []string{"10.32.0.2"}) {
			t.Errorf("single label: %s", a.raw)
		}
		if a := ask(h3, "web1.weave.local", "MX"); a.status != "NOERROR" || len(a.addrs) != 0 || !strings.Contains(a.raw, "ANSWER: 0") {
			t.Errorf("MX of a known name: want NOERROR and no answer:\n%s", a.raw)
		}
		if a := ask(h3, "nobody.weave.local"); a.status != "NXDOMAIN" {
			t.Errorf("unknown name: %s", a.raw)
		}
		if a := ask(h2, "-x", "10.32.0.3"); !slices.Equal(a.ptrs, []string{"web3.weave.local."}) {
			t.Errorf("PTR: %s", a.raw)
		}
		if a := ask(h2, "3.0.32.10.IN-ADDR.ARPA", "PTR"); !slices.Equal(a.ptrs, []string{"web3.weave.local."}) {
			t.Errorf("PTR in upper case: %s", a.raw)
		}
		if a := ask(h2, "3.0.32.10.in-addr.arpa", "TXT"); a.status != "NXDOMAIN" {
			t.Errorf("TXT under in-addr.arpa: want NXDOMAIN:\n%s", a.raw)
		}
	})

	t.Run("one name on two hosts gives both addresses", func(t *testing.T) {
		d1.MustCtl("dns-add", "10.32.0.11", "shared")
		d2.MustCtl("dns-add", "10.32.0.12", "shared")
		wait(h3, 2*time.Second, "10.32.0.11 10.32.0.12", "shared.weave.local")
		// The order changes from answer to answer (round robin).
		orders := map[string]bool{}
		for range 30 {
			out := dig(t, h3, "127.0.0.1", "+short", "shared.weave.local")
			orders[strings.TrimSpace(out)] = true
		}
		if len(orders) != 2 {
			t.Errorf("30 answers came in %d orders, want both: %v", len(orders), orders)
		}
	})

	t.Run("status dns and dns-lookup", func(t *testing.T) {
		out := d3.MustCtl("status", "dns")
		st := mustStatus(t, d1)
		want := fmt.Sprintf("%-12v %-15v %12.12v %v", "web1", "10.32.0.1", "c1", st.Router.Name)
		if !strings.Contains(out, want+"\n") {
			t.Errorf("status dns on h3:\n%s\nwant the line %q", out, want)
		}
		if n := strings.Count(out, "\n"); n != 5 {
			t.Errorf("status dns: %d lines, want 5 (web1-3, shared twice):\n%s", n, out)
		}
		if got := d3.MustCtl("dns-lookup", "shared"); got != "10.32.0.11\n10.32.0.12\n" {
			t.Errorf("dns-lookup shared: %q", got)
		}
		if _, errOut, code := d3.Ctl("dns-lookup", "nobody"); code != 1 || !strings.Contains(errOut, "nobody.weave.local.: no such name") {
			t.Errorf("dns-lookup nobody: exit %d, %q", code, errOut)
		}
		if _, errOut, code := d3.Ctl("dns-add", "10.32.0.9", "web.example.com"); code != 1 ||
			!strings.Contains(errOut, "Ignoring registration web.example.com. 10.32.0.9 weave:extern (not a subdomain of weave.local.)") {
			t.Errorf("dns-add outside the domain: exit %d, %q", code, errOut)
		}
		if _, errOut, code := d3.Ctl("dns-add", "10.32.0.9", "bad_na me"); code != 1 || errOut == "" {
			t.Errorf("dns-add of a name with a space: exit %d, %q", code, errOut)
		}
		s := d1.MustCtl("status")
		for _, line := range []string{"Service: dns", "Domain: weave.local.", "Upstream: " + h4.Addr.String(), "TTL: 1", "Entries: 5"} {
			if !strings.Contains(s, line) {
				t.Errorf("status lacks %q:\n%s", line, s)
			}
		}
		if got := d2.MustCtl("dns-args"); got != "--dns="+h2.Addr.String()+" --dns-search=weave.local." {
			t.Errorf("dns-args on h2: %q", got)
		}
	})

	t.Run("upstream", func(t *testing.T) {
		if a := ask(h1, "www.upstream.test"); !slices.Equal(a.addrs, []string{"10.99.0.1"}) {
			t.Errorf("forwarded A: %s", a.raw)
		}
		if a := ask(h1, "upstream.test", "MX"); !strings.Contains(a.raw, "mail.upstream.test.") {
			t.Errorf("forwarded MX: %s", a.raw)
		}
		if a := ask(h1, "-x", "10.99.0.1"); !slices.Equal(a.ptrs, []string{"one.upstream.test."}) {
			t.Errorf("PTR of an address not ours goes upstream: %s", a.raw)
		}
		if a := ask(h1, "+tcp", "www.upstream.test"); !slices.Equal(a.addrs, []string{"10.99.0.1"}) {
			t.Errorf("forwarded over TCP: %s", a.raw)
		}
		// resolv.conf is read again when it changes; with no server
		// left, SERVFAIL.
		if err := os.WriteFile(resolv, []byte("# nothing\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		wait(h1, 5*time.Second, "SERVFAIL", "www.upstream.test")
		if err := os.WriteFile(resolv, fmt.Appendf(nil, "nameserver %v\n", h4.Addr), 0o644); err != nil {
			t.Fatal(err)
		}
		wait(h1, 5*time.Second, "10.99.0.1", "www.upstream.test")
	})

	t.Run("50 A records", func(t *testing.T) {
		var addrs []string
		for i := range 50 {
			addrs = append(addrs, fmt.Sprintf("10.32.1.%d", i+1))
		}
		d1.MustCtl(append(append([]string{"dns-add"}, addrs...), "big")...)
		slices.Sort(addrs)
		wait(h3, 2*time.Second, strings.Join(addrs, " "), "+tcp", "big.weave.local")
		for _, args := range [][]string{{"+noedns"}, {"+bufsize=700"}} {
			a := ask(h3, append(args, "+ignore", "big.weave.local")...)
			if !slices.Contains(a.flags, "tc") || len(a.addrs) == 0 || len(a.addrs) >= 50 {
				t.Errorf("UDP %v: want TC and some records:\n%s", args, a.raw)
			}
			t.Logf("UDP %v: %d of 50 records, flags %v", args, len(a.addrs), a.flags)
		}
		if a := ask(h3, "+bufsize=4096", "big.weave.local"); len(a.addrs) != 50 || slices.Contains(a.flags, "tc") {
			t.Errorf("UDP with EDNS 4096: want all 50 without TC:\n%s", a.raw)
		}
	})

	t.Run("dns-remove is seen everywhere within 5s", func(t *testing.T) {
		d2.MustCtl("dns-remove", "web2")
		for _, h := range hosts {
			took := wait(h, 5*time.Second, "NXDOMAIN", "web2.weave.local")
			t.Logf("web2 removed on h2, gone on %s after %v", h.NS, took.Round(time.Millisecond))
		}
		d1.MustCtl("dns-remove", "10.32.0.11")
		wait(h3, 5*time.Second, "10.32.0.12", "shared.weave.local")
	})

	t.Run("an IPAM release removes the names of the address", func(t *testing.T) {
		p := strings.TrimSpace(d1.MustCtl("alloc", "c9"))
		a := strings.Split(p, "/")[0]
		d1.MustCtl("dns-add", a, "web9", "--container", "c9")
		d1.MustCtl("dns-add", a, "alias9") // another container ID: weave:extern
		wait(h2, 2*time.Second, a, "web9.weave.local")
		wait(h2, 2*time.Second, a, "alias9.weave.local")
		d1.MustCtl("release", "c9")
		wait(h2, 5*time.Second, "NXDOMAIN", "web9.weave.local")
		wait(h2, 5*time.Second, "NXDOMAIN", "alias9.weave.local")
	})

	t.Run("a stopped peer's names go and come back with it", func(t *testing.T) {
		if code, _, err := d3.Stop(5 * time.Second); err != nil || code != 0 {
			t.Fatalf("stopping h3: exit %d, %v", code, err)
		}
		stopped := time.Now()
		for _, h := range []*lab.Host{h1, h2} {
			wait(h, 5*time.Second-time.Since(stopped), "NXDOMAIN", "web3.weave.local")
			t.Logf("h3 stopped, web3 gone on %s after %v", h.NS, time.Since(stopped).Round(time.Millisecond))
		}
		d3 = start(h3, "--peer", h1.Addr.String())
		for _, h := range hosts {
			took := wait(h, 10*time.Second, "10.32.0.3", "web3.weave.local")
			t.Logf("h3 restarted, web3 back on %s after %v", h.NS, took.Round(time.Millisecond))
		}
	})
}

// TestDNSHide: hiding an address from IPAM removes its names.
func TestDNSHide(t *testing.T) {
	l := lab.New(t, bin, 1)
	h := l.Host(1)
	d := h.Start("--range", "10.32.0.0/12")
	p := strings.TrimSpace(d.MustCtl("expose"))
	a := strings.Split(p, "/")[0]
	d.MustCtl("dns-add", a, "host1")
	if got := d.MustCtl("dns-lookup", "host1"); got != a+"\n" {
		t.Fatalf("dns-lookup host1 right after dns-add: %q", got)
	}
	if got := d.MustCtl("dns-args"); got != "--dns="+a+" --dns-search=weave.local." {
		t.Errorf("dns-args with an exposed address: %q", got)
	}
	d.MustCtl("hide", p)
	if _, errOut, code := d.Ctl("dns-lookup", "host1"); code != 1 || !strings.Contains(errOut, "no such name") {
		t.Errorf("after hide: exit %d, %q", code, errOut)
	}
	if _, errOut, code := d.Ctl("dns-lookup", "x.example.com"); code != 1 || !strings.Contains(errOut, "x.example.com. is not below weave.local.") {
		t.Errorf("dns-lookup outside the domain: exit %d, %q", code, errOut)
	}
}

// TestDNSOff checks --no-dns: no server, dns-args prints nothing, the DNS
// calls say DNS is off.
func TestDNSOff(t *testing.T) {
	l := lab.New(t, bin, 1)
	d := l.Host(1).Start("--no-dns")
	if out := d.MustCtl("dns-args"); out != "" {
		t.Errorf("dns-args with --no-dns: %q, want nothing", out)
	}
	if _, errOut, code := d.Ctl("dns-add", "10.32.0.1", "web1"); code != 1 || !strings.Contains(errOut, "DNS is off") {
		t.Errorf("dns-add with --no-dns: exit %d, %q", code, errOut)
	}
	if s := d.MustCtl("status"); strings.Contains(s, "Service: dns") {
		t.Errorf("status shows a DNS section with --no-dns:\n%s", s)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if out, err := l.Host(1).Exec(ctx, "dig", "@127.0.0.1", "+time=1", "+tries=1", "web1.weave.local"); err == nil || strings.Contains(out, "status:") {
		t.Errorf("something answers DNS with --no-dns:\n%s", out)
	}
}

// TestDNSNotOpen: overlayd's DNS server, on every address by default (no
// docker0 here), answers its own host but not a host outside the overlay:
// over UDP it says nothing (an answer to a forged source would aim
// traffic at someone else), over TCP REFUSED; both are counted. With that
// host's subnet in --dns-allow, it is answered too. Answers over UDP are
// never longer than 1232 bytes, whatever size the query offers, and
// beyond --dns-rate-limit a client is answered only over TCP.
func TestDNSNotOpen(t *testing.T) {
	l := lab.New(t, bin, 2)
	h1, h2 := l.Host(1), l.Host(2)
	resolv := filepath.Join(l.Dir(), "resolv-empty.conf")
	if err := os.WriteFile(resolv, []byte("# no upstream\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d1 := h1.Start("--range", testRange, "--resolv-conf", resolv)
	add := []string{"dns-add"}
	for i := range 200 { // an answer far larger than 1232 bytes
		add = append(add, fmt.Sprintf("10.40.%d.%d", i/250, 1+i%250))
	}
	d1.MustCtl(append(add, "many")...)
	server := h1.Addr.String()
	ctx := t.Context()
	query := func(h *lab.Host, args ...string) (string, error) {
		return h.Exec(ctx, "dig", append([]string{"@" + server, "+time=1", "+tries=1", "many.weave.local"}, args...)...)
	}
	// Over UDP, offering 4096 bytes: cut (TC) to at most 1232.
	out, err := query(h1, "+bufsize=4096", "+ignore")
	if err != nil || !strings.Contains(out, "status: NOERROR") || !digFlags.MatchString(out) || !strings.Contains(digFlags.FindString(out), " tc") {
		t.Errorf("h1 asking its own server over UDP: %v\n%s", err, out)
	}
	if m := regexp.MustCompile(`MSG SIZE\s+rcvd: (\d+)`).FindStringSubmatch(out); m == nil {
		t.Errorf("no size in dig's output:\n%s", out)
	} else if n, _ := strconv.Atoi(m[1]); n > 1232 || n < 512 {
		t.Errorf("a UDP answer of %d bytes to a 4096-byte offer, want 512 to 1232", n)
	}
	if out, err := query(h1, "+tcp", "+short"); err != nil || len(strings.Fields(out)) != 200 {
		t.Errorf("h1 over TCP: %v, %d addresses", err, len(strings.Fields(out)))
	}
	if out, err := query(h2); err == nil || strings.Contains(out, "status:") {
		t.Errorf("h2, outside the overlay, was answered over UDP:\n%s", out)
	}
	if out, _ := query(h2, "+tcp"); !strings.Contains(out, "status: REFUSED") || strings.Contains(out, "10.40.") {
		t.Errorf("h2 over TCP: want REFUSED and no address:\n%s", out)
	}
	if dns := mustStatus(t, d1).DNS; dns.Refused != 2 {
		t.Errorf("the server counted %d refused queries, want 2", dns.Refused)
	}

	d1.Stop(5 * time.Second)
	d1 = h1.Start("--range", testRange, "--resolv-conf", resolv, "--dns-allow", netip.PrefixFrom(h2.Addr, 24).Masked().String(),
		"--dns-rate-limit", "10")
	lab.Eventually(t, 5*time.Second, "h2 answered with --dns-allow", func() error {
		out, err := query(h2, "+tcp", "+short")
		if err != nil || len(strings.Fields(out)) != 200 {
			return fmt.Errorf("%v: %q", err, out)
		}
		return nil
	})

	// 40 queries at once over UDP from h2, at 10 a second (20 at once):
	// about 20 answered, half the rest an empty answer with TC, the other
	// half none; over TCP h2 is still answered.
	d1.MustCtl("dns-add", "10.40.9.1", "one")
	out, _ = h2.Exec(ctx, "sh", "-c", `for i in $(seq 40); do dig @`+server+` +time=2 +tries=1 +ignore one.weave.local & done; wait`)
	answered := strings.Count(out, "ANSWER: 1,")
	slipped := regexp.MustCompile(`;; flags: qr tc[a-z ]*; QUERY: 1, ANSWER: 0`).FindAllString(out, -1)
	silent := strings.Count(out, "timed out")
	if answered < 20 || answered > 26 || len(slipped) < 5 || silent < 5 || answered+len(slipped)+silent != 40 {
		t.Errorf("40 queries at once at --dns-rate-limit 10: %d answered, %d empty with TC, %d not answered\n%s",
			answered, len(slipped), silent, out)
	}
	t.Logf("40 queries at once at --dns-rate-limit 10: %d answered, %d empty with TC, %d not answered", answered, len(slipped), silent)
	if dns := mustStatus(t, d1).DNS; dns.RateLimited != uint64(len(slipped)+silent) {
		t.Errorf("the server counted %d queries beyond the rate, want %d", dns.RateLimited, len(slipped)+silent)
	}
	if out, err := query(h2, "+tcp", "+short"); err != nil || len(strings.Fields(out)) != 200 {
		t.Errorf("h2 over TCP beyond its UDP rate: %v: %q", err, out)
	}
}
