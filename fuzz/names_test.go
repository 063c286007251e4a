package fuzz

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"maps"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/overlayd/overlayd/names"
	"github.com/overlayd/overlayd/proto"
)

var (
	namesSelf = proto.PeerName(0x12d2fe7ac1f2)
	// namesPeers send to the store under test; the last is never
	// reachable unless the input says so.
	namesPeers = []proto.PeerName{0xaeafa6361837, 0xe6b190cdda76, 0x7e214a702f45, 0x0a0b0c0d0e0f}
	// namesObserver checks at the end of FuzzNamesStep that the store's
	// entries reach a peer intact.
	namesObserver = proto.PeerName(0x0000000000ee)
	namesCRC      = crc32.MakeTable(crc32.Castagnoli)
)

func namesEntry(host, addr, id string, origin proto.PeerName, version uint32, tomb bool, age uint32) proto.NameEntry {
	return proto.NameEntry{Hostname: host, Addr: netip.MustParseAddr(addr), ContainerID: id, Origin: origin,
		Version: version, Tombstone: tomb, AgeMillis: age}
}

func encodeNames(m *proto.NamesMsg) []byte {
	b, err := proto.AppendNamesMsg(nil, m)
	if err != nil {
		panic(err)
	}
	return b
}

// namesMsgSeeds are valid messages of both kinds, from the encoder.
func namesMsgSeeds() [][]byte {
	a, b := namesPeers[0], namesPeers[1]
	return [][]byte{
		encodeNames(&proto.NamesMsg{Kind: proto.NamesEntries, Entries: []proto.NameEntry{
			namesEntry("web.weave.local.", "10.32.0.1", "4bd4b3a3a6c8", a, 0, false, 0),
			namesEntry("Web.weave.local.", "10.32.0.2", "weave:extern", a, 3, true, 12),
			namesEntry("db.sub.weave.local.", "10.32.0.3", "c3", b, 1, false, 0),
		}}),
		encodeNames(&proto.NamesMsg{Kind: proto.NamesEntries, Entries: []proto.NameEntry{
			namesEntry("web.weave.local.", "10.32.0.1", "c1", namesSelf, 2, false, 0),
			namesEntry("x.example.com.", "10.32.0.9", "c9", a, 0, false, 0),
		}}),
		encodeNames(&proto.NamesMsg{Kind: proto.NamesEntries}),
		encodeNames(&proto.NamesMsg{Kind: proto.NamesSignedEntries, Entries: []proto.NameEntry{
			func() proto.NameEntry {
				e := namesEntry("web.weave.local.", "10.32.0.1", "c1", a, 1, true, 5)
				e.Sig[0], e.Sig[63] = 1, 2
				return e
			}(),
		}}),
		encodeNames(&proto.NamesMsg{Kind: proto.NamesDigest, Echo: true, Digests: []proto.NameDigest{
			{Origin: namesSelf, Hash: 0x0123456789abcdef}, {Origin: a, Hash: 1}, {Origin: b, Hash: 2}}}),
		encodeNames(&proto.NamesMsg{Kind: proto.NamesDigest}),
		encodeNames(&proto.NamesMsg{Kind: proto.NamesSummary, Hash: 0x0123456789abcdef}),
	}
}

// FuzzNamesMsg: what ParseNamesMsg accepts re-encodes to the same bytes
// and parses back to the same message.
func FuzzNamesMsg(f *testing.F) {
	for _, b := range namesMsgSeeds() {
		f.Add(b)
	}
	for _, b := range [][]byte{nil, {0}, {1}, {1, 0, 0}, {1, 0, 1, 1}, {2, 1, 0, 0}, {2, 2, 0, 0}, {3, 0, 0}} {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := proto.ParseNamesMsg(b)
		if err != nil {
			return
		}
		enc, err := proto.AppendNamesMsg(nil, &m)
		if err != nil {
			t.Fatalf("cannot re-encode accepted %+v: %v", m, err)
		}
		if !bytes.Equal(enc, b) {
			t.Fatalf("round trip changed the message:\n% x\n% x", b, enc)
		}
		again, err := proto.ParseNamesMsg(enc)
		if err != nil || !reflect.DeepEqual(again, m) {
			t.Fatalf("round trip: %v\n%+v\n%+v", err, m, again)
		}
	})
}

