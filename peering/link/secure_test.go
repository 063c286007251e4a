package link

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/overlayd/overlayd/peering/handshake"
	"github.com/overlayd/overlayd/peering/secure"
	"github.com/overlayd/overlayd/proto"
)

// secureConfig is a password mode configuration with a deterministic key
// pair and random source; peers given the same password share psk.
func secureConfig(t *testing.T, seed uint64, password string) *secure.Config {
	t.Helper()
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	id, err := secure.NewIdentity(r)
	if err != nil {
		t.Fatal(err)
	}
	var psk secure.PSK
	copy(psk[:], password) // Argon2id is tested in package secure; keep these fast
	return &secure.Config{Identity: id, PSK: psk, Random: r}
}

func ep(i int) Endpoint { return Endpoint{Remote: netip.AddrPortFrom(addr(i), DefaultPort)} }

// secureMesh starts two password-mode peers, b dialling a.
func secureMesh(t *testing.T, pwA, pwB string) (*net, *Machine, *Machine) {
	n := newNet(t)
	a := n.addWith(1, 0xa, 1, testRange, secureConfig(t, 1, pwA))
	b := n.addWith(2, 0xb, 2, testRange, secureConfig(t, 2, pwB))
	if err := b.Connect([]string{addr(1).String()}); err != nil {
		t.Fatal(err)
	}
	return n, a, b
}

// refusals lists the password errors m reported.
func refusals(rd []Event) []handshake.PasswordProblem {
	var out []handshake.PasswordProblem
	for _, e := range rd {
		var pe *handshake.PasswordError
		if e.Kind == EventRefused && errors.As(e.Err, &pe) {
			out = append(out, pe.Problem)
		}
	}
	return out
}

// collect runs the net k ticks and returns the events of the machines at
// addr(1) and addr(2).
func collect(n *net, k int) [][]Event {
	n.run(k)
	return [][]Event{n.events[addr(1)], n.events[addr(2)]}
}

func TestSecureHandshakeSealsGossip(t *testing.T) {
	n, a, b := secureMesh(t, "pw", "pw")
	n.run(2)
	for _, m := range []*Machine{a, b} {
		if cs := m.Status().Connections; len(cs) != 1 || cs[0].State != "established" {
			t.Fatalf("%+v\n%s", cs, n.dump())
		}
	}
	if b.Sealed.Cookies != 0 || a.Sealed.Cookies != 1 {
		t.Errorf("cookies: a sent %d, b sent %d; want the first init answered with one", a.Sealed.Cookies, b.Sealed.Cookies)
	}
	// Gossip sealed by b opens at a and is handed up, checked.
	g, _ := proto.AppendGossip(nil, &proto.Gossip{Channel: "topology", Src: 0xb, Payload: []byte("x")})
	sealed, ok := b.Seal(ep(1), g)
	if !ok || len(sealed) != len(g)+proto.SealedHeadLen+proto.SealTagLen {
		t.Fatalf("seal: %v, %d bytes", ok, len(sealed))
	}
	a.Advance()
	if err := a.Step(ep(2), sealed); err != nil {
		t.Fatal(err)
	}
	if got := a.Ready().Gossip; len(got) != 1 || got[0].From != 0xb || string(got[0].Msg.Payload) != "x" {
		t.Errorf("gossip handed up: %+v", got)
	}
	// The same datagram again is a replay; a flipped bit a forgery; plain
	// gossip is refused outright. None of them reaches the shell.
	a.Advance()
	if err := a.Step(ep(2), sealed); !errors.Is(err, ErrRefused) || a.Sealed.Replayed != 1 {
		t.Errorf("replay: %v, %+v", err, a.Sealed)
	}
	sealed[len(sealed)-1] ^= 1
	sealed[4+7]++ // a fresh counter, so only the tag can refuse it
	if err := a.Step(ep(2), sealed); !errors.Is(err, ErrRefused) || a.Sealed.Forged != 1 {
		t.Errorf("forgery: %v, %+v", err, a.Sealed)
	}
	if err := a.Step(ep(2), g); !errors.Is(err, ErrRefused) || a.Sealed.Unsealed != 1 {
		t.Errorf("plaintext gossip: %v, %+v", err, a.Sealed)
	}
	if got := a.Ready().Gossip; len(got) != 0 {
		t.Errorf("refused gossip handed up: %+v", got)
	}
	// Heartbeats keep flowing, sealed, and the connection stays up.
	n.run(40)
	for _, m := range []*Machine{a, b} {
		if cs := m.Status().Connections; len(cs) != 1 || cs[0].State != "established" {
			t.Fatalf("after 40 ticks: %+v\n%s", cs, n.dump())
		}
	}
}

