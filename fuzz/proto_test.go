package fuzz

import (
	"bytes"
	"net/netip"
	"reflect"
	"testing"

	"github.com/overlayd/overlayd/peering"
	"github.com/overlayd/overlayd/peering/gossip"
	"github.com/overlayd/overlayd/proto"
)

var (
	seedName  = proto.PeerName(0x12d2fe7ac1f2)
	seedRange = netip.MustParsePrefix("172.16.16.0/24")
)

func seedHello(t proto.Type) []byte {
	return proto.AppendHello(nil, t, &proto.Hello{MinVersion: 1, MaxVersion: 1, Name: seedName, UID: 42,
		Port: 6783, Range: seedRange, Nickname: "host1"})
}

func seedGossip() []byte {
	b, _ := proto.AppendGossip(nil, &proto.Gossip{Channel: "topology", Src: seedName, Payload: []byte{1, 0, 0, 0, 2, 1, 2, 3, 4, 5, 6, 7, 8}})
	return b
}

func seedData() []byte {
	b := make([]byte, proto.DataHeaderLen, 64)
	proto.PutDataHeader(b, seedName, 7)
	return append(b, 0x45, 0, 0, 20, 0, 0, 0, 0, 64, 6, 0, 0, 10, 40, 0, 1, 10, 40, 0, 2)
}

// addSeeds gives every datagram target the same corpus: one valid message of
// each type and some near misses.
func addSeeds(f *testing.F) {
	for _, b := range [][]byte{
		seedHello(proto.TypeHello), seedHello(proto.TypeAccept),
		// A password-mode accept with every optional field: data port,
		// signing key and the trusted flag.
		proto.AppendHello(nil, proto.TypeAccept, &proto.Hello{MinVersion: 1, MaxVersion: 1, Name: seedName, UID: 42,
			Port: 6783, Range: seedRange, Nickname: "host1", DataPort: 6784, SignKey: [32]byte{5}, Trusted: true}),
		proto.AppendReject(nil, &proto.Reject{Code: proto.RejectRange, Name: seedName, Range: seedRange, Message: "no"}),
		proto.AppendHeartbeat(nil, proto.Heartbeat{Name: seedName, UID: 42, Established: true}),
		seedGossip(), seedData(),
		proto.AppendInit(nil, &proto.Init{Configured: true, Cookie: proto.Cookie{1, 2}, Handshake: bytes.Repeat([]byte{7}, 80)}),
		proto.AppendCookie(nil, proto.Cookie{3}),
		proto.AppendHandshake(nil, proto.TypeResponse, bytes.Repeat([]byte{8}, 120)),
		proto.AppendHandshake(nil, proto.TypeFinish, bytes.Repeat([]byte{9}, 64)),
		append(proto.AppendSealedHead(nil, 5), bytes.Repeat([]byte{10}, 40)...),
		nil, {1}, {1, 1, 0, 0}, {2, 1, 0, 0}, {1, 9, 0, 0}, {1, 6, 0, 0, 0, 0, 0, 0, 0, 1},
	} {
		f.Add(b)
	}
}

func FuzzProtoHeader(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := proto.ParseHeader(b)
		if err == nil && (h.Version != proto.Version || h.Type < proto.TypeHello || h.Type > proto.TypeMax) {
			t.Fatalf("accepted header %+v", h)
		}
	})
}

func FuzzProtoHello(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := proto.ParseHello(b)
		if err != nil {
			return
		}
		again, err := proto.ParseHello(proto.AppendHello(nil, proto.Type(b[1]), &h))
		if err != nil || !reflect.DeepEqual(again, h) {
			t.Fatalf("round trip: %+v -> %+v, %v", h, again, err)
		}
	})
}

func FuzzProtoReject(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := proto.ParseReject(b)
		if err != nil {
			return
		}
		again, err := proto.ParseReject(proto.AppendReject(nil, &r))
		if err != nil || !reflect.DeepEqual(again, r) {
			t.Fatalf("round trip: %+v -> %+v, %v", r, again, err)
		}
	})
}

func FuzzProtoHeartbeat(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := proto.ParseHeartbeat(b)
		if err != nil {
			return
		}
		again, err := proto.ParseHeartbeat(proto.AppendHeartbeat(nil, h))
		if err != nil || again != h {
			t.Fatalf("round trip: %+v -> %+v, %v", h, again, err)
		}
	})
}

func FuzzProtoGossip(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		g, err := proto.ParseGossip(b)
		if err != nil {
			return
		}
		enc, err := proto.AppendGossip(nil, &g)
		if err != nil {
			t.Fatalf("cannot re-encode accepted gossip %+v: %v", g, err)
		}
		// Gossip has no trailing data: only the ignored flags and
		// reserved bytes may differ.
		if !bytes.Equal(enc[4:], b[4:]) || enc[0] != b[0] || enc[1] != b[1] {
			t.Fatalf("round trip changed the message:\n% x\n% x", b, enc)
		}
	})
}