// namesState is a valid saved state: live entries, a tombstone with an
// age, names in several cases.
func namesState(n int) []byte {
	s, err := names.New(names.Config{Self: namesSelf, Rand: rand.New(rand.NewPCG(1, 2))}, nil)
	if err != nil {
		panic(err)
	}
	for i := range n {
		if _, err := s.Add(fmt.Sprintf([]string{"web%d", "Web%d.sub.weave.local", "db%d", "X%d"}[i%4], i/4),
			netip.AddrFrom4([4]byte{10, 32, 0, byte(i)}), []string{"", "c1", "4bd4b3a3a6c8"}[i%3]); err != nil {
			panic(err)
		}
	}
	if n > 2 {
		if _, err := s.Delete("web0", netip.Addr{}, ""); err != nil {
			panic(err)
		}
		for range 40 {
			s.Tick()
		}
	}
	return s.EncodeState()
}

// namesValidID is the store's rule for container IDs.
func namesValidID(id string) bool {
	if id == "" || len(id) > proto.MaxContainerLen {
		return false
	}
	for i := range len(id) {
		if id[i] <= ' ' || id[i] > '~' {
			return false
		}
	}
	return true
}

// namesKeep is what a store restored from es holds: the entries whose
// names and container IDs are valid, the last of each key, sorted.
func namesKeep(s *names.Store, es []proto.NameEntry) []proto.NameEntry {
	type key struct {
		name, id string
		addr     netip.Addr
	}
	last := map[key]proto.NameEntry{}
	for _, e := range es {
		if !strings.HasSuffix(e.Hostname, ".") || !namesValidID(e.ContainerID) {
			continue
		}
		if fqdn, err := s.FQDN(e.Hostname); err != nil || fqdn != e.Hostname {
			continue
		}
		last[key{strings.ToLower(e.Hostname), e.ContainerID, e.Addr}] = e
	}
	return namesSorted(slices.Collect(maps.Values(last)))
}

// namesSorted sorts entries like View.Entries.
func namesSorted(es []proto.NameEntry) []proto.NameEntry {
	slices.SortFunc(es, namesCompare)
	return es
}

func namesCompare(a, b proto.NameEntry) int {
	return cmp.Or(strings.Compare(strings.ToLower(a.Hostname), strings.ToLower(b.Hostname)),
		cmp.Compare(a.Origin, b.Origin), strings.Compare(a.ContainerID, b.ContainerID), a.Addr.Compare(b.Addr))
}

// FuzzNamesState: DecodeState never panics; a state it accepts makes a
// store (unless it mixes origins) holding its valid entries, whose saved
// state decodes to just those, and is the same state when saved again. A
// state that is already in that form is saved unchanged. Each input is
// tried as it is and with its magic and checksum made right, so that the
// fuzzer reaches the decoder behind the checksum.
func FuzzNamesState(f *testing.F) {
	for _, n := range []int{0, 1, 7} {
		st := namesState(n)
		f.Add(st)
		f.Add(st[:len(st)-1])
		f.Add(append(bytes.Clone(st), 0))
	}
	f.Add([]byte("OVN1"))
	f.Fuzz(func(t *testing.T, b []byte) {
		try := func(b []byte) {
			es, err := names.DecodeState(b)
			if err != nil {
				return
			}
			self := namesSelf
			if len(es) > 0 {
				self = es[0].Origin
			}
			cfg := names.Config{Self: self, Rand: rand.New(rand.NewPCG(1, 2))}
			s, err := names.New(cfg, b)
			mixed := slices.ContainsFunc(es, func(e proto.NameEntry) bool { return e.Origin != self })
			if mixed != (err != nil) {
				t.Fatalf("New: %v, with entries of several origins: %v", err, mixed)
			}
			if mixed {
				return
			}
			want := namesKeep(s, es)
			enc := s.EncodeState()
			got, err := names.DecodeState(enc)
			if err != nil {
				t.Fatalf("cannot decode the state a store saved: %v", err)
			}
			if !reflect.DeepEqual(got, want) && (len(got) != 0 || len(want) != 0) {
				t.Fatalf("restored and saved:\n got %+v\nwant %+v", got, want)
			}
			if all, local := s.View().Live(); all != local || local != len(slices.DeleteFunc(slices.Clone(want),
				func(e proto.NameEntry) bool { return e.Tombstone })) {
				t.Fatalf("Live() = %d, %d for %+v", all, local, want)
			}
			s2, err := names.New(cfg, enc)
			if err != nil {
				t.Fatalf("cannot restore the state a store saved: %v", err)
			}
			if again := s2.EncodeState(); !bytes.Equal(again, enc) {
				t.Fatalf("saving again changed the state:\n% x\n% x", enc, again)
			}
			records := binary.BigEndian.Uint32(b[4:])
			canonical := len(es) <= proto.MaxNameEntries && records == uint32(min(len(es), 1)) &&
				(reflect.DeepEqual(es, want) || len(es) == 0)
			if canonical && !bytes.Equal(enc, b) {
				t.Fatalf("a canonical state changed:\n% x\n% x", b, enc)
			}
		}
		try(b)
		if len(b) >= 12 {
			c := bytes.Clone(b)
			copy(c, "OVN1")
			binary.BigEndian.PutUint32(c[len(c)-4:], crc32.Checksum(c[:len(c)-4], namesCRC))
			try(c)
		}
	})
}