func TestSecurePasswordRefusals(t *testing.T) {
	for _, tc := range []struct {
		name       string
		pwA, pwB   string // a is dialled, b dials; "" is no password
		wantA      handshake.PasswordProblem
		wantB      handshake.PasswordProblem
		aLearnsB   bool // whether a's events may name b (only without a password on b's side)
		wantReject proto.RejectCode
	}{
		{"mismatch", "one", "two", handshake.Mismatch, handshake.Mismatch, false, proto.RejectPasswordMismatch},
		{"dialler lacks", "one", "", handshake.TheyLack, handshake.WeLack, true, proto.RejectNeedPassword},
		{"responder lacks", "", "two", handshake.WeLack, handshake.TheyLack, false, proto.RejectNoPassword},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNet(t)
			cfg := func(seed uint64, pw string) *secure.Config {
				if pw == "" {
					return nil
				}
				return secureConfig(t, seed, pw)
			}
			a := n.addWith(1, 0xa, 1, testRange, cfg(1, tc.pwA))
			b := n.addWith(2, 0xb, 2, testRange, cfg(2, tc.pwB))
			var rejects []proto.Reject
			n.tap = func(from, to netip.Addr, msg []byte) bool {
				if msg[1] == byte(proto.TypeReject) {
					rj, err := proto.ParseReject(msg)
					if err != nil {
						t.Errorf("reject does not parse: %v", err)
					}
					rejects = append(rejects, rj)
				}
				return true
			}
			b.Connect([]string{addr(1).String()})
			ev := collect(n, 30)
			if got := refusals(ev[0]); len(got) == 0 || got[0] != tc.wantA {
				t.Errorf("a reports %v, want %v", got, tc.wantA)
			}
			if got := refusals(ev[1]); len(got) == 0 || got[0] != tc.wantB {
				t.Errorf("b reports %v, want %v", got, tc.wantB)
			}
			for _, m := range []*Machine{a, b} {
				for _, c := range m.Status().Connections {
					if c.State == "established" || c.State == "pending" || c.RetryNever {
						t.Errorf("%+v", c)
					}
				}
			}
			if len(rejects) == 0 {
				t.Fatal("no reject sent")
			}
			for _, rj := range rejects {
				// Nothing in a password refusal tells the refused side
				// who we are or what range we use.
				if rj.Code != tc.wantReject || rj.Name != 0 || rj.Range.IsValid() || rj.Message != "" {
					t.Errorf("reject %+v", rj)
				}
			}
			for _, e := range ev[1] {
				if e.Peer == 0xa || e.Nick == "h1" {
					t.Errorf("b learnt a's identity: %+v", e)
				}
			}
			if !tc.aLearnsB {
				for _, e := range ev[0] {
					if e.Peer == 0xb || e.Nick == "h2" {
						t.Errorf("a learnt b's identity: %+v", e)
					}
				}
			}
		})
	}
}

// TestSecureCrossedDials: both peers dial each other at once; exactly one
// session results and gossip opens both ways.
func TestSecureCrossedDials(t *testing.T) {
	n, a, b := secureMesh(t, "pw", "pw")
	a.Connect([]string{addr(2).String()})
	n.run(3)
	for _, m := range []*Machine{a, b} {
		if cs := m.Status().Connections; len(cs) != 1 || cs[0].State != "established" || !cs[0].Outbound {
			t.Fatalf("%+v\n%s", cs, n.dump())
		}
	}
	for _, d := range []struct {
		from, to *Machine
		src      proto.PeerName
		at       int
	}{{a, b, 0xa, 1}, {b, a, 0xb, 2}} {
		g, _ := proto.AppendGossip(nil, &proto.Gossip{Channel: "topology", Src: d.src, Payload: []byte("x")})
		sealed, ok := d.from.Seal(ep(3-d.at), g)
		if !ok {
			t.Fatal("no session")
		}
		if err := d.to.Step(ep(d.at), sealed); err != nil {
			t.Errorf("gossip from %v: %v", d.src, err)
		}
	}
	n.run(40)
	for _, m := range []*Machine{a, b} {
		if cs := m.Status().Connections; len(cs) != 1 || cs[0].State != "established" {
			t.Fatalf("after 40 ticks: %+v\n%s", cs, n.dump())
		}
	}
}

