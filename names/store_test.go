package names_test

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"maps"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/overlayd/overlayd/names"
	"github.com/overlayd/overlayd/proto"
)

const (
	self  = proto.PeerName(0x12d2fe7ac1f2)
	peerA = proto.PeerName(0xaeafa6361837)
	peerB = proto.PeerName(0xe6b190cdda76)
	peerC = proto.PeerName(0x7e214a702f45)
	// probe asks stores for their entries (see held); no store has it.
	probe = proto.PeerName(0x0000000000ff)
)

func newStore(t testing.TB, name proto.PeerName, state []byte, edit ...func(*names.Config)) *names.Store {
	t.Helper()
	// The merge rules are tested with entries from any peer; the rule
	// that takes them only from their origin, in TestFromOriginOnly.
	cfg := names.Config{Self: name, Rand: rand.New(rand.NewPCG(1, uint64(name))), TrustRelays: true}
	for _, f := range edit {
		f(&cfg)
	}
	s, err := names.New(cfg, state)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func ip(s string) netip.Addr { return netip.MustParseAddr(s) }

// entry makes an entry; age is in seconds.
func entry(host, addr, id string, origin proto.PeerName, version uint32, tomb bool, age uint32) proto.NameEntry {
	return proto.NameEntry{Hostname: host, Addr: ip(addr), ContainerID: id, Origin: origin,
		Version: version, Tombstone: tomb, AgeMillis: age * 1000}
}

// sent is a message of a store, decoded.
type sent struct {
	To   proto.PeerName
	Msg  proto.NamesMsg
	Size int
}

// drain decodes the messages in Ready and acknowledges it.
func drain(t testing.TB, s *names.Store) []sent {
	t.Helper()
	rd := s.Ready()
	var out []sent
	for _, m := range rd.Msgs {
		pm, err := proto.ParseNamesMsg(m.Payload)
		if err != nil {
			t.Fatalf("store sent a message it cannot parse: %v", err)
		}
		out = append(out, sent{To: m.To, Msg: pm, Size: len(m.Payload)})
	}
	s.Advance()
	return out
}

func entriesOf(ms []sent) []proto.NameEntry {
	var es []proto.NameEntry
	for _, m := range ms {
		if m.Msg.Kind == proto.NamesEntries {
			es = append(es, m.Msg.Entries...)
		}
	}
	return es
}

func mustAdd(t testing.TB, s *names.Store, host string, addr string, id string) proto.NameEntry {
	t.Helper()
	e, err := s.Add(host, ip(addr), id)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func mustStep(t testing.TB, s *names.Store, from proto.PeerName, es ...proto.NameEntry) {
	t.Helper()
	if err := s.Step(from, &proto.NamesMsg{Kind: proto.NamesEntries, Entries: es}); err != nil {
		t.Fatal(err)
	}
}

// held is every entry a store holds of itself and its reachable peers, as
// it would send them: its answer to a digest that lists nothing. The store
// must have no messages pending.
func held(t testing.TB, s *names.Store) []proto.NameEntry {
	t.Helper()
	if n := len(s.Ready().Msgs); n != 0 {
		t.Fatalf("held: %d messages pending", n)
	}
	if err := s.Step(probe, &proto.NamesMsg{Kind: proto.NamesDigest}); err != nil {
		t.Fatal(err)
	}
	ms := drain(t, s)
	for _, m := range ms {
		if m.To != probe || m.Msg.Kind != proto.NamesEntries {
			t.Fatalf("held: unexpected message %+v", m)
		}
	}
	return sortEntries(entriesOf(ms))
}

// sortEntries sorts like View.Entries: hostname case-insensitively, then
// origin, container ID and address.
func sortEntries(es []proto.NameEntry) []proto.NameEntry {
	es = slices.Clone(es)
	slices.SortFunc(es, func(a, b proto.NameEntry) int {
		return cmp.Or(strings.Compare(strings.ToLower(a.Hostname), strings.ToLower(b.Hostname)),
			cmp.Compare(a.Origin, b.Origin), strings.Compare(a.ContainerID, b.ContainerID), a.Addr.Compare(b.Addr))
	})
	return es
}

func live(es []proto.NameEntry) []proto.NameEntry {
	return slices.DeleteFunc(slices.Clone(es), func(e proto.NameEntry) bool { return e.Tombstone })
}

func fmtEntries(es []proto.NameEntry) string {
	var b strings.Builder
	for _, e := range es {
		fmt.Fprintf(&b, "\n\t%s %v %s %v v%d", e.Hostname, e.Addr, e.ContainerID, e.Origin, e.Version)
		if e.Tombstone {
			fmt.Fprintf(&b, " tombstone age %d ms", e.AgeMillis)
		}
	}
	if len(es) == 0 {
		b.WriteString(" none")
	}
	return b.String()
}

func checkEntries(t testing.TB, what string, got, want []proto.NameEntry) {
	t.Helper()
	if len(got) == 0 && len(want) == 0 {
		return
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%s:\ngot%s\nwant%s", what, fmtEntries(got), fmtEntries(want))
	}
}

// checkView checks the lookups of v against the live entries in want,
// computed from scratch.
func checkView(t testing.TB, v *names.View, want []proto.NameEntry) {
	t.Helper()
	want = live(sortEntries(want))
	checkEntries(t, "live entries of the view", live(v.Entries()), want)
	byName := map[string][]netip.Addr{}
	byAddr := map[netip.Addr]string{}
	for _, e := range want {
		n := strings.ToLower(e.Hostname)
		if !slices.Contains(byName[n], e.Addr) {
			byName[n] = append(byName[n], e.Addr)
		}
		if _, ok := byAddr[e.Addr]; !ok {
			byAddr[e.Addr] = e.Hostname
		}
	}
	for n, as := range byName {
		for _, q := range []string{n, strings.ToUpper(n)} {
			if got := v.Lookup(q); !reflect.DeepEqual(got, as) {
				t.Fatalf("Lookup(%s) = %v, want %v", q, got, as)
			}
		}
	}
	for _, e := range v.Entries() {
		if _, ok := byName[strings.ToLower(e.Hostname)]; !ok {
			if got := v.Lookup(e.Hostname); got != nil {
				t.Fatalf("Lookup(%s) = %v for a name without live entries", e.Hostname, got)
			}
		}
		if _, ok := byAddr[e.Addr]; !ok {
			if h, ok := v.Reverse(e.Addr); ok {
				t.Fatalf("Reverse(%v) = %s for an address without live entries", e.Addr, h)
			}
		}
	}
	for a, h := range byAddr {
		if got, ok := v.Reverse(a); !ok || got != h {
			t.Fatalf("Reverse(%v) = %q, %v, want %q", a, got, ok, h)
		}
	}
	if all, _ := v.Live(); all != len(want) {
		t.Fatalf("Live() = %d, want %d", all, len(want))
	}
}

// settle delivers messages between stores until none is sent: a message to
// zero goes to every other store, one to a peer without a store is lost.
func settle(t testing.TB, stores map[proto.PeerName]*names.Store) {
	t.Helper()
	for round := 0; ; round++ {
		if round == 100 {
			t.Fatal("stores still talking after 100 rounds")
		}
		quiet := true
		for _, from := range slices.Sorted(maps.Keys(stores)) {
			for _, m := range drain(t, stores[from]) {
				quiet = false
				for to, s := range stores {
					if to != from && (m.To == 0 || m.To == to) {
						if err := s.Step(from, &m.Msg); err != nil {
							t.Fatalf("%v -> %v: %v", from, to, err)
						}
					}
				}
			}
		}
		if quiet {
			return
		}
	}
}

// longName is a name of n bytes below weave.local., in labels of 63 bytes.
func longName(n int) string {
	p := []byte(strings.Repeat("a", n-len(".weave.local.")))
	for i := 63; i < len(p); i += 64 {
		p[i] = '.'
	}
	return string(p) + ".weave.local."
}

func TestConfig(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, tc := range []struct {
		name   string
		cfg    names.Config
		domain string // "" if New fails
	}{
		{"defaults", names.Config{Self: self, Rand: r}, "weave.local."},
		{"domain lower-cased, dot added", names.Config{Self: self, Rand: r, Domain: "Example.COM"}, "example.com."},
		{"root domain", names.Config{Self: self, Rand: r, Domain: "."}, ""},
		{"bad domain", names.Config{Self: self, Rand: r, Domain: "a..b"}, ""},
		{"no name", names.Config{Rand: r}, ""},
		{"no random source", names.Config{Self: self}, ""},
		{"tiny messages", names.Config{Self: self, Rand: r, MaxMsgBytes: 1000}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := names.New(tc.cfg, nil)
			if tc.domain == "" {
				if err == nil {
					t.Fatal("New accepted the config")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s.Domain() != tc.domain || s.View().Domain() != tc.domain {
				t.Errorf("domain %q, view's %q, want %q", s.Domain(), s.View().Domain(), tc.domain)
			}
		})
	}
}

func TestAdd(t *testing.T) {
	for _, tc := range []struct {
		name, host, id string
		wantHost       string
		wantID         string
	}{
		{"single label gets the domain", "web", "c1", "web.weave.local.", "c1"},
		{"trailing dot added", "db.weave.local", "c1", "db.weave.local.", "c1"},
		{"fqdn", "db.weave.local.", "c1", "db.weave.local.", "c1"},
		{"sub-domain", "a.b.weave.local", "c1", "a.b.weave.local.", "c1"},
		{"case preserved", "Web.Weave.LOCAL", "c1", "Web.Weave.LOCAL.", "c1"},
		{"single label case preserved", "WEB", "c1", "WEB.weave.local.", "c1"},
		{"no container", "x", "", "x.weave.local.", names.ExternID},
		{"hyphens, underscores, digits", "_s-1.a9.weave.local", "weave:expose", "_s-1.a9.weave.local.", "weave:expose"},
		{"63-byte label", strings.Repeat("a", 63), "c1", strings.Repeat("a", 63) + ".weave.local.", "c1"},
		{"254-byte name", longName(254), "c1", longName(254), "c1"},
		{"255-byte container ID", "x", strings.Repeat("c", 255), "x.weave.local.", strings.Repeat("c", 255)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t, self, nil)
			a := ip("10.32.0.1")
			e, err := s.Add(tc.host, a, tc.id)
			if err != nil {
				t.Fatal(err)
			}
			want := proto.NameEntry{Hostname: tc.wantHost, Addr: a, ContainerID: tc.wantID, Origin: self}
			if e != want {
				t.Fatalf("Add returned %+v, want %+v", e, want)
			}
			rd := s.Ready()
			if rd.View == nil || rd.State == nil {
				t.Fatalf("Ready has no view or no state: %+v", rd)
			}
			saved, err := names.DecodeState(rd.State)
			if err != nil {
				t.Fatal(err)
			}
			checkEntries(t, "saved state", saved, []proto.NameEntry{want})
			ms := drain(t, s)
			if len(ms) != 1 || ms[0].To != 0 {
				t.Fatalf("messages %+v, want one broadcast", ms)
			}
			checkEntries(t, "broadcast", entriesOf(ms), []proto.NameEntry{want})
			checkView(t, s.View(), []proto.NameEntry{want})
			for _, q := range []string{tc.wantHost, strings.ToLower(tc.wantHost), strings.ToUpper(tc.wantHost)} {
				if got := s.View().Lookup(q); !slices.Equal(got, []netip.Addr{a}) {
					t.Errorf("Lookup(%s) = %v", q, got)
				}
			}
			if h, ok := s.View().Reverse(a); !ok || h != tc.wantHost {
				t.Errorf("Reverse = %q, %v", h, ok)
			}
			if all, local := s.View().Live(); all != 1 || local != 1 {
				t.Errorf("Live() = %d, %d", all, local)
			}
		})
	}
}

func TestAddRejects(t *testing.T) {
	for _, tc := range []struct {
		name, host, addr, id string
		domainErr            string // the DomainError's text, if that is the error
	}{
		{"outside the domain", "x.example.com", "10.0.0.1", "c1",
			"Ignoring registration x.example.com. 10.0.0.1 c1 (not a subdomain of weave.local.)"},
		{"outside, with a dot", "x.example.com.", "10.0.0.1", "c1",
			"Ignoring registration x.example.com. 10.0.0.1 c1 (not a subdomain of weave.local.)"},
		{"outside, no container", "a.b", "10.0.0.2", "",
			"Ignoring registration a.b. 10.0.0.2 weave:extern (not a subdomain of weave.local.)"},
		{"the domain itself", "weave.local", "10.0.0.1", "c1",
			"Ignoring registration weave.local. 10.0.0.1 c1 (not a subdomain of weave.local.)"},
		{"the domain, other case", "WEAVE.LOCAL.", "10.0.0.1", "c1",
			"Ignoring registration WEAVE.LOCAL. 10.0.0.1 c1 (not a subdomain of weave.local.)"},
		{"suffix not at a label", "xweave.local", "10.0.0.1", "c1",
			"Ignoring registration xweave.local. 10.0.0.1 c1 (not a subdomain of weave.local.)"},
		{"empty hostname", "", "10.0.0.1", "c1", ""},
		{"a dot", ".", "10.0.0.1", "c1", ""},
		{"space", "a b", "10.0.0.1", "c1", ""},
		{"slash", "a/b.weave.local.", "10.0.0.1", "c1", ""},
		{"star", "*.weave.local.", "10.0.0.1", "c1", ""},
		{"non-ASCII", "wéb", "10.0.0.1", "c1", ""},
		{"NUL", "w\x00b", "10.0.0.1", "c1", ""},
		{"empty label", "a..weave.local.", "10.0.0.1", "c1", ""},
		{"leading dot", ".weave.local", "10.0.0.1", "c1", ""},
		{"two trailing dots", "a.weave.local..", "10.0.0.1", "c1", ""},
		{"64-byte label", strings.Repeat("a", 64), "10.0.0.1", "c1", ""},
		{"255-byte name", longName(255), "10.0.0.1", "c1", ""},
		{"container with a space", "web", "10.0.0.1", "c 1", ""},
		{"container with a control byte", "web", "10.0.0.1", "c\n", ""},
		{"container with DEL", "web", "10.0.0.1", "c\x7f", ""},
		{"non-ASCII container", "web", "10.0.0.1", "cé", ""},
		{"256-byte container", "web", "10.0.0.1", strings.Repeat("c", 256), ""},
		{"IPv6", "web", "fd00::1", "c1", ""},
		{"IPv4-mapped IPv6", "web", "::ffff:10.0.0.1", "c1", ""},
		{"no address", "web", "", "c1", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t, self, nil)
			var a netip.Addr
			if tc.addr != "" {
				a = ip(tc.addr)
			}
			e, err := s.Add(tc.host, a, tc.id)
			if err == nil {
				t.Fatalf("Add accepted %+v", e)
			}
			var de *names.DomainError
			if errors.As(err, &de) != (tc.domainErr != "") {
				t.Fatalf("error %v (%T)", err, err)
			}
			if tc.domainErr != "" && err.Error() != tc.domainErr {
				t.Fatalf("error text\n%s\nwant\n%s", err, tc.domainErr)
			}
			if rd := s.Ready(); !rd.Empty() {
				t.Fatalf("refused Add left work: %+v", rd)
			}
			if es := s.View().Entries(); len(es) != 0 {
				t.Fatalf("refused Add stored %v", es)
			}
		})
	}
}