// The operations of FuzzNamesStep's input, each a byte and its arguments.
const (
	namesOpStep   = iota // from (1) | length (2) | payload: a message from a peer
	namesOpTick          // n (1): 1 + n%16 ticks
	namesOpReach         // bits (1): which of namesPeers are reachable
	namesOpAdd           // which (1): a local Add
	namesOpDelete        // which (1): a local Delete
	namesOpCount
)

var (
	namesHosts = []string{"web", "Web", "db", "x.sub.weave.local", "WEB.weave.local."}
	namesAddrs = []netip.Addr{netip.MustParseAddr("10.32.0.1"), netip.MustParseAddr("10.32.0.2"),
		netip.MustParseAddr("10.32.0.3"), netip.MustParseAddr("10.32.0.4")}
	namesIDs = []string{"c1", "c2", "weave:extern"}
)

// namesOps builds FuzzNamesStep inputs.
type namesOps []byte

func (o namesOps) step(from int, m *proto.NamesMsg) namesOps {
	p := encodeNames(m)
	o = append(o, namesOpStep, byte(from))
	o = binary.BigEndian.AppendUint16(o, uint16(len(p)))
	return append(o, p...)
}

func (o namesOps) op(op, arg byte) namesOps { return append(o, op, arg) }

// namesStepSeeds are histories of peers' entries, digests, local changes,
// partitions and time.
func namesStepSeeds() []namesOps {
	a, b, c := namesPeers[0], namesPeers[1], namesPeers[2]
	entries := func(es ...proto.NameEntry) *proto.NamesMsg {
		return &proto.NamesMsg{Kind: proto.NamesEntries, Entries: es}
	}
	digest := &proto.NamesMsg{Kind: proto.NamesDigest, Echo: true, Digests: []proto.NameDigest{{Origin: namesSelf, Hash: 5}, {Origin: a, Hash: 6}}}
	return []namesOps{
		namesOps{}.op(namesOpReach, 0x07).
			step(0, entries(namesEntry("web.weave.local.", "10.32.0.1", "c1", a, 0, false, 0),
				namesEntry("db.weave.local.", "10.32.0.2", "c2", a, 2, true, 5))).
			step(1, entries(namesEntry("WEB.weave.local.", "10.32.0.1", "c1", b, 1, false, 0))).
			op(namesOpAdd, 0).op(namesOpAdd, 0x29).
			step(2, digest).
			op(namesOpTick, 9).
			step(0, entries(namesEntry("web.weave.local.", "10.32.0.1", "c1", namesSelf, 4, true, 0),
				namesEntry("ghost.weave.local.", "10.32.0.4", "c9", namesSelf, 1, false, 0))).
			op(namesOpDelete, 0x01).
			op(namesOpReach, 0x02).op(namesOpTick, 15).
			step(1, entries(namesEntry("late.weave.local.", "10.32.0.3", "c1", a, 0, false, 0))),
		namesOps{}.op(namesOpReach, 0x0f).
			step(3, entries(namesEntry("d.weave.local.", "10.32.0.3", "c3", namesPeers[3], 0, false, 0),
				namesEntry("Web.weave.local.", "10.32.0.1", "c1", c, 7, false, 0),
				namesEntry("wEB.weave.local.", "10.32.0.1", "c1", c, 7, false, 0))).
			op(namesOpDelete, 0x00).op(namesOpAdd, 0x13).
			step(0, &proto.NamesMsg{Kind: proto.NamesDigest}).
			op(namesOpReach, 0x00).op(namesOpTick, 15).op(namesOpTick, 15),
		namesOps{}.op(namesOpAdd, 1).op(namesOpTick, 3).op(namesOpDelete, 0xff),
	}
}

