package secure

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/overlayd/overlayd/proto"
)

func config(t *testing.T, seed byte, psk PSK) *Config {
	t.Helper()
	r := rand.NewChaCha8([32]byte{seed})
	id, err := NewIdentity(r)
	if err != nil {
		t.Fatal(err)
	}
	return &Config{Identity: id, PSK: psk, Random: r}
}

// handshake runs a whole handshake between a and b and returns both
// sessions and the three messages.
func handshake(t *testing.T, a, b *Config) (*Session, *Session, [3][]byte) {
	t.Helper()
	var msgs [3][]byte
	ini, m1, err := Initiate(a, []byte("hello from a"))
	if err != nil {
		t.Fatal(err)
	}
	msgs[0] = m1
	resp, hello, err := Respond(b, m1)
	if err != nil {
		t.Fatal(err)
	}
	if string(hello) != "hello from a" {
		t.Fatalf("b read %q", hello)
	}
	if msgs[1], err = resp.Answer([]byte("accept from b")); err != nil {
		t.Fatal(err)
	}
	if hello, err = ini.ReadResponse(msgs[1]); err != nil || string(hello) != "accept from b" {
		t.Fatalf("a read %q, %v", hello, err)
	}
	m3, sa, err := ini.Finish()
	if err != nil {
		t.Fatal(err)
	}
	msgs[2] = m3
	sb, err := resp.ReadFinish(m3)
	if err != nil {
		t.Fatal(err)
	}
	return sa, sb, msgs
}

func TestHandshake(t *testing.T) {
	psk := DeriveKey([]byte("correct horse"))
	a, b := config(t, 1, psk), config(t, 2, psk)
	sa, sb, _ := handshake(t, a, b)
	if sa.Peer() != b.Identity.Public || sb.Peer() != a.Identity.Public {
		t.Error("the sessions do not name each other's keys")
	}
	for i := range 3 {
		msg, err := sa.Seal(nil, []byte{byte(i), 'a'})
		if err != nil {
			t.Fatal(err)
		}
		got, err := sb.Open(nil, msg)
		if err != nil || !bytes.Equal(got, []byte{byte(i), 'a'}) {
			t.Fatalf("b opened %q, %v", got, err)
		}
		back, _ := sb.Seal(nil, []byte("b"))
		if got, err := sa.Open(nil, back); err != nil || string(got) != "b" {
			t.Fatalf("a opened %q, %v", got, err)
		}
	}
	// Each direction has its own key: a's own message does not open at a.
	own, _ := sa.Seal(nil, []byte("x"))
	if _, err := sa.Open(nil, own); !errors.Is(err, ErrForged) {
		t.Errorf("own message opened: %v", err)
	}
}