func TestAddAgain(t *testing.T) {
	t.Run("idempotent", func(t *testing.T) {
		s := newStore(t, self, nil)
		first := mustAdd(t, s, "web", "10.0.0.1", "c1")
		drain(t, s)
		again := mustAdd(t, s, "web.weave.local.", "10.0.0.1", "c1")
		if again != first {
			t.Fatalf("second Add returned %+v, want %+v", again, first)
		}
		if rd := s.Ready(); !rd.Empty() {
			t.Fatalf("second Add made work: %+v", rd)
		}
		checkEntries(t, "held", held(t, s), []proto.NameEntry{first})
	})
	t.Run("other case replaces", func(t *testing.T) {
		s := newStore(t, self, nil)
		mustAdd(t, s, "web", "10.0.0.1", "c1")
		drain(t, s)
		e := mustAdd(t, s, "WEB", "10.0.0.1", "c1")
		want := entry("WEB.weave.local.", "10.0.0.1", "c1", self, 1, false, 0)
		if e != want {
			t.Fatalf("got %+v, want %+v", e, want)
		}
		checkEntries(t, "broadcast", entriesOf(drain(t, s)), []proto.NameEntry{want})
		checkEntries(t, "held", held(t, s), []proto.NameEntry{want})
		checkView(t, s.View(), []proto.NameEntry{want})
	})
	t.Run("resurrect", func(t *testing.T) {
		s := newStore(t, self, nil)
		mustAdd(t, s, "web", "10.0.0.1", "c1")
		if _, err := s.Delete("web", netip.Addr{}, ""); err != nil {
			t.Fatal(err)
		}
		drain(t, s)
		checkView(t, s.View(), nil)
		e := mustAdd(t, s, "web", "10.0.0.1", "c1")
		want := entry("web.weave.local.", "10.0.0.1", "c1", self, 2, false, 0)
		if e != want {
			t.Fatalf("got %+v, want %+v", e, want)
		}
		rd := s.Ready()
		if rd.State == nil || rd.View == nil {
			t.Fatal("resurrection changed neither state nor view")
		}
		checkEntries(t, "broadcast", entriesOf(drain(t, s)), []proto.NameEntry{want})
		checkEntries(t, "held", held(t, s), []proto.NameEntry{want})
		checkView(t, s.View(), []proto.NameEntry{want})
	})
	t.Run("same name, other address or container", func(t *testing.T) {
		s := newStore(t, self, nil)
		a := mustAdd(t, s, "web", "10.0.0.1", "c1")
		b := mustAdd(t, s, "web", "10.0.0.2", "c1")
		c := mustAdd(t, s, "web", "10.0.0.1", "c2")
		drain(t, s)
		want := []proto.NameEntry{a, b, c} // by container ID, then address
		checkEntries(t, "held", held(t, s), want)
		checkView(t, s.View(), want)
		if got := s.View().Lookup("web.weave.local."); !slices.Equal(got, []netip.Addr{ip("10.0.0.1"), ip("10.0.0.2")}) {
			t.Errorf("Lookup = %v", got)
		}
	})
}