// namesCheckView checks a view against its own entries: sorted, distinct,
// counted, and every live entry's name resolves to its address.
func namesCheckView(t *testing.T, v *names.View, self proto.PeerName) {
	es := v.Entries()
	byName := map[string][]netip.Addr{}
	byAddr := map[netip.Addr]string{}
	all, local := 0, 0
	for i, e := range es {
		if i > 0 && namesCompare(es[i-1], e) >= 0 {
			t.Fatalf("entries out of order: %+v, %+v", es[i-1], e)
		}
		if e.Tombstone {
			t.Fatalf("the view holds a tombstone: %+v", e)
		}
		all++
		if e.Origin == self {
			local++
		}
		n := strings.ToLower(e.Hostname)
		if !slices.Contains(byName[n], e.Addr) {
			byName[n] = append(byName[n], e.Addr)
		}
		if _, ok := byAddr[e.Addr]; !ok {
			byAddr[e.Addr] = e.Hostname
		}
		for _, q := range []string{e.Hostname, strings.ToUpper(e.Hostname), n} {
			if !slices.Contains(v.Lookup(q), e.Addr) {
				t.Fatalf("Lookup(%s) = %v lacks the live entry %+v", q, v.Lookup(q), e)
			}
		}
	}
	for n, as := range byName {
		if got := v.Lookup(n); !reflect.DeepEqual(got, as) {
			t.Fatalf("Lookup(%s) = %v, want %v", n, got, as)
		}
	}
	for _, e := range es {
		h, ok := v.Reverse(e.Addr)
		if want, live := byAddr[e.Addr]; ok != live || h != want {
			t.Fatalf("Reverse(%v) = %q, %v, want %q", e.Addr, h, ok, want)
		}
		if _, live := byName[strings.ToLower(e.Hostname)]; !live && v.Lookup(e.Hostname) != nil {
			t.Fatalf("Lookup(%s) = %v without live entries", e.Hostname, v.Lookup(e.Hostname))
		}
	}
	if a, l := v.Live(); a != all || l != local {
		t.Fatalf("Live() = %d, %d, want %d, %d", a, l, all, local)
	}
}

// namesDrain checks and acknowledges what a store has done: messages that
// parse, fit and go to peers it knows; a saved state of its own entries.
func namesDrain(t *testing.T, s *names.Store, self proto.PeerName, max int) []names.Msg {
	rd := s.Ready()
	for _, m := range rd.Msgs {
		pm, err := proto.ParseNamesMsg(m.Payload)
		if err != nil {
			t.Fatalf("store sent a message it cannot parse: %v", err)
		}
		if pm.Kind == proto.NamesEntries && len(m.Payload) > max {
			t.Fatalf("message of %d bytes", len(m.Payload))
		}
		if m.To != 0 && m.To != namesObserver && m.To != namesSelf && !slices.Contains(namesPeers, m.To) {
			t.Fatalf("message to %v", m.To)
		}
	}
	if rd.State != nil {
		es, err := names.DecodeState(rd.State)
		if err != nil {
			t.Fatalf("store saved a state it cannot decode: %v", err)
		}
		for _, e := range es {
			if e.Origin != self {
				t.Fatalf("saved %+v", e)
			}
		}
	}
	if rd.View != nil {
		namesCheckView(t, rd.View, self)
	}
	s.Advance()
	return rd.Msgs
}

// namesHeld is every entry of itself and its reachable peers that a store
// holds: its answer to a digest that lists nothing.
func namesHeld(t *testing.T, s *names.Store, self proto.PeerName, max int) []proto.NameEntry {
	namesDrain(t, s, self, max)
	if err := s.Step(namesObserver, &proto.NamesMsg{Kind: proto.NamesDigest}); err != nil {
		t.Fatal(err)
	}
	var es []proto.NameEntry
	for _, m := range namesDrain(t, s, self, max) {
		pm, _ := proto.ParseNamesMsg(m.Payload)
		es = append(es, pm.Entries...)
	}
	return namesSorted(es)
}

