package topology

import (
	"crypto/ed25519"
	"errors"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/overlayd/overlayd/proto"
)

// signer is a deterministic Ed25519 signer from seed.
func signer(seed byte) (*Signer, ed25519.PrivateKey) {
	s := make([]byte, ed25519.SeedSize)
	s[0] = seed
	priv := ed25519.NewKeyFromSeed(s)
	return &Signer{Key: [proto.TopoKeyLen]byte(priv.Public().(ed25519.PublicKey)),
		Sign: func(m []byte) [proto.TopoSigLen]byte { return [proto.TopoSigLen]byte(ed25519.Sign(priv, m)) }}, priv
}

func signedNode(t *testing.T, self proto.PeerName, uid uint64, seed byte) *Node {
	t.Helper()
	s, _ := signer(seed)
	n, err := New(Config{Self: self, UID: uid, Port: 6783, Rand: rand.New(rand.NewPCG(1, uid)), Signer: s})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// sign makes e an entry signed by the key of seed.
func sign(t *testing.T, e proto.TopoPeer, seed byte) proto.TopoPeer {
	t.Helper()
	s, _ := signer(seed)
	e.Key = s.Key
	msg, err := proto.TopoSigned(&e)
	if err != nil {
		t.Fatal(err)
	}
	e.Sig = s.Sign(msg)
	return e
}

func signedEntries(es ...proto.TopoPeer) *proto.TopoMsg {
	return &proto.TopoMsg{Kind: proto.TopoSignedEntries, Entries: es}
}

// TestSignedEntries: in signed mode an entry is taken only with a valid
// signature by the key its peer is known by; unsigned, tampered and
// re-keyed entries are refused and counted; a neighbour's proven key wins
// over an entry taken first; a key may change once the old entry is gone.
func TestSignedEntries(t *testing.T) {
	n := signedNode(t, 1, 100, 1)
	n.SetLocal([]proto.TopoConn{conn(2, true)}, nil)
	if k, _ := n.KeyOf(1); n.Peer(1).Key != k || n.Peer(1).Sig == ([proto.TopoSigLen]byte{}) {
		t.Fatalf("our own entry is not signed: %+v", n.Peer(1))
	}
	n.Advance()
	n.SetLocal([]proto.TopoConn{conn(2, true), conn(3, true)}, nil)
	for _, m := range n.Ready().Msgs {
		if m.Msg.Kind != proto.TopoSignedEntries && m.Msg.Kind != proto.TopoHash {
			t.Errorf("signed mode sent a message of kind %d", m.Msg.Kind)
		}
	}

	good := sign(t, entry(3, 300, 5, conn(1, true)), 3)
	if err := n.Step(2, 200, signedEntries(good)); err != nil || n.Peer(3) == nil {
		t.Fatalf("a well signed entry: %v, %+v", err, n.Peer(3))
	}
	refused := func(what string, m *proto.TopoMsg) {
		t.Helper()
		before, rejected := n.Hash(), n.Rejected
		if err := n.Step(2, 200, m); !errors.Is(err, ErrSignature) || n.Rejected == rejected || n.Hash() != before {
			t.Errorf("%s: err %v, rejected %d -> %d, changed %v", what, err, rejected, n.Rejected, n.Hash() != before)
		}
	}
	// Peer 3's entry at a higher version, signed by another key: a relay
	// (or anyone) making up 3's entry.
	refused("another key", signedEntries(sign(t, entry(3, 300, 9), 66)))
	tampered := sign(t, entry(3, 300, 9, conn(1, true)), 3)
	tampered.Prefixes = append(tampered.Prefixes, netip.MustParsePrefix("10.40.0.2/32"))
	refused("tampered", signedEntries(tampered))
	refused("unsigned", entries(entry(3, 300, 9)))
	// A copy of our name under another key (an earlier run of ours with
	// other keys, or made up) is refused and answered with ours.
	n.Advance()
	refused("a copy of ours by another key", signedEntries(sign(t, entry(1, 99, 50), 66)))
	if ms := n.Ready().Msgs; len(ms) != 1 || ms[0].To != 2 || len(ms[0].Msg.Entries) != 1 || ms[0].Msg.Entries[0].UID != 100 {
		t.Errorf("the copy of ours was not answered with ours: %+v", ms)
	}

	// A neighbour proves another key than the entry we took: the entry
	// goes, and only entries under the proven key are taken.
	s4, _ := signer(4)
	n.Step(2, 200, signedEntries(sign(t, entry(4, 400, 1, conn(2, true)), 44)))
	if n.Peer(4) == nil {
		t.Fatal("first entry of 4 not taken")
	}
	n.Prove(map[proto.PeerName][proto.TopoKeyLen]byte{4: s4.Key})
	if n.Peer(4) != nil {
		t.Error("the entry under the unproven key stayed")
	}
	refused("a key the neighbour did not prove", signedEntries(sign(t, entry(4, 400, 2, conn(2, true)), 44)))
	if err := n.Step(2, 200, signedEntries(sign(t, entry(4, 400, 2, conn(2, true)), 4))); err != nil || n.Peer(4) == nil {
		t.Errorf("the proven key's entry: %v", err)
	}

	// Peer 3 gone (unreachable for two rounds): while its tomb lasts it
	// is taken back with its key only; then with a new key too.
	n.SetLocal([]proto.TopoConn{conn(2, true)}, nil)
	n.Step(2, 200, signedEntries(sign(t, entry(3, 300, 6), 3))) // 3 reports no connection: unreachable
	n.Tick()
	n.Tick()
	if n.Peer(3) != nil {
		t.Fatalf("3 not collected")
	}
	refused("a new key while the tomb lasts", signedEntries(sign(t, entry(3, 301, 1, conn(2, true)), 33)))
	for range TombRounds + 1 {
		n.Tick()
	}
	if err := n.Step(2, 200, signedEntries(sign(t, entry(3, 301, 1, conn(2, true)), 33))); err != nil || n.Peer(3) == nil {
		t.Errorf("a new key after the old entry and its tomb went: %v", err)
	}
}

// TestRekey: a peer known by one key comes back with another (its state
// lost). Its entry under the new key is taken, whatever its version, once
// the peers connected to it vouch for the new key and none for the old;
// not while one still vouches for the old, and never against a key a
// neighbour of ours proved.
func TestRekey(t *testing.T) {
	n := signedNode(t, 1, 100, 1)
	n.SetLocal([]proto.TopoConn{conn(2, true)}, nil)
	s2, _ := signer(2)
	n.Prove(map[proto.PeerName][proto.TopoKeyLen]byte{2: s2.Key})
	s3, _ := signer(3)
	s33, _ := signer(33)
	s4, _ := signer(4)
	vouch := func(p proto.PeerName, k [proto.TopoKeyLen]byte) proto.TopoConn {
		c := conn(p, true)
		c.Key = k
		return c
	}
	// 2 is connected to 3 and 4; 4 to 3.
	must := func(what string, es ...proto.TopoPeer) {
		t.Helper()
		if err := n.Step(2, 200, signedEntries(es...)); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	must("the mesh", sign(t, entry(2, 200, 5, vouch(1, [32]byte{}), vouch(3, s3.Key), vouch(4, s4.Key)), 2),
		sign(t, entry(3, 300, 9, conn(2, true), conn(4, true)), 3),
		sign(t, entry(4, 400, 1, conn(2, true), vouch(3, s3.Key)), 4))

	// 3 comes back with key 33, at version 1. 2 has reconnected and
	// vouches for the new key; 4 still for the old: refused.
	reborn := sign(t, entry(3, 301, 1, conn(2, true), conn(4, true)), 33)
	must("2 vouches for the new key", sign(t, entry(2, 200, 6, vouch(1, [32]byte{}), vouch(3, s33.Key), vouch(4, s4.Key)), 2))
	if err := n.Step(2, 200, signedEntries(reborn)); !errors.Is(err, ErrSignature) || n.Peer(3).UID != 300 {
		t.Fatalf("taken while 4 still vouches for the old key: %v, %+v", err, n.Peer(3))
	}
	// 4 reconnects too: the new key is vouched for alone.
	must("4 vouches for the new key", sign(t, entry(4, 400, 2, conn(2, true), vouch(3, s33.Key)), 4))
	must("the reborn entry", reborn)
	if e := n.Peer(3); e.UID != 301 || e.Key != s33.Key {
		t.Fatalf("3 is %+v", e)
	}
	// Entries under the old key are refused from now on.
	if err := n.Step(2, 200, signedEntries(sign(t, entry(3, 300, 10, conn(2, true)), 3))); !errors.Is(err, ErrSignature) {
		t.Errorf("the old key's entry: %v", err)
	}

	// A neighbour's proven key is never replaced by vouching.
	s5, _ := signer(5)
	n.Prove(map[proto.PeerName][proto.TopoKeyLen]byte{2: s2.Key, 5: s5.Key})
	s55, _ := signer(55)
	must("2 vouches for a made-up key of 5", sign(t, entry(2, 200, 7, vouch(1, [32]byte{}), vouch(3, s33.Key), vouch(4, s4.Key), vouch(5, s55.Key)), 2))
	if err := n.Step(2, 200, signedEntries(sign(t, entry(5, 500, 1, conn(2, true)), 55))); !errors.Is(err, ErrSignature) {
		t.Errorf("a proven key replaced: %v", err)
	}
}