// TestSecureReplayedHandshake: an old init and finish, replayed from the
// peer's own address after it is connected, open no new session and leave
// the live one alone.
func TestSecureReplayedHandshake(t *testing.T) {
	n, a, b := secureMesh(t, "pw", "pw")
	var inits, finishes [][]byte
	n.tap = func(from, to netip.Addr, msg []byte) bool {
		switch proto.Type(msg[1]) {
		case proto.TypeInit:
			inits = append(inits, append([]byte(nil), msg...))
		case proto.TypeFinish:
			finishes = append(finishes, append([]byte(nil), msg...))
		}
		return true
	}
	n.run(2)
	if len(inits) != 2 || len(finishes) != 1 {
		t.Fatalf("%d inits, %d finishes", len(inits), len(finishes))
	}
	n.tap = nil
	before := a.Status().Connections[0]
	for _, msg := range [][]byte{inits[1], finishes[0]} {
		a.Step(ep(2), msg)
	}
	rd := a.Ready()
	if len(rd.Events) != 0 {
		t.Errorf("replay caused events: %+v", rd.Events)
	}
	if a.Sealed.Handshake != 1 {
		// The replayed init was answered (its cookie is still good), so
		// the finish meets a handshake with other keys and fails.
		t.Errorf("the replayed finish was not refused: %+v", a.Sealed)
	}
	// The answer to the replayed init goes to b, which is not dialling and
	// drops it.
	n.deliver()
	n.run(30)
	after := a.Status().Connections[0]
	if after.State != "established" || after.Name != before.Name {
		t.Errorf("before %+v, after %+v\n%s", before, after, n.dump())
	}
	// The session is the one the real handshake opened: b's gossip opens.
	g, _ := proto.AppendGossip(nil, &proto.Gossip{Channel: "topology", Src: 0xb, Payload: []byte("x")})
	if sealed, ok := b.Seal(ep(1), g); !ok {
		t.Error("b has no session")
	} else if err := a.Step(ep(2), sealed); err != nil {
		t.Errorf("b's gossip after the replay: %v", err)
	}
	if cs := b.Status().Connections; len(cs) != 1 || cs[0].State != "established" {
		t.Errorf("b: %+v", cs)
	}
}

// TestSecureSpoofedSource: an init whose cookie was made for another
// address gets only a cookie back, smaller than the init, and no state.
func TestSecureSpoofedSource(t *testing.T) {
	n, a, _ := secureMesh(t, "pw", "pw")
	var withCookie []byte
	n.tap = func(from, to netip.Addr, msg []byte) bool {
		if proto.Type(msg[1]) == proto.TypeInit {
			if in, _ := proto.ParseInit(msg); in.Cookie != (proto.Cookie{}) {
				withCookie = append([]byte(nil), msg...)
			}
		}
		return true
	}
	n.run(2)
	a.Advance()
	spoofed := Endpoint{Remote: netip.MustParseAddrPort("192.168.0.66:6783")}
	if err := a.Step(spoofed, withCookie); err != nil {
		t.Fatal(err)
	}
	rd := a.Ready()
	if len(rd.Sends) != 1 || proto.Type(rd.Sends[0].Msg[1]) != proto.TypeCookie || len(rd.Sends[0].Msg) >= len(withCookie) {
		t.Fatalf("answer to a spoofed init: %+v", rd.Sends)
	}
	if len(a.responding) != 0 || len(a.Status().Connections) != 1 {
		t.Errorf("state kept for a spoofed source: %d handshakes, %+v", len(a.responding), a.Status().Connections)
	}
}

// TestSecureLostFinish: the finish is lost once; the dialler sends it
// again with its heartbeats and both sides establish.
func TestSecureLostFinish(t *testing.T) {
	n, a, b := secureMesh(t, "pw", "pw")
	lost := false
	n.tap = func(from, to netip.Addr, msg []byte) bool {
		if proto.Type(msg[1]) == proto.TypeFinish && !lost {
			lost = true
			return false
		}
		return true
	}
	n.run(10)
	for _, m := range []*Machine{a, b} {
		if cs := m.Status().Connections; len(cs) != 1 || cs[0].State != "established" {
			t.Fatalf("%+v\n%s", cs, n.dump())
		}
	}
	if !lost {
		t.Fatal("no finish went out")
	}
}