// FuzzNamesStep feeds a store messages from a few peers, local changes,
// partitions and time. It never panics; a refused message changes
// nothing; the view stays consistent with its entries; and at the end a
// new peer that exchanges digests with it comes to hold the same entries.
func FuzzNamesStep(f *testing.F) {
	for _, o := range namesStepSeeds() {
		f.Add([]byte(o))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		const max = 1024
		cfg := func(self proto.PeerName) names.Config {
			// TrustRelays: the end checks that one digest exchange
			// hands over every origin's entries (without it only the
			// origins' own copies are taken: see names.TestFromOriginOnly
			// and the namestest simulations).
			return names.Config{Self: self, Rand: rand.New(rand.NewPCG(1, uint64(self))), DigestTicks: 1,
				Fanout: len(namesPeers) + 1, PurgeTicks: 20, TombstoneTicks: 100, MaxMsgBytes: max, TrustRelays: true}
		}
		s, err := names.New(cfg(namesSelf), nil)
		if err != nil {
			t.Fatal(err)
		}
		var reach []proto.PeerName
		for len(b) >= 2 {
			op, arg := b[0]%namesOpCount, b[1]
			b = b[2:]
			switch op {
			case namesOpStep:
				if len(b) < 2 {
					return
				}
				n := min(int(binary.BigEndian.Uint16(b)), len(b)-2)
				m, err := proto.ParseNamesMsg(b[2 : 2+n])
				b = b[2+n:]
				if err != nil {
					continue
				}
				v, msgs, rejected := s.View(), len(s.Ready().Msgs), s.Stats().Rejected
				if err := s.Step(namesPeers[int(arg)%len(namesPeers)], &m); err != nil {
					if s.View() != v || len(s.Ready().Msgs) != msgs || s.Stats().Rejected != rejected+1 {
						t.Fatalf("refused message (%v) changed the store", err)
					}
				}
			case namesOpTick:
				for range 1 + arg%16 {
					s.Tick()
				}
			case namesOpReach:
				reach = reach[:0]
				for i, p := range namesPeers {
					if arg&(1<<i) != 0 {
						reach = append(reach, p)
					}
				}
				s.SetReachable(reach)
			case namesOpAdd:
				_, _ = s.Add(namesHosts[int(arg)%len(namesHosts)], namesAddrs[int(arg>>3)%len(namesAddrs)],
					namesIDs[int(arg>>5)%len(namesIDs)])
			case namesOpDelete:
				host, addr, id := "", netip.Addr{}, ""
				if arg&1 != 0 {
					host = namesHosts[int(arg>>1)%len(namesHosts)]
				}
				if arg&0x10 != 0 {
					addr = namesAddrs[int(arg>>2)%len(namesAddrs)]
				}
				if arg&0x20 != 0 {
					id = namesIDs[int(arg>>6)%len(namesIDs)]
				}
				if _, err := s.Delete(host, addr, id); err != nil {
					t.Fatalf("Delete(%q, %v, %q): %v", host, addr, id, err)
				}
			}
			namesDrain(t, s, namesSelf, max)
			namesCheckView(t, s.View(), namesSelf)
		}

		// A new peer, reachable from the store and reaching what it
		// reaches, learns everything it holds from one digest.
		o, err := names.New(cfg(namesObserver), nil)
		if err != nil {
			t.Fatal(err)
		}
		s.SetReachable(append(slices.Clone(reach), namesObserver))
		o.SetReachable(append(slices.Clone(reach), namesSelf))
		s.Tick()
		for round := 0; ; round++ {
			if round == 10 {
				t.Fatal("no quiescence")
			}
			quiet := true
			for _, m := range namesDrain(t, s, namesSelf, max) {
				if m.To == 0 || m.To == namesObserver {
					quiet = false
					pm, _ := proto.ParseNamesMsg(m.Payload)
					if err := o.Step(namesSelf, &pm); err != nil {
						t.Fatalf("the observer refused %+v: %v", pm, err)
					}
				}
			}
			for _, m := range namesDrain(t, o, namesObserver, max) {
				if m.To == 0 || m.To == namesSelf {
					quiet = false
					pm, _ := proto.ParseNamesMsg(m.Payload)
					if err := s.Step(namesObserver, &pm); err != nil {
						t.Fatalf("the store refused %+v: %v", pm, err)
					}
				}
			}
			if quiet {
				break
			}
		}
		held, seen := namesHeld(t, s, namesSelf, max), namesHeld(t, o, namesObserver, max)
		if !reflect.DeepEqual(held, seen) && (len(held) != 0 || len(seen) != 0) {
			t.Fatalf("the store holds%+v\nthe observer holds%+v", held, seen)
		}
		namesCheckView(t, o.View(), namesObserver)
	})
}