func FuzzProtoData(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		src, dst, pkt, err := proto.ParseData(b)
		if err != nil {
			return
		}
		if len(pkt) != len(b)-proto.DataHeaderLen {
			t.Fatalf("packet of %d bytes from a message of %d", len(pkt), len(b))
		}
		c := bytes.Clone(b)
		proto.PutDataHeader(c, src, dst)
		if !bytes.Equal(c[4:], b[4:]) {
			t.Fatalf("header round trip changed the message")
		}
	})
}

func FuzzProtoPeerName(f *testing.F) {
	for _, s := range []string{"12:d2:fe:7a:c1:f2", "::1", "1::", "1::1", "::", "1:2:3:4:5:6:7", "zz", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := proto.ParsePeerName(s)
		if err != nil {
			return
		}
		again, err := proto.ParsePeerName(n.String())
		if err != nil || again != n || n == 0 || n>>48 != 0 {
			t.Fatalf("%q -> %v -> %v, %v", s, n, again, err)
		}
	})
}

func FuzzPeeringTarget(f *testing.F) {
	for _, s := range []string{"10.0.0.1", "10.0.0.1:6783", "[fd00::1]:7", "fd00::1", "host", "host:1", "host:0", ":1", "a b", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		h, p, err := peering.ParseTarget(s)
		if err != nil {
			return
		}
		if h == "" || p == 0 {
			t.Fatalf("%q -> %q %d", s, h, p)
		}
		h2, p2, err := peering.ParseTarget(joinHostPort(h, p))
		if err != nil || h2 != h || p2 != p {
			t.Fatalf("%q -> %q:%d -> %q:%d, %v", s, h, p, h2, p2, err)
		}
	})
}

func FuzzProtoTopology(f *testing.F) {
	for _, m := range []proto.TopoMsg{
		{Kind: proto.TopoHash, Count: 3, Hash: 42},
		{Kind: proto.TopoDigestReply, Digest: []proto.TopoDigestItem{{Name: seedName, UID: 1, Version: 2}}},
		{Kind: proto.TopoEntries, Entries: []proto.TopoPeer{{Name: seedName, UID: 1, Version: 1, Nickname: "a",
			Conns:    []proto.TopoConn{{Peer: 7, Addr: netip.MustParseAddrPort("10.0.0.1:6783"), Established: true}},
			Prefixes: []netip.Prefix{netip.MustParsePrefix("10.40.0.1/32")}}}},
		{Kind: proto.TopoSignedEntries, Entries: []proto.TopoPeer{{Name: seedName, UID: 1, Version: 1, Nickname: "a",
			Key: [32]byte{1}, Sig: [64]byte{2}}, {Name: 9, UID: 2, Version: proto.MaxTopoVersion}}},
	} {
		b, _ := proto.AppendTopoMsg(nil, &m)
		f.Add(b)
	}
	f.Add([]byte{4, 0, 9})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := proto.ParseTopoMsg(b)
		if err != nil {
			return
		}
		m.Skipped = 0 // the entries left out are not re-encoded
		enc, err := proto.AppendTopoMsg(nil, &m)
		if err != nil {
			t.Fatalf("cannot re-encode %+v: %v", m, err)
		}
		again, err := proto.ParseTopoMsg(enc)
		if err != nil || !reflect.DeepEqual(again, m) {
			t.Fatalf("round trip: %v\n%+v\n%+v", err, m, again)
		}
		if proto.TopoMsgSize(&m) != len(enc) {
			t.Fatalf("TopoMsgSize %d, encoded %d", proto.TopoMsgSize(&m), len(enc))
		}
	})
}

// FuzzGossipAssembler feeds chunks decoded from fuzzed datagrams to an
// Assembler: whatever arrives, memory stays within the limits.
func FuzzGossipAssembler(f *testing.F) {
	c, _ := proto.AppendGossip(nil, &proto.Gossip{Channel: "topology", Src: 1, Chunk: &proto.Chunk{MsgID: 1, Index: 0, Count: 2}, Payload: []byte("ab")})
	d, _ := proto.AppendGossip(nil, &proto.Gossip{Channel: "topology", Src: 1, Chunk: &proto.Chunk{MsgID: 1, Index: 1, Count: 2}, Payload: []byte("cd")})
	f.Add(append(append([]byte{byte(len(c))}, c...), d...))
	f.Fuzz(func(t *testing.T, b []byte) {
		a := gossip.NewAssembler()
		for now := int64(0); len(b) > 1; now++ {
			n := min(int(b[0]), len(b)-1)
			g, err := proto.ParseGossip(b[1 : 1+n])
			b = b[1+n:]
			if err != nil || g.Chunk == nil {
				continue
			}
			out, _ := a.Add(&g, proto.PeerName(n%3+1), now) // three neighbours
			if len(out) > gossip.MaxMessageBytes {
				t.Fatalf("reassembled %d bytes", len(out))
			}
			if a.Pending() > gossip.MaxPartial {
				t.Fatalf("%d pending", a.Pending())
			}
		}
	})
}