// TestSecureRestart: a peer restarted with a new UID and a new key is
// accepted again through a fresh handshake.
func TestSecureRestart(t *testing.T) {
	n, a, b := secureMesh(t, "pw", "pw")
	n.run(5)
	n.addWith(1, 0xa, 99, testRange, secureConfig(t, 3, "pw"))
	_ = a
	n.run(60)
	if n.connState(b, targetOf(1)) != "established" {
		t.Fatalf("not re-established:\n%s", n.dump())
	}
	if uid := b.Status().Peers[1].UID; uid != 99 {
		t.Errorf("b knows UID %d, want the new incarnation's", uid)
	}
}

// TestSecureSpoofedName: a member with the password but its own key claims
// a connected peer's name from another address. It is refused with a
// KeyError; the real peer's connection stays.
func TestSecureSpoofedName(t *testing.T) {
	n, a, b := secureMesh(t, "pw", "pw")
	n.run(5)
	spoof := n.addWith(3, 0xa, 7, testRange, secureConfig(t, 3, "pw"))
	if err := spoof.Connect([]string{addr(2).String()}); err != nil {
		t.Fatal(err)
	}
	n.run(20)
	var refused bool
	for _, e := range n.events[addr(2)] {
		var ke *KeyError
		refused = refused || e.Kind == EventRefused && errors.As(e.Err, &ke) && e.Endpoint == ep(3).Remote.String()
	}
	if !refused {
		t.Errorf("b did not refuse the spoofed name:\n%s", n.dump())
	}
	var toA []string
	for _, c := range b.Status().Connections {
		if c.Name == 0xa {
			toA = append(toA, c.Address+" "+c.State)
		}
	}
	if len(toA) != 1 || toA[0] != ep(1).Remote.String()+" established" {
		t.Errorf("b's connections to the name 0xa: %v\n%s", toA, n.dump())
	}
	_ = a
}

// TestSecureTrustedSubnets: data goes in clear only where each side
// trusts the other's address; one-sided trust, or none, keeps it
// encrypted, and plaintext mode has no such thing.
func TestSecureTrustedSubnets(t *testing.T) {
	all := []netip.Prefix{netip.PrefixFrom(addr(1), 24)}
	for _, c := range []struct {
		name         string
		trustA       []netip.Prefix
		trustB       []netip.Prefix
		noPassword   bool
		wantPlain    bool
		wantSentFlag [2]bool // a trusts b, b trusts a, as each hello said
	}{
		{"mutual", all, all, false, true, [2]bool{true, true}},
		{"only the dialled side trusts", all, nil, false, false, [2]bool{true, false}},
		{"only the dialler trusts", nil, all, false, false, [2]bool{false, true}},
		{"another subnet", all, []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}, false, false, [2]bool{true, false}},
		{"no password", all, all, true, false, [2]bool{false, false}},
	} {
		t.Run(c.name, func(t *testing.T) {
			n := newNet(t)
			var sa, sb *secure.Config
			if !c.noPassword {
				sa, sb = secureConfig(t, 1, "pw"), secureConfig(t, 2, "pw")
			}
			a := n.addWith(1, 0xa, 1, testRange, sa)
			b := n.addWith(2, 0xb, 2, testRange, sb)
			a.cfg.Trusted, b.cfg.Trusted = c.trustA, c.trustB
			if err := b.Connect([]string{addr(1).String()}); err != nil {
				t.Fatal(err)
			}
			n.run(2)
			for i, m := range []*Machine{a, b} {
				cs := m.Status().Connections
				if len(cs) != 1 || cs[0].State != "established" {
					t.Fatalf("%+v\n%s", cs, n.dump())
				}
				if cs[0].Plaintext != c.wantPlain {
					t.Errorf("machine %d: status says plaintext %v, want %v", i, cs[0].Plaintext, c.wantPlain)
				}
				m.reroute()
				if ps := m.rd.Routing.Peers; len(ps) != 1 || ps[0].Plaintext != c.wantPlain {
					t.Errorf("machine %d: routing %+v, want plaintext %v", i, ps, c.wantPlain)
				}
			}
			// What each side heard the other say.
			for i, heard := range []bool{b.conn[ep(1).Remote].remote.Trusted, a.conn[ep(2).Remote].remote.Trusted} {
				if heard != c.wantSentFlag[i] {
					t.Errorf("hello %d: trusted %v, want %v", i, heard, c.wantSentFlag[i])
				}
			}
		})
	}
}