func TestWrongOrMissingPassword(t *testing.T) {
	a := config(t, 1, DeriveKey([]byte("one")))
	for name, b := range map[string]*Config{
		"other password": config(t, 2, DeriveKey([]byte("two"))),
		"empty password": config(t, 2, DeriveKey(nil)),
	} {
		_, m1, err := Initiate(a, []byte("secret hello"))
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(m1, []byte("secret hello")) {
			t.Fatal("the hello travels in the clear")
		}
		if _, _, err := Respond(b, m1); !errors.Is(err, ErrPassword) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if DeriveKey([]byte("one")) != a.PSK || DeriveKey([]byte("one")) == DeriveKey([]byte("one ")) {
		t.Error("the key derivation is not a function of the password")
	}
}

// TestTamperedHandshake flips every byte of every handshake message in
// turn: each altered message is refused, and the handshake then still
// completes with the real one (a forgery spoils nothing).
func TestTamperedHandshake(t *testing.T) {
	psk := DeriveKey([]byte("pw"))
	a, b := config(t, 1, psk), config(t, 2, psk)
	ini, m1, _ := Initiate(a, []byte("hi"))
	for i := range m1 {
		bad := bytes.Clone(m1)
		bad[i] ^= 0x40
		if _, _, err := Respond(b, bad); err == nil {
			t.Fatalf("init with byte %d altered accepted", i)
		}
	}
	if _, _, err := Respond(b, m1[:20]); !errors.Is(err, ErrHandshake) {
		t.Errorf("short init: %v", err)
	}
	resp, _, err := Respond(b, m1)
	if err != nil {
		t.Fatal(err)
	}
	m2, _ := resp.Answer([]byte("ok"))
	for i := range m2 {
		bad := bytes.Clone(m2)
		bad[i] ^= 0x40
		if _, err := ini.ReadResponse(bad); err == nil {
			t.Fatalf("response with byte %d altered accepted", i)
		}
	}
	if _, err := ini.ReadResponse(m2); err != nil {
		t.Fatalf("the real response after forgeries: %v", err)
	}
	m3, sa, _ := ini.Finish()
	for i := range m3 {
		bad := bytes.Clone(m3)
		bad[i] ^= 0x40
		if _, err := resp.ReadFinish(bad); err == nil {
			t.Fatalf("finish with byte %d altered accepted", i)
		}
	}
	sb, err := resp.ReadFinish(m3)
	if err != nil {
		t.Fatalf("the real finish after forgeries: %v", err)
	}
	msg, _ := sa.Seal(nil, []byte("x"))
	if _, err := sb.Open(nil, msg); err != nil {
		t.Error(err)
	}
}

// TestReplayedHandshake: a recorded first message, replayed, is answered
// by a new responder whose keys match nothing; the recorded finish does
// not complete it, and a third party without the initiator's keys cannot.
func TestReplayedHandshake(t *testing.T) {
	psk := DeriveKey([]byte("pw"))
	a, b := config(t, 1, psk), config(t, 2, psk)
	_, _, msgs := handshake(t, a, b)
	resp, _, err := Respond(b, msgs[0])
	if err != nil {
		t.Fatal(err) // the first message alone proves nothing: it is answered
	}
	if _, err := resp.Answer(nil); err != nil {
		t.Fatal(err)
	}
	if _, err := resp.ReadFinish(msgs[2]); !errors.Is(err, ErrHandshake) {
		t.Errorf("recorded finish completed a replayed handshake: %v", err)
	}
	// An attacker who knows the password but not a's key cannot finish
	// as a either: the static key it sends is its own.
	m := config(t, 9, psk)
	ini, m1, _ := Initiate(m, []byte("I am a"))
	resp, _, _ = Respond(b, m1)
	m2, _ := resp.Answer(nil)
	ini.ReadResponse(m2)
	m3, _, _ := ini.Finish()
	sb, err := resp.ReadFinish(m3)
	if err != nil || sb.Peer() == a.Identity.Public {
		t.Errorf("the session names key %v, %v", sb.Peer(), err)
	}
}

func TestOutOfTurn(t *testing.T) {
	psk := PSK{1}
	a, b := config(t, 1, psk), config(t, 2, psk)
	ini, m1, _ := Initiate(a, nil)
	if _, _, err := ini.Finish(); !errors.Is(err, ErrHandshake) {
		t.Errorf("finish before the response: %v", err)
	}
	resp, _, _ := Respond(b, m1)
	if _, err := resp.ReadFinish(m1); !errors.Is(err, ErrHandshake) {
		t.Errorf("finish before the answer: %v", err)
	}
}

// TestReplayWindow: messages may arrive out of order within the window,
// never twice, and never from behind it.
func TestReplayWindow(t *testing.T) {
	psk := PSK{1}
	sa, sb, _ := handshake(t, config(t, 1, psk), config(t, 2, psk))
	var msgs [][]byte
	for i := range 9000 {
		m, _ := sa.Seal(nil, []byte{byte(i)})
		msgs = append(msgs, m)
	}
	for _, i := range []int{5, 3, 4, 0} { // reordered
		if _, err := sb.Open(nil, msgs[i]); err != nil {
			t.Errorf("message %d: %v", i, err)
		}
	}
	if _, err := sb.Open(nil, msgs[3]); !errors.Is(err, ErrReplayed) {
		t.Errorf("message 3 again: %v", err)
	}
	if _, err := sb.Open(nil, msgs[8999]); err != nil {
		t.Fatal(err)
	}
	if _, err := sb.Open(nil, msgs[10]); !errors.Is(err, ErrReplayed) {
		t.Errorf("message 10, from behind the window: %v", err)
	}
	if _, err := sb.Open(nil, msgs[8990]); err != nil {
		t.Errorf("message 8990, inside the window: %v", err)
	}
	// A forgery does not move the window: 8991 still opens after a
	// forged message with a far higher counter.
	forged := bytes.Clone(msgs[8998])
	forged[proto.HeaderLen] = 0x7f
	if _, err := sb.Open(nil, forged); !errors.Is(err, ErrForged) {
		t.Errorf("forged counter: %v", err)
	}
	if _, err := sb.Open(nil, msgs[8991]); err != nil {
		t.Errorf("message 8991 after a forgery: %v", err)
	}
	if _, err := sb.Open(nil, msgs[0][:proto.SealedHeadLen+proto.SealTagLen-1]); !errors.Is(err, proto.ErrShort) {
		t.Errorf("short: %v", err)
	}
}

func TestCookies(t *testing.T) {
	r := rand.NewChaCha8([32]byte{7})
	c, err := NewCookies(r)
	if err != nil {
		t.Fatal(err)
	}
	ep := netip.MustParseAddrPort("192.0.2.1:6783")
	other := netip.MustParseAddrPort("192.0.2.1:6784")
	k := c.Make(ep)
	if !c.Valid(ep, k) || c.Valid(other, k) || c.Valid(ep, proto.Cookie{}) {
		t.Error("a cookie is valid for its address only")
	}
	c.Rotate(r)
	if !c.Valid(ep, k) {
		t.Error("a cookie outlives one rotation")
	}
	c.Rotate(r)
	if c.Valid(ep, k) {
		t.Error("a cookie dies at the second rotation")
	}
}

func TestIdentityText(t *testing.T) {
	id, err := NewIdentity(rand.NewChaCha8([32]byte{3}))
	if err != nil {
		t.Fatal(err)
	}
	back, err := ParseIdentity(id.MarshalText())
	if err != nil || back != id {
		t.Fatalf("%v, %v", back, err)
	}
	for _, bad := range []string{"", "short", "AAAA\n", string(id.MarshalText()) + "x"} {
		if _, err := ParseIdentity([]byte(bad)); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}
