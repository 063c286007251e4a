package names_test

import (
	"crypto/ed25519"
	"errors"
	"net/netip"
	"slices"
	"testing"

	"github.com/overlayd/overlayd/names"
	"github.com/overlayd/overlayd/proto"
)

// keys are the peers' signing keys in these tests.
var keys = map[proto.PeerName]ed25519.PrivateKey{}

func keyFor(name proto.PeerName) ed25519.PrivateKey {
	if k, ok := keys[name]; ok {
		return k
	}
	seed := make([]byte, ed25519.SeedSize)
	seed[0], seed[1] = byte(name), byte(name>>8)
	keys[name] = ed25519.NewKeyFromSeed(seed)
	return keys[name]
}

// signed configures a store for password mode: it signs with name's key
// and knows the keys of known (others are not known yet).
func signed(name proto.PeerName, known ...proto.PeerName) func(*names.Config) {
	return func(c *names.Config) {
		priv := keyFor(name)
		c.Sign = func(m []byte) [proto.NameSigLen]byte { return [proto.NameSigLen]byte(ed25519.Sign(priv, m)) }
		c.Verify = func(origin proto.PeerName, m []byte, sig [proto.NameSigLen]byte) bool {
			if origin != name && !slices.Contains(known, origin) {
				return false
			}
			return ed25519.Verify(keyFor(origin).Public().(ed25519.PublicKey), m, sig[:])
		}
	}
}

// signEntry signs e with signer's key.
func signEntry(t *testing.T, e proto.NameEntry, signer proto.PeerName) proto.NameEntry {
	t.Helper()
	msg, err := proto.NameSigned(&e)
	if err != nil {
		t.Fatal(err)
	}
	e.Sig = [proto.NameSigLen]byte(ed25519.Sign(keyFor(signer), msg))
	return e
}

// TestSignedEntries: in password mode a store signs its entries and sends
// them as signed entries; it takes an entry only signed by its origin's
// key: a tombstone or an entry made up by a relay, a tampered copy, an
// unsigned message and an entry of an origin whose key is not known are
// refused and counted, and the names they aimed at stay.
func TestSignedEntries(t *testing.T) {
	a := newStore(t, peerA, nil, signed(peerA, peerB))
	b := newStore(t, peerB, nil, signed(peerB, peerA))
	for _, s := range []*names.Store{a, b} {
		s.SetReachable([]proto.PeerName{peerA, peerB, peerC})
	}
	if _, err := a.Add("web", ip("10.0.0.1"), "c1"); err != nil {
		t.Fatal(err)
	}
	msgs := drain(t, a)
	if len(msgs) != 1 || msgs[0].Msg.Kind != proto.NamesSignedEntries {
		t.Fatalf("a sent %+v", msgs)
	}
	if err := b.Step(peerA, &msgs[0].Msg); err != nil {
		t.Fatal(err)
	}
	live := func() bool { return slices.Equal(b.View().Lookup("web.weave.local."), []netip.Addr{ip("10.0.0.1")}) }
	if !live() {
		t.Fatalf("b does not resolve a's signed name")
	}
	genuine := msgs[0].Msg.Entries[0]

	forgeries := map[string]proto.NamesMsg{}
	tomb := genuine
	tomb.Version, tomb.Tombstone = genuine.Version+5, true
	forgeries["a tombstone signed by a relay"] = proto.NamesMsg{Kind: proto.NamesSignedEntries,
		Entries: []proto.NameEntry{signEntry(t, tomb, peerC)}}
	tampered := tomb
	tampered.Sig = genuine.Sig
	forgeries["a tombstone with the live entry's signature"] = proto.NamesMsg{Kind: proto.NamesSignedEntries, Entries: []proto.NameEntry{tampered}}
	forgeries["a tombstone signed by a's key, for another address"] = proto.NamesMsg{Kind: proto.NamesSignedEntries,
		Entries: []proto.NameEntry{func() proto.NameEntry { e := signEntry(t, tomb, peerA); e.Addr = ip("10.0.0.9"); return e }()}}
	forgeries["an unsigned tombstone"] = proto.NamesMsg{Kind: proto.NamesEntries, Entries: []proto.NameEntry{tomb}}
	for what, m := range forgeries {
		before := b.Stats().Forged
		err := b.Step(peerC, &m)
		if b.Stats().Forged == before || (m.Kind == proto.NamesEntries && !errors.Is(err, names.ErrUnsigned)) {
			t.Errorf("%s: not refused (err %v)", what, err)
		}
		if !live() {
			t.Fatalf("%s: took a's name away", what)
		}
	}
	// An origin whose key b does not know yet: refused, to come again.
	c := entry("db.weave.local.", "10.0.0.3", "c3", peerC, 1, false, 0)
	before := b.Stats().Forged
	b.Step(peerA, &proto.NamesMsg{Kind: proto.NamesSignedEntries, Entries: []proto.NameEntry{signEntry(t, c, peerC)}})
	if b.Stats().Forged != before+1 || len(b.View().Lookup("db.weave.local.")) != 0 {
		t.Errorf("an entry of an origin with no known key was taken")
	}
	// a's real tombstone goes through.
	if _, err := a.Delete("web", ip("10.0.0.1"), "c1"); err != nil {
		t.Fatal(err)
	}
	for _, m := range drain(t, a) {
		if err := b.Step(peerA, &m.Msg); err != nil {
			t.Fatal(err)
		}
	}
	if live() {
		t.Error("a's own tombstone was not taken")
	}
}

// TestSignedOwnCopies: a copy of one of our entries signed by a key we no
// longer have (an earlier run of ours, before our state was lost) is not
// refused: we answer it with a tombstone of ours, signed now, so that the
// stale name goes everywhere.
func TestSignedOwnCopies(t *testing.T) {
	a := newStore(t, peerA, nil, signed(peerA, peerB))
	a.SetReachable([]proto.PeerName{peerA, peerB})
	stale := signEntry(t, entry("old.weave.local.", "10.0.0.7", "c7", peerA, 3, false, 0), peerC) // "our old key"
	if err := a.Step(peerB, &proto.NamesMsg{Kind: proto.NamesSignedEntries, Entries: []proto.NameEntry{stale}}); err != nil {
		t.Fatal(err)
	}
	var answer []proto.NameEntry
	for _, m := range drain(t, a) {
		answer = append(answer, m.Msg.Entries...)
	}
	if len(answer) != 1 || !answer[0].Tombstone || answer[0].Version != 4 || answer[0].Hostname != "old.weave.local." {
		t.Fatalf("a answered %+v", answer)
	}
	msg, _ := proto.NameSigned(&answer[0])
	if !ed25519.Verify(keyFor(peerA).Public().(ed25519.PublicKey), msg, answer[0].Sig[:]) {
		t.Error("the tombstone is not signed with a's current key")
	}
}
