package proto

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"net/netip"
	"os"
	"reflect"
	"strings"
	"testing"
)

// goldenMessages are the messages whose bytes testdata/golden.txt pins.
func goldenMessages(t *testing.T) map[string][]byte {
	t.Helper()
	name := PeerName(0x12d2fe7ac1f2)
	rng := netip.MustParsePrefix("172.16.16.0/24")
	hello := Hello{MinVersion: 1, MaxVersion: 1, Name: name, UID: 0x0102030405060708,
		Port: 6783, Range: rng, Nickname: "host1"}
	gossip, err := AppendGossip(nil, &Gossip{Channel: "addresses", Src: name, Dst: 0, Payload: []byte{0xaa, 0xbb}})
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, DataHeaderLen, DataHeaderLen+20)
	PutDataHeader(data, name, PeerName(0x7e214a702f45))
	data = append(data, 0x45, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0, 172, 16, 16, 1, 172, 16, 16, 2)
	chunked, err := AppendGossip(nil, &Gossip{Channel: "topology", Src: name, Dst: 7, Hops: 1,
		Chunk: &Chunk{MsgID: 0x01020304, Index: 1, Count: 3}, Payload: []byte{0xcc}})
	if err != nil {
		t.Fatal(err)
	}
	topo, err := AppendTopoMsg(nil, &TopoMsg{Kind: TopoEntries, Entries: []TopoPeer{{
		Name: name, UID: 9, Version: 2, Port: 6783, Nickname: "h1",
		Conns:    []TopoConn{{Peer: 0x7e214a702f45, Addr: netip.MustParseAddrPort("192.168.0.2:6783"), Outbound: true, Established: true}},
		Prefixes: []netip.Prefix{netip.MustParsePrefix("172.16.16.1/32")},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	signedEntry := TopoPeer{Name: name, UID: 9, Version: 2, Port: 6783, Nickname: "h1"}
	for i := range signedEntry.Key {
		signedEntry.Key[i] = 0xaa
	}
	for i := range signedEntry.Sig {
		signedEntry.Sig[i] = 0xbb
	}
	topoSigned, err := AppendTopoMsg(nil, &TopoMsg{Kind: TopoSignedEntries, Entries: []TopoPeer{signedEntry}})
	if err != nil {
		t.Fatal(err)
	}
	digest, err := AppendTopoMsg(nil, &TopoMsg{Kind: TopoDigestRequest, Digest: []TopoDigestItem{{Name: name, UID: 9, Version: 2}}})
	if err != nil {
		t.Fatal(err)
	}
	hash, _ := AppendTopoMsg(nil, &TopoMsg{Kind: TopoHash, Count: 2, Hash: 0x1122334455667788})
	ipam := func(m IPAMMsg) []byte {
		b, err := AppendIPAMMsg(nil, &m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	other := PeerName(0xe6b190cdda76)
	ringMsg := ipam(IPAMMsg{Kind: IPAMRing, Reply: true, Ring: Ring{Range: rng, Seeds: []PeerName{name, other},
		Entries: []RingEntry{{Token: 0xac101000, Peer: name, Version: 1, Free: 127}, {Token: 0xac101080, Peer: other, Version: 3, Free: 96}}}})
	paxos := ipam(IPAMMsg{Kind: IPAMPaxos, Paxos: []PaxosClaims{{Node: PaxosNode{Name: name, UID: 9},
		Promise:  ProposalID{Round: 2, Proposer: PaxosNode{Name: other, UID: 7}},
		Accepted: ProposalID{Round: 2, Proposer: PaxosNode{Name: other, UID: 7}},
		Origin:   ProposalID{Round: 2, Proposer: PaxosNode{Name: other, UID: 7}},
		Value:    []PeerName{name, other}}}})
	names := func(m NamesMsg) []byte {
		b, err := AppendNamesMsg(nil, &m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	return map[string][]byte{
		"names-entries": names(NamesMsg{Kind: NamesEntries, Entries: []NameEntry{
			{Hostname: "web1.weave.local.", Addr: netip.MustParseAddr("172.16.16.1"), ContainerID: "c1", Origin: name, Version: 1},
			{Hostname: "db.weave.local.", Addr: netip.MustParseAddr("172.16.16.2"), ContainerID: "weave:extern", Origin: other,
				Version: 3, Tombstone: true, AgeMillis: 60000}}}),
		"names-digest": names(NamesMsg{Kind: NamesDigest, Echo: true, Digests: []NameDigest{
			{Origin: name, Hash: 0x1122334455667788}, {Origin: other, Hash: 0x99aabbccddeeff00}}}),
		"names-summary":      names(NamesMsg{Kind: NamesSummary, Hash: 0x1122334455667788}),
		"ipam-ring":          ringMsg,
		"ipam-paxos":         paxos,
		"ipam-ring-request":  ipam(IPAMMsg{Kind: IPAMRingRequest}),
		"ipam-space-request": ipam(IPAMMsg{Kind: IPAMSpaceRequest, Start: 0xac101000, Last: 0xac1010ff}),
		"ipam-space-denied":  ipam(IPAMMsg{Kind: IPAMSpaceDenied, Start: 0xac1010e0, Last: 0xac1010e0}),
		"ipam-digest":        ipam(IPAMMsg{Kind: IPAMDigest, Hash: 0x1122334455667788, Echo: true}),
		"ipam-hold-check":    ipam(IPAMMsg{Kind: IPAMHoldCheck, Start: 0xac1010e0, Last: 0xac1010ff, Hash: 0x1122334455667788}),
		"ipam-hold-ack":      ipam(IPAMMsg{Kind: IPAMHoldAck, Start: 0xac1010e0, Last: 0xac1010ff, Hash: 0x1122334455667788}),
		"gossip-chunk":       chunked,
		"topo-entries":       topo,
		"topo-signed":        topoSigned,
		"topo-digest":        digest,
		"topo-hash":          hash,
		"hello":              AppendHello(nil, TypeHello, &hello),
		"accept-no-range":    AppendHello(nil, TypeAccept, &Hello{MinVersion: 1, MaxVersion: 2, Name: 1, UID: 1, Port: 1}),
		"reject":             AppendReject(nil, &Reject{Code: RejectRange, Name: name, Range: rng, Message: "no"}),
		"heartbeat":          AppendHeartbeat(nil, Heartbeat{Name: name, UID: 9, Established: true}),
		"gossip":             gossip,
		"data":               data,
		"init":               AppendInit(nil, &Init{Configured: true, Cookie: Cookie{1, 2, 3}, Handshake: []byte{0xaa, 0xbb}}),
		"cookie":             AppendCookie(nil, Cookie{0xc0, 0xff, 0xee}),
		"response":           AppendHandshake(nil, TypeResponse, []byte{0xaa}),
		"finish":             AppendHandshake(nil, TypeFinish, []byte{0xbb}),
		"sealed":             append(AppendSealedHead(nil, 0x0102), make([]byte, SealTagLen)...),
		"reject-password":    AppendReject(nil, &Reject{Code: RejectPasswordMismatch}),
	}
}

// TestGolden checks every message's bytes against testdata/golden.txt, whose
// lines are "name hex".
func TestGolden(t *testing.T) {
	f, err := os.Open("testdata/golden.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, _ := strings.Cut(line, " ")
		want[k] = strings.ReplaceAll(v, " ", "")
	}
	got := goldenMessages(t)
	if len(got) != len(want) {
		t.Errorf("golden file has %d vectors, test has %d", len(want), len(got))
	}
	for k, b := range got {
		if h := hex.EncodeToString(b); h != want[k] {
			t.Errorf("%s:\n got %s\nwant %s", k, h, want[k])
		}
	}
}

func TestPacketAddrs(t *testing.T) {
	v4 := make([]byte, 20)
	v4[0] = 0x45
	copy(v4[12:], []byte{10, 0, 0, 1})
	copy(v4[16:], []byte{10, 0, 0, 2})
	v6 := make([]byte, 40)
	v6[0] = 0x60
	v6[23], v6[39] = 1, 2
	for _, c := range []struct {
		pkt      []byte
		src, dst string
	}{
		{v4, "10.0.0.1", "10.0.0.2"},
		{v6, "::1", "::2"},
		{v4[:19], "invalid IP", "invalid IP"},
		{[]byte{0x20}, "invalid IP", "invalid IP"},
		{nil, "invalid IP", "invalid IP"},
	} {
		s, _ := SrcAddr(c.pkt)
		d, _ := DstAddr(c.pkt)
		if s.String() != c.src || d.String() != c.dst {
			t.Errorf("% x: %v -> %v, want %s -> %s", c.pkt, s, d, c.src, c.dst)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	hello := Hello{MinVersion: 1, MaxVersion: 3, Name: 0xabcdef012345, UID: 42, Port: 9,
		Range: netip.MustParsePrefix("10.32.0.0/12"), Nickname: "ünïcode"}
	got, err := ParseHello(AppendHello(nil, TypeAccept, &hello))
	if err != nil || !reflect.DeepEqual(got, hello) {
		t.Errorf("hello: got %+v, %v; want %+v", got, err, hello)
	}
	hello.DataPort = 6784
	b := AppendHello(nil, TypeAccept, &hello) // unpadded: its fields end the message
	if got, err := ParseHello(b); err != nil || !reflect.DeepEqual(got, hello) {
		t.Errorf("hello with a data port: got %+v, %v; want %+v", got, err, hello)
	}
	hello.SignKey = [32]byte{1, 2, 3}
	if got, err := ParseHello(AppendHello(nil, TypeHello, &hello)); err != nil || !reflect.DeepEqual(got, hello) {
		t.Errorf("hello with a signing key: got %+v, %v; want %+v", got, err, hello)
	}
	hello.Trusted = true
	tb := AppendHello(nil, TypeAccept, &hello)
	if got, err := ParseHello(tb); err != nil || !reflect.DeepEqual(got, hello) {
		t.Errorf("hello with trust: got %+v, %v; want %+v", got, err, hello)
	}
	tb[len(tb)-1] = 0xfe // later flags, not ours
	if got, err := ParseHello(tb); err != nil || got.Trusted || got.SignKey != hello.SignKey {
		t.Errorf("hello with other flags: got %+v, %v", got, err)
	}
	hello.Trusted = false
	hello.SignKey = [32]byte{}
	// One byte of a data port is a later field we do not know: ignored.
	if got, err := ParseHello(b[:len(b)-1]); err != nil || got.DataPort != 0 {
		t.Errorf("hello with a cut data port: got %+v, %v", got, err)
	}
	signed := TopoMsg{Kind: TopoSignedEntries, Entries: []TopoPeer{{Name: 1, UID: 2, Version: 3, Key: [32]byte{4}, Sig: [64]byte{5}},
		{Name: 6, UID: 7, Version: MaxTopoVersion, Key: [32]byte{8}}, {Name: 9, UID: 10, Version: 11, Key: [32]byte{12}, Sig: [64]byte{13}}}}
	sb, err := AppendTopoMsg(nil, &signed)
	if err != nil || len(sb) != TopoMsgSize(&signed) {
		t.Fatalf("signed entries: %d bytes (size says %d), %v", len(sb), TopoMsgSize(&signed), err)
	}
	if got, err := ParseTopoMsg(sb); err != nil || got.Skipped != 1 || len(got.Entries) != 2 ||
		got.Entries[0].Key != signed.Entries[0].Key || got.Entries[1].Sig != signed.Entries[2].Sig {
		t.Errorf("signed entries: got %+v, %v", got, err)
	}
	if _, err := ParseTopoMsg(sb[:len(sb)-1]); err == nil {
		t.Error("signed entries cut short parsed")
	}
	rej := Reject{Code: RejectCollision, Name: 5, Message: "local and remote peer names collision"}
	if got, err := ParseReject(AppendReject(nil, &rej)); err != nil || !reflect.DeepEqual(got, rej) {
		t.Errorf("reject: got %+v, %v; want %+v", got, err, rej)
	}
	hb := Heartbeat{Name: 3, UID: 4}
	if got, err := ParseHeartbeat(AppendHeartbeat(nil, hb)); err != nil || got != hb {
		t.Errorf("heartbeat: got %+v, %v", got, err)
	}
	g := Gossip{Channel: "topology", Src: 1, Dst: 2, Payload: []byte("x")}
	b, err = AppendGossip(nil, &g)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := ParseGossip(b); err != nil || !reflect.DeepEqual(got, g) {
		t.Errorf("gossip: got %+v, %v", got, err)
	}
}

func TestLongNicknameIsCut(t *testing.T) {
	h := Hello{MinVersion: 1, MaxVersion: 1, Name: 1, UID: 1, Nickname: strings.Repeat("é", 40)}
	got, err := ParseHello(AppendHello(nil, TypeHello, &h))
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Nickname) != 64 || got.Nickname != strings.Repeat("é", 32) {
		t.Errorf("nickname %q (%d bytes)", got.Nickname, len(got.Nickname))
	}
}

func TestDecodersRejectMalformed(t *testing.T) {
	msgs := goldenMessages(t)
	for _, tc := range []struct {
		name  string
		input []byte
		parse func([]byte) error
		want  error
	}{
		{"empty header", nil, hdr, ErrShort},
		{"wrong version", []byte{2, 1, 0, 0}, hdr, ErrVersion},
		{"type zero", []byte{1, 0, 0, 0}, hdr, ErrType},
		{"type twelve", []byte{1, 12, 0, 0}, hdr, ErrType},
		{"hello truncated", msgs["hello"][:20], hello, ErrShort},
		{"hello nickname cut", msgs["hello"][:helloFixedLen+4], hello, ErrShort},
		{"hello as reject", msgs["hello"], reject, ErrType},
		{"hello zero name", patch(msgs["hello"], 6, 0, 0, 0, 0, 0, 0), hello, ErrMalform},
		{"hello zero uid", patch(msgs["hello"], 12, 0, 0, 0, 0, 0, 0, 0, 0), hello, ErrMalform},
		{"hello inverted versions", patch(msgs["hello"], 4, 3, 1), hello, ErrMalform},
		{"hello prefix 33", patch(msgs["hello"], 26, 33), hello, ErrMalform},
		{"hello nickname 65", patch(msgs["hello"], 27, 65), hello, ErrMalform},
		{"hello bad utf8", patch(msgs["hello"], 28, 0xff), hello, ErrMalform},
		{"reject code 0", patch(msgs["reject"], 4, 0), reject, ErrMalform},
		{"reject truncated", msgs["reject"][:10], reject, ErrShort},
		{"heartbeat truncated", msgs["heartbeat"][:17], heartbeat, ErrShort},
		{"gossip channel 0", patch(msgs["gossip"], 4, 0), gossip, ErrMalform},
		{"gossip channel 200", patch(msgs["gossip"], 4, 200), gossip, ErrMalform},
		{"gossip channel space", patch(msgs["gossip"], 5, ' '), gossip, ErrMalform},
		{"gossip zero origin", patch(msgs["gossip"], 14, 0, 0, 0, 0, 0, 0), gossip, ErrMalform},
		{"data short", msgs["data"][:15], data, ErrShort},
		{"data not ip", patch(msgs["data"], 16, 0x25), data, ErrMalform},
		{"data ip cut", msgs["data"][:30], data, ErrMalform},
		{"data wrong type", patch(msgs["data"], 1, 5), data, ErrType},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.parse(tc.input); !errors.Is(err, tc.want) {
				t.Errorf("got %v, want %v", err, tc.want)
			}
		})
	}
}

func patch(b []byte, at int, with ...byte) []byte {
	c := bytes.Clone(b)
	copy(c[at:], with)
	return c
}

func hdr(b []byte) error       { _, err := ParseHeader(b); return err }
func hello(b []byte) error     { _, err := ParseHello(b); return err }
func reject(b []byte) error    { _, err := ParseReject(b); return err }
func heartbeat(b []byte) error { _, err := ParseHeartbeat(b); return err }
func gossip(b []byte) error    { _, err := ParseGossip(b); return err }
func data(b []byte) error      { _, _, _, err := ParseData(b); return err }

func TestPeerNames(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want PeerName
		err  bool
	}{
		{"12:d2:fe:7a:c1:f2", 0x12d2fe7ac1f2, false},
		{"::1", 1, false},
		{"1::", 0x010000000000, false},
		{"1::1", 0x010000000001, false},
		{"a:b:c:d:e:f", 0x0a0b0c0d0e0f, false},
		{"00:00:00:00:00:00", 0, true},
		{"::", 0, true},
		{"1::2::3", 0, true},
		{"1:2:3:4:5", 0, true},
		{"1:2:3:4:5:6:7", 0, true},
		{"123:2:3:4:5:6", 0, true},
		{"g:2:3:4:5:6", 0, true},
		{"1:2::3:4:5:6", 0, true},
		{"", 0, true},
		{"+1:2:3:4:5:6", 0, true},
	} {
		got, err := ParsePeerName(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParsePeerName(%q) = %v, %v", tc.in, got, err)
		}
		if err == nil && got.String() != normal(tc.want) {
			t.Errorf("String = %s", got)
		}
	}
	if n := PeerNameFromBytes([6]byte{0xff, 0, 0, 0, 0, 0}); n.String() != "fe:00:00:00:00:00" {
		t.Errorf("PeerNameFromBytes: %v", n)
	}
	if n := PeerNameFromBytes([6]byte{}); n == 0 {
		t.Error("PeerNameFromBytes returned the zero name")
	}
}

func normal(n PeerName) string {
	b := make([]byte, 8)
	for i := range 6 {
		b[2+i] = byte(n >> (40 - 8*i))
	}
	parts := make([]string, 6)
	for i := range 6 {
		parts[i] = hex.EncodeToString(b[2+i : 3+i])
	}
	return strings.Join(parts, ":")
}

func TestDataPathAllocatesNothing(t *testing.T) {
	buf := goldenMessages(t)["data"]
	allocs := testing.AllocsPerRun(1000, func() {
		PutDataHeader(buf, 1, 2)
		if _, _, p, err := ParseData(buf); err != nil || len(p) != 20 {
			t.Fatal(err)
		}
		if _, ok := DstAddr(buf[DataHeaderLen:]); !ok {
			t.Fatal("no dst")
		}
	})
	if allocs != 0 {
		t.Errorf("%v allocations per packet", allocs)
	}
}

// TestHelloPadding: a hello is padded to HelloMinLen and reads back the
// same; no accept or reject, at their largest, is longer than that; a
// proof in an accept and a heartbeat round-trips.
func TestHelloPadding(t *testing.T) {
	h := Hello{MinVersion: 1, MaxVersion: 1, Name: 1, UID: 2, Range: netip.MustParsePrefix("10.32.0.0/12"), Nickname: "x"}
	b := AppendHello(nil, TypeHello, &h)
	if got, err := ParseHello(b); len(b) != HelloMinLen || err != nil || !reflect.DeepEqual(got, h) {
		t.Errorf("padded hello: %d bytes, %+v, %v", len(b), got, err)
	}
	big := Hello{MinVersion: 1, MaxVersion: 1, Name: 1, UID: 2, Nickname: strings.Repeat("n", MaxNicknameLen),
		DataPort: 1, SignKey: [32]byte{1}, Trusted: true, Proof: 1 << 60}
	acc := AppendHello(nil, TypeAccept, &big)
	if got, err := ParseHello(acc); err != nil || !reflect.DeepEqual(got, big) {
		t.Errorf("accept with a proof: %+v, %v", got, err)
	}
	rej := AppendReject(nil, &Reject{Code: RejectOther, Name: 1, Message: strings.Repeat("m", 300)})
	if len(acc) > HelloMinLen || len(rej) > HelloMinLen {
		t.Errorf("the largest accept is %d bytes and reject %d, more than a hello's %d", len(acc), len(rej), HelloMinLen)
	}
	hb := Heartbeat{Name: 1, UID: 2, Established: true, Proof: 99}
	if got, err := ParseHeartbeat(AppendHeartbeat(nil, hb)); err != nil || got != hb {
		t.Errorf("heartbeat with a proof: %+v, %v", got, err)
	}
}
