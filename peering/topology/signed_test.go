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
	refused("a copy of ours by another key", signedEntries(sign(t, entry(1, 100, 50), 66)))

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