func TestDelete(t *testing.T) {
	remote := entry("web.weave.local.", "10.0.0.9", "ca", peerA, 0, false, 0)
	setup := func(t *testing.T) *names.Store {
		s := newStore(t, self, nil)
		s.SetReachable([]proto.PeerName{peerA})
		mustAdd(t, s, "web", "10.0.0.1", "c1")
		mustAdd(t, s, "web", "10.0.0.2", "c2")
		mustAdd(t, s, "db", "10.0.0.1", "c1")
		mustAdd(t, s, "db", "10.0.0.3", "c3")
		if _, err := s.Delete("db", ip("10.0.0.3"), "c3"); err != nil {
			t.Fatal(err)
		}
		mustStep(t, s, peerA, remote)
		drain(t, s)
		return s
	}
	var (
		web1 = entry("web.weave.local.", "10.0.0.1", "c1", self, 0, false, 0)
		web2 = entry("web.weave.local.", "10.0.0.2", "c2", self, 0, false, 0)
		db1  = entry("db.weave.local.", "10.0.0.1", "c1", self, 0, false, 0)
		db3  = entry("db.weave.local.", "10.0.0.3", "c3", self, 1, true, 0)
	)
	for _, tc := range []struct {
		name     string
		host     string
		addr     string
		id       string
		deleted  []proto.NameEntry // as they were
		errIsOut bool
	}{
		{"by name", "web", "", "", []proto.NameEntry{web1, web2}, false},
		{"by fqdn in other case", "WEB.Weave.Local.", "", "", []proto.NameEntry{web1, web2}, false},
		{"by address", "", "10.0.0.1", "", []proto.NameEntry{db1, web1}, false},
		{"by container", "", "", "c1", []proto.NameEntry{db1, web1}, false},
		{"by name and container", "web", "", "c2", []proto.NameEntry{web2}, false},
		{"by name and address", "web", "10.0.0.1", "", []proto.NameEntry{web1}, false},
		{"everything", "", "", "", []proto.NameEntry{db1, web1, web2}, false},
		{"a tombstone again", "db", "10.0.0.3", "", nil, false},
		{"only a remote entry", "", "10.0.0.9", "", nil, false},
		{"remote container", "", "", "ca", nil, false},
		{"nothing matches", "nope", "", "", nil, false},
		{"outside the domain", "x.example.com", "", "", nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := setup(t)
			var a netip.Addr
			if tc.addr != "" {
				a = ip(tc.addr)
			}
			got, err := s.Delete(tc.host, a, tc.id)
			if tc.errIsOut {
				if !errors.Is(err, names.ErrOutside) {
					t.Fatalf("error %v, want ErrOutside", err)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			var want []proto.NameEntry
			for _, e := range tc.deleted {
				e.Version++
				e.Tombstone = true
				want = append(want, e)
			}
			checkEntries(t, "deleted", got, want)
			ms := drain(t, s)
			if len(want) == 0 {
				if len(ms) != 0 {
					t.Fatalf("sent %+v", ms)
				}
			} else if len(ms) != 1 || ms[0].To != 0 {
				t.Fatalf("messages %+v, want one broadcast", ms)
			}
			checkEntries(t, "broadcast", entriesOf(ms), want)
			all := map[string]proto.NameEntry{}
			for _, e := range []proto.NameEntry{web1, web2, db1, db3, remote} {
				all[fmt.Sprint(e.Hostname, e.Addr, e.ContainerID)] = e
			}
			for _, e := range want {
				all[fmt.Sprint(e.Hostname, e.Addr, e.ContainerID)] = e
			}
			wantHeld := sortEntries(slices.Collect(maps.Values(all)))
			checkEntries(t, "held", held(t, s), wantHeld)
			checkView(t, s.View(), wantHeld)
		})
	}
}

func TestMergeRules(t *testing.T) {
	for _, tc := range []struct {
		name string
		a, b proto.NameEntry
		want proto.NameEntry
	}{
		{"higher version wins over a tombstone",
			entry("web.weave.local.", "10.0.0.1", "c1", peerA, 2, false, 0),
			entry("web.weave.local.", "10.0.0.1", "c1", peerA, 1, true, 0),
			entry("web.weave.local.", "10.0.0.1", "c1", peerA, 2, false, 0)},
		{"higher version wins over a live entry",
			entry("web.weave.local.", "10.0.0.1", "c1", peerA, 0, false, 0),
			entry("web.weave.local.", "10.0.0.1", "c1", peerA, 1, true, 3),
			entry("web.weave.local.", "10.0.0.1", "c1", peerA, 1, true, 3)},
		{"higher version wins over greater hostname",
			entry("web.weave.local.", "10.0.0.1", "c1", peerA, 3, false, 0),
			entry("WEB.weave.local.", "10.0.0.1", "c1", peerA, 4, false, 0),
			entry("WEB.weave.local.", "10.0.0.1", "c1", peerA, 4, false, 0)},
		{"equal version: the tombstone wins",
			entry("web.weave.local.", "10.0.0.1", "c1", peerA, 1, false, 0),
			entry("WEB.weave.local.", "10.0.0.1", "c1", peerA, 1, true, 0),
			entry("WEB.weave.local.", "10.0.0.1", "c1", peerA, 1, true, 0)},
		{"equal version, both live: greater hostname bytes",
			entry("Web.weave.local.", "10.0.0.1", "c1", peerA, 1, false, 0),
			entry("web.weave.local.", "10.0.0.1", "c1", peerA, 1, false, 0),
			entry("web.weave.local.", "10.0.0.1", "c1", peerA, 1, false, 0)},
		{"equal version, both tombstones: greater hostname bytes",
			entry("wEB.weave.local.", "10.0.0.1", "c1", peerA, 1, true, 0),
			entry("WEB.weave.local.", "10.0.0.1", "c1", peerA, 1, true, 0),
			entry("wEB.weave.local.", "10.0.0.1", "c1", peerA, 1, true, 0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, order := range [][]proto.NameEntry{{tc.a, tc.b}, {tc.b, tc.a}, {tc.a, tc.b, tc.a}, {tc.b, tc.a, tc.b}} {
				s := newStore(t, self, nil)
				s.SetReachable([]proto.PeerName{peerA})
				for _, e := range order {
					mustStep(t, s, peerA, e)
				}
				if ms := drain(t, s); len(ms) != 0 {
					t.Fatalf("merging a peer's entries sent %+v", ms)
				}
				checkEntries(t, "held", held(t, s), []proto.NameEntry{tc.want})
				checkView(t, s.View(), []proto.NameEntry{tc.want})
			}
			s := newStore(t, self, nil)
			s.SetReachable([]proto.PeerName{peerA})
			mustStep(t, s, peerA, tc.a, tc.b)
			checkEntries(t, "held after one message", held(t, s), []proto.NameEntry{tc.want})
		})
	}
}

// randomEntries makes n entries of the origins, crowded onto few keys. An
// entry's age is a function of its version, tombstone and hostname, so that
// copies of one tombstone agree on it (see TestTombstoneAgeOrder).
func randomEntries(r *rand.Rand, origins []proto.PeerName, n int) []proto.NameEntry {
	hosts := [][]string{{"web", "Web", "WEB", "wEb"}, {"db", "DB", "Db"}, {"a.b", "A.b"}}
	var es []proto.NameEntry
	for range n {
		h := hosts[r.IntN(len(hosts))]
		ci := r.IntN(len(h))
		e := proto.NameEntry{
			Hostname:    h[ci] + ".weave.local.",
			Addr:        netip.AddrFrom4([4]byte{10, 0, 0, byte(1 + r.IntN(2))}),
			ContainerID: []string{"c1", "c2"}[r.IntN(2)],
			Origin:      origins[r.IntN(len(origins))],
			Version:     uint32(r.IntN(4)),
			Tombstone:   r.IntN(3) == 0,
		}
		if e.Tombstone {
			e.AgeMillis = (e.Version*7 + uint32(ci)) * 1000
		}
		es = append(es, e)
	}
	return es
}

// mergeModel is the obvious slow merge: for each key, the greatest entry
// by version, then tombstone, then hostname bytes.
func mergeModel(es []proto.NameEntry) []proto.NameEntry {
	best := map[string]proto.NameEntry{}
	for _, e := range es {
		k := fmt.Sprint(strings.ToLower(e.Hostname), e.Origin, e.ContainerID, e.Addr)
		b, ok := best[k]
		if !ok || e.Version > b.Version || e.Version == b.Version &&
			(e.Tombstone && !b.Tombstone || e.Tombstone == b.Tombstone && e.Hostname > b.Hostname) {
			best[k] = e
		}
	}
	return sortEntries(slices.Collect(maps.Values(best)))
}

// deliver steps es into s in the given order, in messages of one to four
// entries, some of them delivered twice.
func deliver(t testing.TB, r *rand.Rand, s *names.Store, es []proto.NameEntry, order []int) {
	t.Helper()
	var msgs [][]proto.NameEntry
	for len(order) > 0 {
		n := min(1+r.IntN(4), len(order))
		var m []proto.NameEntry
		for _, i := range order[:n] {
			m = append(m, es[i])
		}
		order = order[n:]
		msgs = append(msgs, m)
		if r.IntN(3) == 0 {
			msgs = append(msgs, msgs[r.IntN(len(msgs))])
		}
	}
	for _, m := range msgs {
		from := m[0].Origin
		mustStep(t, s, from, m...)
	}
}

func permutations(n int) [][]int {
	if n == 0 {
		return [][]int{{}}
	}
	var out [][]int
	for _, p := range permutations(n - 1) {
		for i := range n {
			q := slices.Insert(slices.Clone(p), i, n-1)
			out = append(out, q)
		}
	}
	return out
}

func TestMergeCommutes(t *testing.T) {
	origins := []proto.PeerName{peerA, peerB, peerC}
	t.Run("every order", func(t *testing.T) {
		// Five copies of one key (every rule between them) and one other.
		es := []proto.NameEntry{
			entry("web.weave.local.", "10.0.0.1", "c1", peerA, 1, false, 0),
			entry("Web.weave.local.", "10.0.0.1", "c1", peerA, 1, false, 0),
			entry("WEB.weave.local.", "10.0.0.1", "c1", peerA, 1, true, 4),
			entry("web.weave.local.", "10.0.0.1", "c1", peerA, 0, true, 9),
			entry("wEB.weave.local.", "10.0.0.1", "c1", peerA, 2, false, 0),
			entry("web.weave.local.", "10.0.0.1", "c1", peerB, 0, false, 0),
		}
		want := mergeModel(es)
		r := rand.New(rand.NewPCG(3, 4))
		for _, order := range permutations(len(es)) {
			s := newStore(t, self, nil)
			s.SetReachable(origins)
			deliver(t, r, s, es, order)
			if ms := drain(t, s); len(ms) != 0 {
				t.Fatalf("order %v: merging sent %+v", order, ms)
			}
			checkEntries(t, fmt.Sprint("order ", order), held(t, s), want)
			checkView(t, s.View(), want)
		}
	})
	t.Run("random sets", func(t *testing.T) {
		for seed := range uint64(40) {
			r := rand.New(rand.NewPCG(seed, 99))
			es := randomEntries(r, origins, 10+r.IntN(50))
			want := mergeModel(es)
			for p := range 25 {
				s := newStore(t, self, nil)
				s.SetReachable(origins)
				order := r.Perm(len(es))
				deliver(t, r, s, es, order)
				what := fmt.Sprintf("seed %d, permutation %d", seed, p)
				checkEntries(t, what, held(t, s), want)
				checkView(t, s.View(), want)
				// Idempotent: everything again changes nothing.
				deliver(t, r, s, es, r.Perm(len(es)))
				if rd := s.Ready(); rd.View != nil || len(rd.Msgs) != 0 {
					t.Fatalf("%s: delivering again made work: %+v", what, rd)
				}
				checkEntries(t, what+", again", held(t, s), want)
			}
		}
	})
}

// TestEqualStoresAreQuiet: stores that merged the same entries in
// different orders have the same digests, so anti-entropy sends nothing.
func TestEqualStoresAreQuiet(t *testing.T) {
	const peerD = proto.PeerName(0x0a0b0c0d0e0f)
	origins := []proto.PeerName{peerA, peerB, peerC}
	for seed := range uint64(10) {
		r := rand.New(rand.NewPCG(seed, 6))
		es := randomEntries(r, origins, 60)
		x := newStore(t, self, nil, func(c *names.Config) { c.DigestTicks = 1; c.Fanout = 5 })
		y := newStore(t, peerD, nil)
		x.SetReachable(append(slices.Clone(origins), peerD))
		y.SetReachable(append(slices.Clone(origins), self))
		deliver(t, r, x, es, r.Perm(len(es)))
		deliver(t, r, y, es, r.Perm(len(es)))
		drain(t, x)
		drain(t, y)
		// x's periodic summary goes to y, which has the same: quiet.
		x.Tick()
		for _, m := range drain(t, x) {
			if m.To == peerD && m.Msg.Kind == proto.NamesSummary {
				if err := y.Step(self, &m.Msg); err != nil {
					t.Fatal(err)
				}
			}
		}
		if ms := drain(t, y); len(ms) != 0 {
			t.Fatalf("seed %d: an equal store answered a summary with %+v", seed, ms)
		}
		// x's digest, as it answers a summary that differs.
		digestTo := func(to proto.PeerName) *proto.NamesMsg {
			if err := x.Step(to, &proto.NamesMsg{Kind: proto.NamesSummary, Hash: 1}); err != nil {
				t.Fatal(err)
			}
			for _, m := range drain(t, x) {
				if m.To == to && m.Msg.Kind == proto.NamesDigest {
					return &m.Msg
				}
			}
			t.Fatalf("no digest to %v", to)
			return nil
		}
		if err := y.Step(self, digestTo(peerD)); err != nil {
			t.Fatal(err)
		}
		if ms := drain(t, y); len(ms) != 0 {
			t.Fatalf("seed %d: an equal store answered a digest with %+v", seed, ms)
		}
		// Each thing a merge compares, changed at x alone, and y answers.
		base := entry("HASH.weave.local.", "10.0.0.7", "c7", peerA, 0, false, 0)
		mustStep(t, x, peerA, base)
		mustStep(t, y, peerA, base)
		drain(t, x)
		drain(t, y)
		for _, w := range []proto.NameEntry{
			entry("hash.weave.local.", "10.0.0.7", "c7", peerA, 0, false, 0), // hostname bytes
			entry("hash.weave.local.", "10.0.0.7", "c7", peerA, 0, true, 0),  // tombstone
			entry("hash.weave.local.", "10.0.0.7", "c7", peerA, 1, true, 0),  // version
			entry("hash.weave.local.", "10.0.0.8", "c7", peerA, 0, false, 0), // address
			entry("hash.weave.local.", "10.0.0.8", "c8", peerA, 0, false, 0), // container
			entry("hash.weave.local.", "10.0.0.8", "c8", peerB, 0, false, 0), // origin
		} {
			mustStep(t, x, w.Origin, w)
			drain(t, x)
			if err := y.Step(self, digestTo(peerD)); err != nil {
				t.Fatal(err)
			}
			ms := drain(t, y)
			if len(ms) == 0 {
				t.Fatalf("seed %d: a store that lacks %+v did not answer a digest", seed, w)
			}
			for _, m := range ms {
				if err := x.Step(peerD, &m.Msg); err != nil {
					t.Fatal(err)
				}
			}
			settle(t, map[proto.PeerName]*names.Store{self: x, peerD: y})
		}
		// Entries that differ in one field, one at each store.
		for _, pair := range [][2]proto.NameEntry{
			{entry("s0.weave.local.", "10.0.1.1", "c1", peerA, 0, false, 0), entry("s0.weave.local.", "10.0.1.2", "c1", peerA, 0, false, 0)},
			{entry("s1.weave.local.", "10.0.1.1", "c1", peerA, 0, false, 0), entry("s1.weave.local.", "10.0.1.1", "c2", peerA, 0, false, 0)},
			{entry("s2.weave.local.", "10.0.1.1", "c1", peerA, 0, false, 0), entry("s3.weave.local.", "10.0.1.1", "c1", peerA, 0, false, 0)},
		} {
			mustStep(t, x, peerA, pair[0])
			mustStep(t, y, peerA, pair[1])
			drain(t, x)
			drain(t, y)
			if err := y.Step(self, digestTo(peerD)); err != nil {
				t.Fatal(err)
			}
			ms := drain(t, y)
			if len(ms) == 0 {
				t.Fatalf("seed %d: stores holding %+v and %+v have the same digest", seed, pair[0], pair[1])
			}
			for _, m := range ms {
				if err := x.Step(peerD, &m.Msg); err != nil {
					t.Fatal(err)
				}
			}
			settle(t, map[proto.PeerName]*names.Store{self: x, peerD: y})
		}
		ageless := func(es []proto.NameEntry) []proto.NameEntry {
			for i := range es {
				es[i].AgeMillis = 0
			}
			return es
		}
		checkEntries(t, "after anti-entropy", ageless(held(t, y)), ageless(held(t, x)))
	}
}

func TestOwnEntries(t *testing.T) {
	web := entry("web.weave.local.", "10.0.0.1", "c1", self, 0, false, 0)
	db := entry("db.weave.local.", "10.0.0.2", "c2", self, 1, true, 0)
	ghost := entry("ghost.weave.local.", "10.0.0.3", "c3", self, 5, false, 0)
	with := func(e proto.NameEntry, version uint32, tomb bool) proto.NameEntry {
		e.Version, e.Tombstone = version, tomb
		return e
	}
	for _, tc := range []struct {
		name     string
		in       proto.NameEntry
		answer   *proto.NameEntry
		wantHeld proto.NameEntry // what we hold for in's key afterwards
	}{
		{"higher version, live", with(web, 3, false), ptr(with(web, 4, false)), with(web, 4, false)},
		{"higher version, tombstone", with(web, 3, true), ptr(with(web, 4, false)), with(web, 4, false)},
		{"same version, tombstone", with(web, 0, true), ptr(with(web, 1, false)), with(web, 1, false)},
		{"same version, other case", func() proto.NameEntry { e := web; e.Hostname = "WEB.weave.local."; return e }(),
			ptr(with(web, 1, false)), with(web, 1, false)},
		{"same version, live copy of our tombstone", with(db, 1, false), ptr(with(db, 2, true)), with(db, 2, true)},
		{"higher version, live copy of our tombstone", with(db, 7, false), ptr(with(db, 8, true)), with(db, 8, true)},
		{"lower version", with(db, 0, false), nil, db},
		{"the same", web, nil, web},
		{"never made", ghost, ptr(with(ghost, 6, true)), with(ghost, 6, true)},
		{"never made, tombstone", with(ghost, 5, true), nil, with(ghost, 5, true)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t, self, nil)
			s.SetReachable([]proto.PeerName{peerA})
			mustAdd(t, s, "web", "10.0.0.1", "c1")
			mustAdd(t, s, "db", "10.0.0.2", "c2")
			if _, err := s.Delete("db", netip.Addr{}, ""); err != nil {
				t.Fatal(err)
			}
			drain(t, s)
			mustStep(t, s, peerA, tc.in)
			rd := s.Ready()
			ms := drain(t, s)
			corrected := uint64(0)
			if tc.answer == nil {
				if len(ms) != 0 {
					t.Fatalf("answered %+v", ms)
				}
			} else {
				corrected = 1
				if len(ms) != 1 || ms[0].To != 0 {
					t.Fatalf("messages %+v, want one broadcast", ms)
				}
				checkEntries(t, "answer", entriesOf(ms), []proto.NameEntry{*tc.answer})
				saved, err := names.DecodeState(rd.State)
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Contains(saved, *tc.answer) {
					t.Fatalf("saved state lacks the answer:%s", fmtEntries(saved))
				}
			}
			if got := s.Stats().Corrected; got != corrected {
				t.Errorf("Corrected = %d, want %d", got, corrected)
			}
			hs := held(t, s)
			i := slices.IndexFunc(hs, func(e proto.NameEntry) bool {
				return strings.EqualFold(e.Hostname, tc.in.Hostname) && e.Addr == tc.in.Addr
			})
			if i < 0 || hs[i] != tc.wantHeld {
				t.Fatalf("held%s\nwant %+v", fmtEntries(hs), tc.wantHeld)
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

func TestUnknownOrigins(t *testing.T) {
	s := newStore(t, self, nil)
	a := entry("a.weave.local.", "10.0.0.1", "c1", peerA, 0, false, 0)
	c := entry("c.weave.local.", "10.0.0.3", "c3", peerC, 0, false, 0)
	mustStep(t, s, peerA, a, c)
	if got := s.Stats().Unknown; got != 2 {
		t.Errorf("before SetReachable: Unknown = %d, want 2", got)
	}
	s.SetReachable([]proto.PeerName{peerA, peerB})
	mustStep(t, s, peerA, a, c)
	if got := s.Stats().Unknown; got != 3 {
		t.Errorf("Unknown = %d, want 3", got)
	}
	checkEntries(t, "held", held(t, s), []proto.NameEntry{a})
	checkView(t, s.View(), []proto.NameEntry{a})
}

func TestPurge(t *testing.T) {
	a1 := entry("a.weave.local.", "10.0.0.1", "c1", peerA, 0, false, 0)
	a2 := entry("a2.weave.local.", "10.0.0.2", "c1", peerA, 1, true, 0)
	b1 := entry("b.weave.local.", "10.0.0.3", "c3", peerB, 0, false, 0)
	setup := func(t *testing.T) *names.Store {
		s := newStore(t, self, nil, func(c *names.Config) { c.PurgeTicks = 5 })
		s.SetReachable([]proto.PeerName{peerA, peerB})
		mustStep(t, s, peerA, a1, a2)
		mustStep(t, s, peerB, b1)
		mustAdd(t, s, "mine", "10.0.0.9", "c9")
		drain(t, s)
		return s
	}
	mine := entry("mine.weave.local.", "10.0.0.9", "c9", self, 0, false, 0)
	t.Run("gone after PurgeTicks", func(t *testing.T) {
		s := setup(t)
		s.SetReachable([]proto.PeerName{peerB})
		for range 4 {
			s.Tick()
			checkView(t, s.View(), []proto.NameEntry{a1, b1, mine})
		}
		s.Tick()
		checkView(t, s.View(), []proto.NameEntry{b1, mine})
		if got := s.Stats().Purged; got != 2 {
			t.Errorf("Purged = %d, want 2", got)
		}
		drain(t, s)
		checkEntries(t, "held", held(t, s), sortEntries([]proto.NameEntry{b1, mine}))
		// While it is away its entries are unknown.
		mustStep(t, s, peerB, a1)
		if got := s.Stats().Unknown; got != 1 {
			t.Errorf("Unknown = %d", got)
		}
	})
	t.Run("back in time", func(t *testing.T) {
		s := setup(t)
		s.SetReachable([]proto.PeerName{peerB})
		for range 4 {
			s.Tick()
		}
		s.SetReachable([]proto.PeerName{peerA, peerB})
		for range 20 {
			s.Tick()
		}
		checkView(t, s.View(), []proto.NameEntry{a1, b1, mine})
		if got := s.Stats().Purged; got != 0 {
			t.Errorf("Purged = %d", got)
		}
	})
	t.Run("never ourselves", func(t *testing.T) {
		s := setup(t)
		s.SetReachable(nil)
		for range 20 {
			s.Tick()
		}
		checkView(t, s.View(), []proto.NameEntry{mine})
	})
}

// TestPurgedEntriesReturn: entries of a peer that went away come back by
// anti-entropy when it is reachable again.
func TestPurgedEntriesReturn(t *testing.T) {
	fast := func(c *names.Config) { c.PurgeTicks = 3; c.DigestTicks = 5 }
	x := newStore(t, self, nil, fast)
	a := newStore(t, peerA, nil, fast)
	x.SetReachable([]proto.PeerName{peerA})
	a.SetReachable([]proto.PeerName{self})
	stores := map[proto.PeerName]*names.Store{self: x, peerA: a}
	e1 := mustAdd(t, a, "a1", "10.0.0.1", "c1")
	e2 := mustAdd(t, a, "a2", "10.0.0.2", "c2")
	mustAdd(t, a, "a3", "10.0.0.3", "c3")
	dead, err := a.Delete("a3", netip.Addr{}, "")
	if err != nil {
		t.Fatal(err)
	}
	settle(t, stores)
	want := sortEntries([]proto.NameEntry{e1, e2, dead[0]})
	checkEntries(t, "x after broadcasts", held(t, x), want)
	checkView(t, x.View(), want)

	x.SetReachable(nil)
	a.SetReachable(nil)
	for range 3 {
		x.Tick()
		a.Tick()
	}
	checkView(t, x.View(), nil)
	// a changes while apart.
	e4 := mustAdd(t, a, "a4", "10.0.0.4", "c4")
	drain(t, a)

	x.SetReachable([]proto.PeerName{peerA})
	a.SetReachable([]proto.PeerName{self})
	for range 5 {
		x.Tick()
		a.Tick()
	}
	settle(t, stores)
	want = sortEntries(append(want, e4))
	for i := range want {
		if want[i].Tombstone {
			want[i].AgeMillis = 800
		}
	}
	checkEntries(t, "x after anti-entropy", held(t, x), want)
	checkView(t, x.View(), want)
}

func TestTombstoneExpiry(t *testing.T) {
	short := func(c *names.Config) { c.TombstoneTicks = 50; c.DigestTicks = 10 }
	t.Run("ours", func(t *testing.T) {
		s := newStore(t, self, nil, short)
		mustAdd(t, s, "web", "10.0.0.1", "c1")
		mustAdd(t, s, "keep", "10.0.0.2", "c1")
		if _, err := s.Delete("web", netip.Addr{}, ""); err != nil {
			t.Fatal(err)
		}
		drain(t, s)
		keep := entry("keep.weave.local.", "10.0.0.2", "c1", self, 0, false, 0)
		for range 49 {
			s.Tick()
		}
		if hs := held(t, s); len(hs) != 2 || !hs[1].Tombstone || hs[1].AgeMillis != 4900 {
			t.Fatalf("tick 49:%s", fmtEntries(hs))
		}
		s.Tick()
		rd := s.Ready()
		if rd.State == nil {
			t.Fatal("expiry did not change the saved state")
		}
		saved, err := names.DecodeState(rd.State)
		if err != nil {
			t.Fatal(err)
		}
		checkEntries(t, "saved", saved, []proto.NameEntry{keep})
		drain(t, s)
		checkEntries(t, "tick 50", held(t, s), []proto.NameEntry{keep})
		if got := s.Stats().Expired; got != 1 {
			t.Errorf("Expired = %d", got)
		}
	})
	for _, tc := range []struct {
		name    string
		age     uint32 // seconds; a tick is 100 ms
		goneBy  int    // first digest tick at which it is gone; 0: never held
		ageSeen uint32 // age held at tick 0
	}{
		{"received new", 0, 50, 0},
		{"received 2 s old", 2, 30, 2},
		{"received 3 s old", 3, 20, 3},
		{"received as old as the lifetime", 5, 0, 0},
		{"received older", 100, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t, self, nil, short)
			s.SetReachable([]proto.PeerName{peerA})
			e := entry("web.weave.local.", "10.0.0.1", "c1", peerA, 1, true, tc.age)
			mustStep(t, s, peerA, e)
			hs := held(t, s)
			if tc.goneBy == 0 {
				checkEntries(t, "held", hs, nil)
				return
			}
			e.AgeMillis = tc.ageSeen * 1000
			checkEntries(t, "held at tick 0", hs, []proto.NameEntry{e})
			for tick := 1; tick <= tc.goneBy; tick++ {
				s.Tick()
				drain(t, s)
				hs := held(t, s)
				if tick < tc.goneBy && len(hs) != 1 || tick == tc.goneBy && len(hs) != 0 {
					t.Fatalf("tick %d:%s", tick, fmtEntries(hs))
				}
			}
		})
	}
	t.Run("live entries do not expire", func(t *testing.T) {
		s := newStore(t, self, nil, short)
		s.SetReachable([]proto.PeerName{peerA})
		e := entry("web.weave.local.", "10.0.0.1", "c1", peerA, 1, false, 0)
		mustStep(t, s, peerA, e)
		for range 200 {
			s.Tick()
		}
		drain(t, s)
		checkEntries(t, "held", held(t, s), []proto.NameEntry{e})
	})
}

// TestTombstoneAgeOrder shows that a tombstone received twice keeps the age
// of the copy that came first: stores that merged the same messages in
// other orders expire it at different times. It logs what it finds.
func TestTombstoneAgeOrder(t *testing.T) {
	young := entry("web.weave.local.", "10.0.0.1", "c1", peerA, 1, true, 1)
	old := young
	old.AgeMillis = 100_000
	var ages []uint32
	for _, order := range [][]proto.NameEntry{{young, old}, {old, young}} {
		s := newStore(t, self, nil)
		s.SetReachable([]proto.PeerName{peerA})
		for _, e := range order {
			mustStep(t, s, peerA, e)
		}
		hs := held(t, s)
		if len(hs) != 1 {
			t.Fatalf("held%s", fmtEntries(hs))
		}
		ages = append(ages, hs[0].AgeMillis)
	}
	if ages[0] != ages[1] {
		t.Logf("the age of a tombstone depends on delivery order: %v", ages)
	}
}

func TestDigest(t *testing.T) {
	mineE := entry("mine.weave.local.", "10.0.0.9", "c9", self, 0, false, 0)
	aE := []proto.NameEntry{
		entry("a1.weave.local.", "10.0.0.1", "c1", peerA, 0, false, 0),
		entry("a2.weave.local.", "10.0.0.2", "c1", peerA, 3, true, 0),
	}
	setup := func(t *testing.T) (*names.Store, proto.NamesMsg) {
		s := newStore(t, self, nil, func(c *names.Config) { c.Fanout = 2 })
		s.SetReachable([]proto.PeerName{peerA, peerB})
		mustAdd(t, s, "mine", "10.0.0.9", "c9")
		mustStep(t, s, peerA, aE...)
		drain(t, s)
		for range 10 {
			s.Tick()
		}
		ms := drain(t, s)
		if len(ms) != 2 || ms[0].Msg.Kind != proto.NamesSummary || !reflect.DeepEqual(ms[1].Msg, ms[0].Msg) {
			t.Fatalf("tick 10 sent %+v, want 2 summaries", ms)
		}
		// The same summary is not answered; another one gets the digest.
		same := ms[0].Msg
		if err := s.Step(peerB, &same); err != nil {
			t.Fatal(err)
		}
		if ms := drain(t, s); len(ms) != 0 {
			t.Fatalf("an equal summary was answered with %+v", ms)
		}
		for _, to := range []proto.PeerName{peerA, peerB} {
			if err := s.Step(to, &proto.NamesMsg{Kind: proto.NamesSummary, Hash: same.Hash + 1}); err != nil {
				t.Fatal(err)
			}
		}
		ms = drain(t, s)
		if len(ms) != 2 || ms[0].To != peerA || ms[1].To != peerB {
			t.Fatalf("answers to summaries that differ: %+v", ms)
		}
		d := ms[0].Msg
		if d.Kind != proto.NamesDigest || !d.Echo || len(d.Digests) != 2 || d.Digests[0].Origin != self || d.Digests[1].Origin != peerA ||
			!reflect.DeepEqual(ms[1].Msg, d) {
			t.Fatalf("digests %+v", ms)
		}
		return s, d
	}
	_, ours := setup(t)
	hSelf, hA := ours.Digests[0].Hash, ours.Digests[1].Hash
	dig := func(echo bool, ds ...proto.NameDigest) proto.NamesMsg {
		slices.SortFunc(ds, func(a, b proto.NameDigest) int { return cmp.Compare(a.Origin, b.Origin) })
		return proto.NamesMsg{Kind: proto.NamesDigest, Echo: echo, Digests: ds}
	}
	// Sent ten ticks after it was made, the tombstone is a second old.
	aSent := slices.Clone(aE)
	aSent[1].AgeMillis = 1000
	for _, tc := range []struct {
		name    string
		in      proto.NamesMsg
		entries []proto.NameEntry
		echo    bool
	}{
		{"equal", dig(true, proto.NameDigest{Origin: peerA, Hash: hA}, proto.NameDigest{Origin: self, Hash: hSelf}), nil, false},
		{"both differ, echo", dig(true, proto.NameDigest{Origin: peerA, Hash: hA + 1}, proto.NameDigest{Origin: self, Hash: 1}),
			append(slices.Clone(aSent), mineE), true},
		{"both differ, no echo", dig(false, proto.NameDigest{Origin: peerA, Hash: 0}, proto.NameDigest{Origin: self, Hash: hSelf - 1}),
			append(slices.Clone(aSent), mineE), false},
		{"one differs", dig(true, proto.NameDigest{Origin: peerA, Hash: 7}, proto.NameDigest{Origin: self, Hash: hSelf}), aSent, true},
		{"one missing", dig(true, proto.NameDigest{Origin: self, Hash: hSelf}), aSent, true},
		{"empty", dig(true), append(slices.Clone(aSent), mineE), true},
		{"empty, no echo", dig(false), append(slices.Clone(aSent), mineE), false},
		{"an origin we lack", dig(true, proto.NameDigest{Origin: peerA, Hash: hA}, proto.NameDigest{Origin: peerB, Hash: 5},
			proto.NameDigest{Origin: self, Hash: hSelf}), nil, true},
		{"an unreachable origin", dig(true, proto.NameDigest{Origin: peerA, Hash: hA}, proto.NameDigest{Origin: peerC, Hash: 5},
			proto.NameDigest{Origin: self, Hash: hSelf}), nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := setup(t)
			if err := s.Step(peerB, &tc.in); err != nil {
				t.Fatal(err)
			}
			ms := drain(t, s)
			var gotEcho *proto.NamesMsg
			for i, m := range ms {
				if m.To != peerB {
					t.Fatalf("message to %v", m.To)
				}
				if m.Msg.Kind == proto.NamesDigest {
					if gotEcho != nil || i != len(ms)-1 {
						t.Fatalf("messages %+v", ms)
					}
					gotEcho = &ms[i].Msg
				}
			}
			checkEntries(t, "entries sent", sortEntries(entriesOf(ms)), sortEntries(tc.entries))
			if (gotEcho != nil) != tc.echo {
				t.Fatalf("echo %+v, want %v", gotEcho, tc.echo)
			}
			if gotEcho != nil {
				want := ours
				want.Echo = false
				if !reflect.DeepEqual(*gotEcho, want) {
					t.Fatalf("echoed %+v, want %+v", *gotEcho, want)
				}
			}
		})
	}
}

func TestGossipFanout(t *testing.T) {
	for _, tc := range []struct {
		name   string
		fanout int
		reach  []proto.PeerName
		want   int
	}{
		{"two of three", 2, []proto.PeerName{peerA, peerB, peerC}, 2},
		{"all of three", 5, []proto.PeerName{peerA, peerB, peerC, self}, 3},
		{"not ourselves", 2, []proto.PeerName{self, peerA}, 1},
		{"nobody", 2, nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t, self, nil, func(c *names.Config) { c.Fanout = tc.fanout })
			s.SetReachable(tc.reach)
			for tick := 1; tick <= 30; tick++ {
				s.Tick()
				ms := drain(t, s)
				if tick%10 != 0 {
					if len(ms) != 0 {
						t.Fatalf("tick %d sent %+v", tick, ms)
					}
					continue
				}
				seen := map[proto.PeerName]bool{}
				for _, m := range ms {
					if m.Msg.Kind != proto.NamesSummary || m.To == self || !slices.Contains(tc.reach, m.To) || seen[m.To] {
						t.Fatalf("tick %d: %+v", tick, ms)
					}
					seen[m.To] = true
				}
				if len(seen) != tc.want {
					t.Fatalf("tick %d: summaries to %d peers, want %d", tick, len(seen), tc.want)
				}
			}
		})
	}
}

