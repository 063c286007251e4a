package fuzz

import (
	"crypto/ed25519"
	"math/rand/v2"
	"testing"

	"github.com/overlayd/overlayd/peering/topology"
	"github.com/overlayd/overlayd/proto"
)

func fuzzSigner(seed byte) (*topology.Signer, ed25519.PrivateKey) {
	s := make([]byte, ed25519.SeedSize)
	s[0] = seed
	priv := ed25519.NewKeyFromSeed(s)
	return &topology.Signer{Key: [proto.TopoKeyLen]byte(priv.Public().(ed25519.PublicKey)),
		Sign: func(m []byte) [proto.TopoSigLen]byte { return [proto.TopoSigLen]byte(ed25519.Sign(priv, m)) }}, priv
}

// FuzzTopologySigned feeds a signed-mode topology Node, which knows its
// neighbour 2 and, through it, peer 3, a fuzzed message from neighbour 2:
// whatever it holds afterwards verifies under the key its peer is known
// by, and 3's key and entry are still 3's.
func FuzzTopologySigned(f *testing.F) {
	s3, _ := fuzzSigner(3)
	genuine := proto.TopoPeer{Name: 3, UID: 30, Version: 4, Port: 6783,
		Conns: []proto.TopoConn{{Peer: 2, Established: true}}}
	genuine.Key = s3.Key
	msg, _ := proto.TopoSigned(&genuine)
	genuine.Sig = s3.Sign(msg)
	forged := genuine
	forged.Version = 9
	sm, _ := fuzzSigner(66)
	forged.Key = sm.Key
	msg, _ = proto.TopoSigned(&forged)
	forged.Sig = sm.Sign(msg)
	for _, m := range []proto.TopoMsg{
		{Kind: proto.TopoSignedEntries, Entries: []proto.TopoPeer{genuine}},
		{Kind: proto.TopoSignedEntries, Entries: []proto.TopoPeer{forged}},
		{Kind: proto.TopoEntries, Entries: []proto.TopoPeer{{Name: 3, UID: 30, Version: 9}}},
		{Kind: proto.TopoDigestRequest, Digest: []proto.TopoDigestItem{{Name: 3, UID: 30, Version: 1}}},
	} {
		b, _ := proto.AppendTopoMsg(nil, &m)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := proto.ParseTopoMsg(b)
		if err != nil {
			return
		}
		s1, _ := fuzzSigner(1)
		s2, _ := fuzzSigner(2)
		n, err := topology.New(topology.Config{Self: 1, UID: 10, Port: 6783, Rand: rand.New(rand.NewPCG(1, 2)), Signer: s1})
		if err != nil {
			t.Fatal(err)
		}
		n.Prove(map[proto.PeerName][proto.TopoKeyLen]byte{2: s2.Key})
		n.SetLocal([]proto.TopoConn{{Peer: 2, Established: true}}, nil)
		if err := n.Step(2, 20, &proto.TopoMsg{Kind: proto.TopoSignedEntries, Entries: []proto.TopoPeer{genuine}}); err != nil {
			t.Fatal(err)
		}
		n.Step(2, 20, &m)
		for _, e := range n.Peers() {
			k, ok := n.KeyOf(e.Name)
			signed, err := proto.TopoSigned(e)
			if !ok || e.Key != k || err != nil || !ed25519.Verify(e.Key[:], signed, e.Sig[:]) {
				t.Fatalf("holds an entry of %v that does not verify under its key", e.Name)
			}
		}
		if k, _ := n.KeyOf(3); k != s3.Key {
			t.Fatalf("3 is known by another key")
		}
	})
}
