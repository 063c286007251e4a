package fuzz

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/overlayd/overlayd/peering/handshake"
	"github.com/overlayd/overlayd/peering/link"
	"github.com/overlayd/overlayd/peering/secure"
	"github.com/overlayd/overlayd/proto"
)

// FuzzSecureFraming: the password-mode decoders accept only what their
// encoders would write back the same.
func FuzzSecureFraming(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		if in, err := proto.ParseInit(b); err == nil {
			if again := proto.AppendInit(nil, &in); !bytes.Equal(again[:2], b[:2]) || !bytes.Equal(again[4:], b[4:]) {
				t.Fatalf("init round trip: %x -> %x", b, again)
			}
		}
		// Flags and byte 3 are ignored on receipt: compare the rest.
		if c, err := proto.ParseCookie(b); err == nil && !bytes.Equal(proto.AppendCookie(nil, c)[4:], b[4:proto.CookieMsgLen]) {
			t.Fatalf("cookie round trip: %x", b)
		}
		for _, ty := range []proto.Type{proto.TypeResponse, proto.TypeFinish} {
			if hs, err := proto.ParseHandshake(b, ty); err == nil && !bytes.Equal(proto.AppendHandshake(nil, ty, hs)[4:], b[4:]) {
				t.Fatalf("%v round trip: %x", ty, b)
			}
		}
		if n, ad, ct, err := proto.ParseSealed(b); err == nil {
			if len(ct) < proto.SealTagLen || !bytes.Equal(proto.AppendSealedHead(nil, n)[4:], ad[4:]) {
				t.Fatalf("sealed framing: %x", b)
			}
		}
	})
}

// sessions runs one real handshake, deterministically, and returns the
// dialler's and the responder's sessions.
func sessions(tb testing.TB) (*secure.Session, *secure.Session) {
	psk := secure.PSK{1}
	cfg := func(seed byte) *secure.Config {
		r := rand.NewChaCha8([32]byte{seed})
		id, _ := secure.NewIdentity(r)
		return &secure.Config{Identity: id, PSK: psk, Random: r}
	}
	ini, m1, err := secure.Initiate(cfg(1), []byte("a"))
	if err != nil {
		tb.Fatal(err)
	}
	resp, _, err := secure.Respond(cfg(2), m1)
	if err != nil {
		tb.Fatal(err)
	}
	m2, _ := resp.Answer([]byte("b"))
	if _, err := ini.ReadResponse(m2); err != nil {
		tb.Fatal(err)
	}
	m3, sa, _ := ini.Finish()
	sb, err := resp.ReadFinish(m3)
	if err != nil {
		tb.Fatal(err)
	}
	return sa, sb
}

// FuzzSealedOpen: nothing opens but what the peer sealed.
func FuzzSealedOpen(f *testing.F) {
	sa, sb := sessions(f)
	var genuine [][]byte
	for i := range 4 {
		m, _ := sa.Seal(nil, []byte{byte(i), 'x', 'y'})
		genuine = append(genuine, m)
		f.Add(m)
	}
	addSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		s := *sb // a fresh replay window for every input
		out, err := s.Open(nil, b)
		if err != nil {
			return
		}
		for i, g := range genuine {
			if bytes.Equal(g, b) && bytes.Equal(out, []byte{byte(i), 'x', 'y'}) {
				return
			}
		}
		t.Fatalf("opened a message nobody sealed: %x -> %x", b, out)
	})
}

// FuzzHandshakeMachine feeds a password-mode link Machine a stream of
// datagrams (each a 2-byte length and its bytes, from one of two
// endpoints by the length's top bit) with ticks between them. It must not
// panic, must keep its handshake state bounded, and must admit nobody: no
// input can carry the password it does not know.
func FuzzHandshakeMachine(f *testing.F) {
	r := rand.NewChaCha8([32]byte{9})
	id, _ := secure.NewIdentity(r)
	sec := secure.Config{Identity: id, PSK: secure.PSK{2}, Random: r}
	// Seeds: the datagrams of a dialler with another password, which the
	// machine must refuse, and the usual corpus.
	dialler, _ := link.New(link.Config{Self: handshake.Config{Name: 0xb, UID: 2, Port: 6783},
		Rand: rand.New(rand.NewPCG(1, 2)), Secure: &secure.Config{Identity: id, PSK: secure.PSK{3}, Random: rand.NewChaCha8([32]byte{4})}})
	dialler.Connect([]string{"192.0.2.1"})
	dialler.Tick()
	var stream []byte
	for _, d := range dialler.Ready().Sends {
		stream = binary.BigEndian.AppendUint16(stream, uint16(len(d.Msg)))
		stream = append(stream, d.Msg...)
	}
	f.Add(stream)
	addSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		cfg := sec
		cfg.Random = rand.NewChaCha8([32]byte{5})
		m, err := link.New(link.Config{Self: handshake.Config{Name: 0xa, UID: 1, Port: 6783},
			Rand: rand.New(rand.NewPCG(3, 4)), Secure: &cfg, MaxPendingInbound: 4})
		if err != nil {
			t.Fatal(err)
		}
		m.Connect([]string{"192.0.2.2"})
		eps := [2]link.Endpoint{{Remote: netip.MustParseAddrPort("192.0.2.2:6783")}, {Remote: netip.MustParseAddrPort("192.0.2.3:6783")}}
		for len(b) >= 2 {
			n := int(binary.BigEndian.Uint16(b))
			from := eps[n>>15]
			n &= 0x7fff
			b = b[2:]
			if n > len(b) {
				n = len(b)
			}
			m.Step(from, b[:n])
			b = b[n:]
			m.Tick()
			m.Advance()
		}
		for _, c := range m.Status().Connections {
			if c.State == "established" || c.State == "pending" && c.Name != 0 {
				t.Fatalf("admitted without the password: %+v", c)
			}
		}
	})
}