func TestLargeSetsAreSplit(t *testing.T) {
	const n = 3000
	add := func(t *testing.T, s *names.Store, n int) []proto.NameEntry {
		var es []proto.NameEntry
		for i := range n {
			es = append(es, mustAdd(t, s, fmt.Sprintf("host-%05d", i), fmt.Sprintf("10.1.%d.%d", i/256, i%256),
				strings.Repeat("c", i%40+1)))
		}
		drain(t, s)
		return es
	}
	// checkSplit checks that messages are full but not over max, and
	// carry want in order.
	checkSplit := func(t *testing.T, ms []sent, to proto.PeerName, max int, want []proto.NameEntry) {
		t.Helper()
		if len(ms) < 2 {
			t.Fatalf("%d messages", len(ms))
		}
		for i, m := range ms {
			if m.To != to || m.Msg.Kind != proto.NamesEntries || m.Size > max {
				t.Fatalf("message %d: to %v, kind %d, %d bytes", i, m.To, m.Msg.Kind, m.Size)
			}
			if i+1 < len(ms) {
				e := ms[i+1].Msg.Entries[0]
				if next := 21 + len(e.Hostname) + len(e.ContainerID); m.Size+next <= max && len(m.Msg.Entries) < proto.MaxNameEntries {
					t.Fatalf("message %d of %d bytes has room for %d more", i, m.Size, next)
				}
			}
		}
		checkEntries(t, "entries sent", entriesOf(ms), want)
	}
	t.Run("digest answer by size", func(t *testing.T) {
		s := newStore(t, self, nil, func(c *names.Config) { c.MaxMsgBytes = 4096 })
		s.SetReachable([]proto.PeerName{peerB})
		es := add(t, s, n)
		if err := s.Step(peerB, &proto.NamesMsg{Kind: proto.NamesDigest}); err != nil {
			t.Fatal(err)
		}
		checkSplit(t, drain(t, s), peerB, 4096, sortEntries(es))
	})
	t.Run("broadcast by size", func(t *testing.T) {
		s := newStore(t, self, nil)
		es := add(t, s, n)
		del, err := s.Delete("", netip.Addr{}, "")
		if err != nil || len(del) != n {
			t.Fatalf("deleted %d, %v", len(del), err)
		}
		for i := range es {
			es[i].Version, es[i].Tombstone = 1, true
		}
		checkSplit(t, drain(t, s), 0, 16384, sortEntries(es))
	})
	t.Run("by count", func(t *testing.T) {
		s := newStore(t, self, nil, func(c *names.Config) { c.MaxMsgBytes = 1 << 20 })
		es := add(t, s, 5000)
		if err := s.Step(peerB, &proto.NamesMsg{Kind: proto.NamesDigest}); err != nil {
			t.Fatal(err)
		}
		ms := drain(t, s)
		if len(ms) != 2 || len(ms[0].Msg.Entries) != proto.MaxNameEntries {
			t.Fatalf("%d messages", len(ms))
		}
		checkEntries(t, "entries sent", entriesOf(ms), sortEntries(es))
	})
}

// stateStore makes a store with live entries and tombstones of several ages.
func stateStore(t *testing.T) (*names.Store, func(*names.Config)) {
	short := func(c *names.Config) { c.TombstoneTicks = 100; c.DigestTicks = 10 }
	s := newStore(t, self, nil, short)
	s.SetReachable([]proto.PeerName{peerA})
	mustAdd(t, s, "a", "10.0.0.1", "c1")
	mustAdd(t, s, "B", "10.0.0.2", "")
	mustAdd(t, s, "c.sub.weave.local", "10.0.0.3", "c3")
	if _, err := s.Delete("B", netip.Addr{}, ""); err != nil {
		t.Fatal(err)
	}
	// A peer's entries are not saved.
	mustStep(t, s, peerA, entry("p.weave.local.", "10.0.0.4", "c4", peerA, 0, false, 0))
	for range 25 {
		s.Tick()
	}
	mustAdd(t, s, "d", "10.0.0.5", "c5")
	if _, err := s.Delete("d", netip.Addr{}, ""); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		s.Tick()
	}
	drain(t, s)
	return s, short
}

func TestStateRoundTrip(t *testing.T) {
	s, short := stateStore(t)
	mustAdd(t, s, "e", "10.0.0.6", "c6")
	rd := s.Ready()
	st := s.EncodeState()
	if !bytes.Equal(rd.State, st) {
		t.Fatal("Ready().State is not EncodeState()")
	}
	drain(t, s)
	var want []proto.NameEntry
	for _, e := range held(t, s) {
		if e.Origin == self {
			want = append(want, e)
		}
	}
	if len(want) != 5 || !want[1].Tombstone || want[1].AgeMillis != 3000 || !want[3].Tombstone || want[3].AgeMillis != 500 {
		t.Fatalf("unexpected entries:%s", fmtEntries(want))
	}
	saved, err := names.DecodeState(st)
	if err != nil {
		t.Fatal(err)
	}
	checkEntries(t, "decoded", saved, want)

	r := newStore(t, self, st, short)
	checkEntries(t, "restored entries", r.Entries(), want)
	checkEntries(t, "restored view", r.View().Entries(), live(want))
	checkEntries(t, "restored", held(t, r), want)
	checkView(t, r.View(), want)
	if !bytes.Equal(r.EncodeState(), st) {
		t.Fatal("restored store encodes another state")
	}
	// The restored tombstone B (3 s = 30 ticks old) expires 70 ticks on.
	for range 69 {
		r.Tick()
	}
	drain(t, r)
	if hs := held(t, r); len(hs) != 5 {
		t.Fatalf("tick 69:%s", fmtEntries(hs))
	}
	r.Tick()
	drain(t, r)
	if hs := held(t, r); len(hs) != 4 || strings.HasPrefix(hs[1].Hostname, "B") {
		t.Fatalf("tick 70:%s", fmtEntries(hs))
	}
	// Restored entries are ours: a peer's copy of one is answered.
	r.SetReachable([]proto.PeerName{peerA})
	old := want[0]
	old.Version = 3
	mustStep(t, r, peerA, old)
	if ms := drain(t, r); len(entriesOf(ms)) != 1 || entriesOf(ms)[0].Version != 4 {
		t.Fatalf("answer %+v", ms)
	}
}

func TestStateEmpty(t *testing.T) {
	s := newStore(t, self, nil)
	st := s.EncodeState()
	es, err := names.DecodeState(st)
	if err != nil || len(es) != 0 {
		t.Fatalf("%v, %v", es, err)
	}
	r := newStore(t, self, st)
	if !bytes.Equal(r.EncodeState(), st) {
		t.Fatal("empty state changed")
	}
}

func TestStateLarge(t *testing.T) {
	s := newStore(t, self, nil)
	for i := range 5000 {
		mustAdd(t, s, fmt.Sprintf("h%d", i), fmt.Sprintf("10.2.%d.%d", i/256, i%256), "c")
	}
	if _, err := s.Delete("", ip("10.2.0.7"), ""); err != nil {
		t.Fatal(err)
	}
	drain(t, s)
	want := held(t, s)
	st := s.EncodeState()
	got, err := names.DecodeState(st)
	if err != nil {
		t.Fatal(err)
	}
	checkEntries(t, "decoded", got, want)
	r := newStore(t, self, st)
	checkEntries(t, "restored", held(t, r), want)
}

func TestStateOtherStore(t *testing.T) {
	s, _ := stateStore(t)
	st := s.EncodeState()
	t.Run("another peer's", func(t *testing.T) {
		if _, err := names.New(names.Config{Self: peerA, Rand: rand.New(rand.NewPCG(1, 1))}, st); err == nil {
			t.Fatal("New took another peer's state")
		}
	})
	t.Run("another domain", func(t *testing.T) {
		var dropped []string
		r, err := names.New(names.Config{Self: self, Rand: rand.New(rand.NewPCG(1, 1)), Domain: "other.local",
			Infof: func(f string, a ...any) { dropped = append(dropped, fmt.Sprintf(f, a...)) }}, st)
		if err != nil {
			t.Fatal(err)
		}
		if len(r.View().Entries()) != 0 || len(dropped) != 4 {
			t.Fatalf("kept %v; logged %q", r.View().Entries(), dropped)
		}
	})
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// seal appends the checksum of a saved state.
func seal(b []byte) []byte { return binary.BigEndian.AppendUint32(b, crc32.Checksum(b, castagnoli)) }

// sealState frames records as a saved state with a valid checksum.
func sealState(count uint32, records ...[]byte) []byte {
	b := binary.BigEndian.AppendUint32([]byte("OVN1"), count)
	for _, r := range records {
		b = binary.BigEndian.AppendUint32(b, uint32(len(r)))
		b = append(b, r...)
	}
	return seal(b)
}

func TestStateCorrupt(t *testing.T) {
	s, _ := stateStore(t)
	st := s.EncodeState()
	bad := func(t *testing.T, what string, b []byte) {
		t.Helper()
		if es, err := names.DecodeState(b); !errors.Is(err, names.ErrState) {
			t.Fatalf("%s: DecodeState = %v, %v", what, es, err)
		}
		if _, err := names.New(names.Config{Self: self, Rand: rand.New(rand.NewPCG(1, 1))}, b); !errors.Is(err, names.ErrState) {
			t.Fatalf("%s: New = %v", what, err)
		}
	}
	t.Run("flipped byte", func(t *testing.T) {
		for i := range st {
			for _, x := range []byte{0x01, 0x80, 0xff} {
				c := bytes.Clone(st)
				c[i] ^= x
				bad(t, fmt.Sprintf("byte %d ^ %#x", i, x), c)
			}
		}
	})
	t.Run("truncated", func(t *testing.T) {
		for n := range len(st) {
			bad(t, fmt.Sprintf("%d bytes", n), st[:n])
		}
	})
	t.Run("appended", func(t *testing.T) {
		bad(t, "one more byte", append(bytes.Clone(st), 0))
	})
	rec, err := proto.AppendNamesMsg(nil, &proto.NamesMsg{Kind: proto.NamesEntries, Entries: []proto.NameEntry{
		entry("x.weave.local.", "10.0.0.1", "c1", self, 0, false, 0)}})
	if err != nil {
		t.Fatal(err)
	}
	dig, _ := proto.AppendNamesMsg(nil, &proto.NamesMsg{Kind: proto.NamesDigest})
	if _, err := names.DecodeState(sealState(1, rec)); err != nil {
		t.Fatalf("a valid sealed state: %v", err)
	}
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"more records than present", sealState(2, rec)},
		{"fewer records than present", sealState(1, rec, rec)},
		{"record of a digest", sealState(1, dig)},
		{"bad record", sealState(1, rec[:len(rec)-1])},
		{"record length past the end", func() []byte {
			b := binary.BigEndian.AppendUint32([]byte("OVN1"), 1)
			b = binary.BigEndian.AppendUint32(b, uint32(len(rec)+1))
			return seal(append(b, rec...))
		}()},
		{"record length cut", seal(append(binary.BigEndian.AppendUint32([]byte("OVN1"), 1), 0, 0))},
		{"short, checksum right", seal([]byte("OVN1"))},
		{"huge count", sealState(0xffffffff, rec)},
		{"other magic", func() []byte {
			b := sealState(1, rec)
			b[3] = '2'
			return seal(b[:len(b)-4])
		}()},
		{"nothing", []byte{}},
	} {
		t.Run(tc.name, func(t *testing.T) { bad(t, tc.name, tc.b) })
	}
}

func TestReverse(t *testing.T) {
	s := newStore(t, self, nil)
	s.SetReachable([]proto.PeerName{peerA})
	// Case-insensitively "alpha" < "Beta" < "gamma", though 'B' < 'a' in
	// bytes.
	mustAdd(t, s, "gamma", "10.0.0.1", "c1")
	mustAdd(t, s, "Beta", "10.0.0.1", "c1")
	mustStep(t, s, peerA, entry("alpha.weave.local.", "10.0.0.1", "ca", peerA, 0, false, 0))
	mustStep(t, s, peerA, entry("aardvark.weave.local.", "10.0.0.1", "ca", peerA, 1, true, 0))
	drain(t, s)
	for _, tc := range []struct {
		name   string
		before func()
		want   string // "" for none
	}{
		{"first live in sort order", func() {}, "alpha.weave.local."},
		{"the first one deleted", func() {
			mustStep(t, s, peerA, entry("alpha.weave.local.", "10.0.0.1", "ca", peerA, 1, true, 0))
		}, "Beta.weave.local."},
		{"same name of another origin sorts by origin", func() {
			mustStep(t, s, peerA, entry("BETA.weave.local.", "10.0.0.1", "ca", peerA, 0, false, 0))
		}, "Beta.weave.local."},
		{"ours deleted", func() {
			if _, err := s.Delete("beta", netip.Addr{}, ""); err != nil {
				t.Fatal(err)
			}
		}, "BETA.weave.local."},
		{"all deleted", func() {
			mustStep(t, s, peerA, entry("BETA.weave.local.", "10.0.0.1", "ca", peerA, 1, true, 0))
			if _, err := s.Delete("", netip.Addr{}, ""); err != nil {
				t.Fatal(err)
			}
		}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.before()
			h, ok := s.View().Reverse(ip("10.0.0.1"))
			if h != tc.want || ok != (tc.want != "") {
				t.Fatalf("Reverse = %q, %v, want %q", h, ok, tc.want)
			}
			if h, ok := s.View().Reverse(ip("10.0.0.2")); ok {
				t.Fatalf("Reverse of an unknown address = %q", h)
			}
		})
	}
}

func TestStepRejects(t *testing.T) {
	good := entry("good.weave.local.", "10.0.0.1", "c1", peerA, 0, false, 0)
	for _, tc := range []struct {
		name    string
		msg     proto.NamesMsg
		wantErr error // nil: accepted, and every entry is kept
	}{
		{"space in a name", proto.NamesMsg{Kind: proto.NamesEntries, Entries: []proto.NameEntry{good,
			entry("a b.weave.local.", "10.0.0.2", "c1", peerA, 0, false, 0)}}, errors.New("any")},
		{"no trailing dot", proto.NamesMsg{Kind: proto.NamesEntries, Entries: []proto.NameEntry{good,
			entry("x.weave.local", "10.0.0.2", "c1", peerA, 0, false, 0)}}, errors.New("any")},
		{"empty label", proto.NamesMsg{Kind: proto.NamesEntries, Entries: []proto.NameEntry{good,
			entry("x..weave.local.", "10.0.0.2", "c1", peerA, 0, false, 0)}}, errors.New("any")},
		{"empty container", proto.NamesMsg{Kind: proto.NamesEntries, Entries: []proto.NameEntry{good,
			entry("x.weave.local.", "10.0.0.2", "", peerA, 0, false, 0)}}, errors.New("any")},
		{"container with a space", proto.NamesMsg{Kind: proto.NamesEntries, Entries: []proto.NameEntry{good,
			entry("x.weave.local.", "10.0.0.2", "c 1", peerA, 0, false, 0)}}, errors.New("any")},
		{"unknown kind", proto.NamesMsg{Kind: 9, Entries: []proto.NameEntry{good}}, errors.New("any")},
		// A peer may serve another domain: its names are kept (so that
		// digests agree) but never looked up.
		{"outside the domain", proto.NamesMsg{Kind: proto.NamesEntries, Entries: []proto.NameEntry{good,
			entry("x.example.com.", "10.0.0.2", "c1", peerA, 0, false, 0)}}, nil},
		{"the domain itself", proto.NamesMsg{Kind: proto.NamesEntries, Entries: []proto.NameEntry{good,
			entry("weave.local.", "10.0.0.2", "c1", peerA, 0, false, 0)}}, nil},
		{"a good entry", proto.NamesMsg{Kind: proto.NamesEntries, Entries: []proto.NameEntry{good}}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t, self, nil)
			s.SetReachable([]proto.PeerName{peerA})
			err := s.Step(peerA, &tc.msg)
			st := s.Stats()
			if tc.wantErr == nil {
				if err != nil {
					t.Fatal(err)
				}
				if st.Rejected != 0 {
					t.Fatalf("stats %+v", st)
				}
				checkEntries(t, "held", held(t, s), sortEntries(slices.Clone(tc.msg.Entries)))
				return
			}
			if err == nil {
				t.Fatal("Step accepted the message")
			}
			if st.Rejected != 1 {
				t.Fatalf("stats %+v", st)
			}
			if rd := s.Ready(); !rd.Empty() {
				t.Fatalf("refused message made work: %+v", rd)
			}
			checkEntries(t, "held", held(t, s), nil)
		})
	}
	t.Run("a peer's entry at the highest version", func(t *testing.T) {
		s := newStore(t, self, nil)
		s.SetReachable([]proto.PeerName{peerA})
		e := entry("v.weave.local.", "10.0.0.2", "c1", peerA, proto.MaxNameVersion, false, 0)
		mustStep(t, s, peerA, e)
		checkEntries(t, "held", held(t, s), []proto.NameEntry{e})
	})
	t.Run("a copy of ours at the highest version is ignored", func(t *testing.T) {
		s := newStore(t, self, nil)
		s.SetReachable([]proto.PeerName{peerA})
		mustAdd(t, s, "web", "10.0.0.1", "c1")
		drain(t, s)
		mustStep(t, s, peerA, entry("web.weave.local.", "10.0.0.1", "c1", self, proto.MaxNameVersion, true, 0))
		if st := s.Stats(); st.Rejected != 1 {
			t.Fatalf("stats %+v", st)
		}
		if ms := drain(t, s); len(entriesOf(ms)) != 0 {
			t.Fatalf("answered with %+v", ms)
		}
	})
}

// TestCorrectionIsAccepted: an answer to a peer's wrong copy of our entry
// must be accepted by the peers it goes to. A copy at the highest version
// a peer accepts makes us answer at one more.
func TestCorrectionIsAccepted(t *testing.T) {
	x := newStore(t, self, nil)
	a := newStore(t, peerA, nil)
	x.SetReachable([]proto.PeerName{peerA})
	a.SetReachable([]proto.PeerName{self})
	mustAdd(t, x, "web", "10.0.0.1", "c1")
	drain(t, x)
	forged := entry("web.weave.local.", "10.0.0.1", "c1", self, 1<<30, true, 0)
	mustStep(t, x, peerA, forged)
	ms := drain(t, x)
	if es := entriesOf(ms); len(es) != 1 || es[0].Version != 1<<30+1 || es[0].Tombstone {
		t.Fatalf("answer %+v", ms)
	}
	if err := a.Step(self, &ms[0].Msg); err != nil {
		t.Errorf("a peer refuses our answer: %v", err)
	}
	// Every later digest answer that carries the entry is refused whole,
	// with the entries batched beside it.
	mustAdd(t, x, "other", "10.0.0.2", "c2")
	drain(t, x)
	if err := x.Step(peerA, &proto.NamesMsg{Kind: proto.NamesDigest}); err != nil {
		t.Fatal(err)
	}
	for _, m := range drain(t, x) {
		if err := a.Step(self, &m.Msg); err != nil {
			t.Errorf("a peer refuses our digest answer (%d entries): %v", len(m.Msg.Entries), err)
		}
	}
}

// TestEntriesListed: Store.Entries lists every entry held, tombstones too,
// and View.Entries the live ones; a change to tombstones only makes no new
// View.
func TestEntriesListed(t *testing.T) {
	short := func(c *names.Config) { c.TombstoneTicks = 20; c.DigestTicks = 10 }
	for _, tc := range []struct {
		name string
		do   func(t *testing.T, s *names.Store)
	}{
		{"tombstone of an entry never seen", func(t *testing.T, s *names.Store) {
			mustStep(t, s, peerA, entry("t.weave.local.", "10.0.0.1", "c1", peerA, 1, true, 0))
		}},
		{"newer tombstone over a tombstone", func(t *testing.T, s *names.Store) {
			mustStep(t, s, peerA, entry("t.weave.local.", "10.0.0.1", "c1", peerA, 0, false, 0))
			mustStep(t, s, peerA, entry("t.weave.local.", "10.0.0.1", "c1", peerA, 1, true, 0))
			s.View()
			mustStep(t, s, peerA, entry("t.weave.local.", "10.0.0.1", "c1", peerA, 3, true, 0))
		}},
		{"tombstone expired", func(t *testing.T, s *names.Store) {
			mustAdd(t, s, "web", "10.0.0.1", "c1")
			if _, err := s.Delete("web", netip.Addr{}, ""); err != nil {
				t.Fatal(err)
			}
			s.View()
			for range 20 {
				s.Tick()
			}
		}},
		{"unreachable peer's tombstones purged", func(t *testing.T, s *names.Store) {
			mustStep(t, s, peerA, entry("t.weave.local.", "10.0.0.1", "c1", peerA, 0, false, 0))
			mustStep(t, s, peerA, entry("t.weave.local.", "10.0.0.1", "c1", peerA, 1, true, 0))
			s.View()
			s.SetReachable(nil)
			for range 10 {
				s.Tick()
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t, self, nil, short)
			s.SetReachable([]proto.PeerName{peerA})
			tc.do(t, s)
			drain(t, s)
			hs := held(t, s)
			es := s.Entries()
			for i := range es {
				es[i].AgeMillis = 0 // as of when they were listed
			}
			for i := range hs {
				hs[i].AgeMillis = 0
			}
			checkEntries(t, "Entries() against the entries held", es, hs)
			checkEntries(t, "View().Entries() against the live entries held", s.View().Entries(), live(hs))
		})
	}
	// A tombstone of an entry never seen, and another over it: no new
	// View (no live entry changed).
	s := newStore(t, self, nil, short)
	s.SetReachable([]proto.PeerName{peerA})
	v := s.View()
	drain(t, s)
	mustStep(t, s, peerA, entry("t.weave.local.", "10.0.0.1", "c1", peerA, 1, true, 0))
	mustStep(t, s, peerA, entry("t.weave.local.", "10.0.0.1", "c1", peerA, 3, true, 0))
	if rd := s.Ready(); rd.View != nil || s.View() != v {
		t.Error("tombstones alone made a new View")
	}
	if len(s.Entries()) != 1 {
		t.Errorf("Entries() = %v, want the tombstone", s.Entries())
	}
}

// TestOriginCap: no origin, ours included, holds more than
// MaxOriginEntries entries; changes to entries held still go through.
func TestOriginCap(t *testing.T) {
	capped := func(c *names.Config) { c.MaxOriginEntries = 3 }
	s := newStore(t, self, nil, capped)
	s.SetReachable([]proto.PeerName{peerA})
	for i := range 3 {
		mustAdd(t, s, fmt.Sprintf("w%d", i), fmt.Sprintf("10.0.0.%d", i+1), "c1")
	}
	if _, err := s.Add("w3", ip("10.0.0.4"), "c1"); err == nil || !strings.Contains(err.Error(), "the most it may") {
		t.Errorf("a fourth name of ours: %v", err)
	}
	if _, err := s.Delete("w0", netip.Addr{}, ""); err != nil {
		t.Fatal(err)
	}
	mustAdd(t, s, "w0", "10.0.0.1", "c1") // brought back: held already
	var es []proto.NameEntry
	for i := range 5 {
		es = append(es, entry(fmt.Sprintf("a%d.weave.local.", i), fmt.Sprintf("10.1.0.%d", i+1), "c1", peerA, 0, false, 0))
	}
	mustStep(t, s, peerA, es...)
	if got := s.Stats().Overflow; got != 2 {
		t.Errorf("Overflow = %d, want 2", got)
	}
	mustStep(t, s, peerA, entry("a0.weave.local.", "10.1.0.1", "c1", peerA, 1, true, 0))
	if got := s.View().Lookup("a0.weave.local."); got != nil {
		t.Errorf("a held entry of a full origin was not deleted: %v", got)
	}
}

// TestOriginCapOurs: copies of entries we never made are not tombstoned
// past the cap either.
func TestOriginCapOurs(t *testing.T) {
	s := newStore(t, self, nil, func(c *names.Config) { c.MaxOriginEntries = 2 })
	s.SetReachable([]proto.PeerName{peerA})
	for i := range 4 {
		mustStep(t, s, peerA, entry(fmt.Sprintf("f%d.weave.local.", i), "10.0.0.1", "c1", self, 0, false, 0))
	}
	if st := s.Stats(); st.Corrected != 2 || st.Overflow != 2 {
		t.Errorf("stats %+v, want 2 corrected and 2 over the cap", st)
	}
}

// BenchmarkTombstoneMemory reports what the store holds per tombstone of
// another peer's name (a container ID of 64 hex digits): what
// --dns-tombstone-lifetime multiplies.
func BenchmarkTombstoneMemory(b *testing.B) {
	const n = 20000
	for b.Loop() {
		s := newStore(b, self, nil)
		s.SetReachable([]proto.PeerName{peerA})
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		for i := range n {
			id := fmt.Sprintf("%064x", i)
			e := entry(fmt.Sprintf("s1-%d-%d.weave.local.", i/4, i%4), fmt.Sprintf("10.44.%d.%d", i/250, 1+i%250), id, peerA, 1, true, 0)
			mustStep(b, s, peerA, e)
			s.Ready()
			s.Advance()
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		if got := len(s.Entries()); got != n {
			b.Fatalf("%d entries held, want %d", got, n)
		}
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "B/tombstone")
		runtime.KeepAlive(s)
	}
}
