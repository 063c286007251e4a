package fuzz

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"net/netip"
	"reflect"
	"testing"

	"github.com/overlayd/overlayd/internal/ipv4"
	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/ipalloc/ring"
	"github.com/overlayd/overlayd/proto"
)

var (
	ipamRange = netip.MustParsePrefix("172.16.16.0/24")
	ipamPeers = []proto.PeerName{0x12d2fe7ac1f2, 0xaeafa6361837, 0xe6b190cdda76}
)

// ipamRing is a valid ring with some history: three seeds, a donation and
// free counts.
func ipamRing() *ring.Ring {
	r, err := ring.New(ipamRange)
	if err != nil {
		panic(err)
	}
	r.ClaimForPeers(ipamPeers)
	start, _ := ipv4.Bounds(ipamRange)
	if err := r.Grant(start+96, uint64(start)+128, ipamPeers[0], ipamPeers[2]); err != nil {
		panic(err)
	}
	r.ReportFree(ipamPeers[1], func(s uint32, e uint64) uint64 { return e - uint64(s) - 3 })
	return r
}

func encodeIPAM(m *proto.IPAMMsg) []byte {
	b, err := proto.AppendIPAMMsg(nil, m)
	if err != nil {
		panic(err)
	}
	return b
}

// ipamRingSeeds are ring messages: valid whole and partial rings that merge
// into ipamRing, and near misses.
func ipamRingSeeds() [][]byte {
	base := ipamRing()
	newer := base.Clone()
	start, _ := ipv4.Bounds(ipamRange)
	if err := newer.Grant(start+200, uint64(start)+208, ipamPeers[2], ipamPeers[1]); err != nil {
		panic(err)
	}
	newer.Transfer(ipamPeers[0], ipamPeers[1])
	partial := newer.Proto()
	partial.Entries = newer.Diff(base)
	empty, _ := ring.New(ipamRange)
	other, _ := ring.New(netip.MustParsePrefix("10.32.0.0/12"))
	other.ClaimForPeers(ipamPeers[:1])
	reseeded, _ := ring.New(ipamRange)
	reseeded.ClaimForPeers(ipamPeers[:2])
	bad := base.Proto()
	bad.Entries[1], bad.Entries[2] = bad.Entries[2], bad.Entries[1]
	return [][]byte{
		encodeIPAM(&proto.IPAMMsg{Kind: proto.IPAMRing, Ring: base.Proto()}),
		encodeIPAM(&proto.IPAMMsg{Kind: proto.IPAMRing, Ring: newer.Proto(), Reply: true}),
		encodeIPAM(&proto.IPAMMsg{Kind: proto.IPAMRing, Ring: partial, Partial: true}),
		encodeIPAM(&proto.IPAMMsg{Kind: proto.IPAMRing, Ring: empty.Proto()}),
		encodeIPAM(&proto.IPAMMsg{Kind: proto.IPAMRing, Ring: other.Proto()}),
		encodeIPAM(&proto.IPAMMsg{Kind: proto.IPAMRing, Ring: reseeded.Proto()}),
		encodeIPAM(&proto.IPAMMsg{Kind: proto.IPAMRing, Ring: bad}),
	}
}

// ipamSeeds gives a valid message of every kind and some near misses.
func ipamSeeds(f *testing.F) {
	for _, b := range ipamRingSeeds() {
		f.Add(b)
	}
	p := proto.ProposalID{Round: 3, Proposer: proto.PaxosNode{Name: ipamPeers[0], UID: 9}}
	for _, m := range []proto.IPAMMsg{
		{Kind: proto.IPAMPaxos, Paxos: []proto.PaxosClaims{
			{Node: proto.PaxosNode{Name: ipamPeers[0], UID: 9}, Promise: p, Accepted: p, Origin: p, Value: ipamPeers},
			{Node: proto.PaxosNode{Name: ipamPeers[1], UID: 4}, Promise: p},
		}},
		{Kind: proto.IPAMPaxos},
		{Kind: proto.IPAMRingRequest},
		{Kind: proto.IPAMSpaceRequest, Start: 0xac101000, Last: 0xac1010ff},
		{Kind: proto.IPAMSpaceDenied, Start: 7, Last: 7},
		{Kind: proto.IPAMDigest, Hash: 0x0123456789abcdef, Echo: true},
		{Kind: proto.IPAMDigest, Hash: 1},
		{Kind: proto.IPAMHoldCheck, Start: 0xac1010e0, Last: 0xac1010ff, Hash: 7},
		{Kind: proto.IPAMHoldAck, Start: 1, Last: 1, Hash: 8},
	} {
		f.Add(encodeIPAM(&m))
	}
	for _, b := range [][]byte{nil, {0}, {1}, {1, 4, 0, 0, 0, 0, 255, 0, 0}, {2, 0, 1}, {3, 0}, {4, 0, 0, 0, 2, 0, 0, 0, 1}, {6, 0, 0, 0, 0, 0, 0, 0, 0, 2}, {7}} {
		f.Add(b)
	}
}

// FuzzProtoIPAM: what ParseIPAMMsg accepts re-encodes to the same bytes
// and parses back to the same message.
func FuzzProtoIPAM(f *testing.F) {
	ipamSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := proto.ParseIPAMMsg(b)
		if err != nil {
			return
		}
		enc, err := proto.AppendIPAMMsg(nil, &m)
		if err != nil {
			t.Fatalf("cannot re-encode accepted %+v: %v", m, err)
		}
		if !bytes.Equal(enc, b) {
			t.Fatalf("round trip changed the message:\n% x\n% x", b, enc)
		}
		again, err := proto.ParseIPAMMsg(enc)
		if err != nil || !reflect.DeepEqual(again, m) {
			t.Fatalf("round trip: %v\n%+v\n%+v", err, m, again)
		}
	})
}

// ipamState is a valid saved state with addresses in and out of the range
// a hold and nicknames.
func ipamState() []byte {
	r := ipamRing()
	start, _ := ipv4.Bounds(ipamRange)
	b, err := ipalloc.MarshalState(&ipalloc.State{
		Self: ipamPeers[2],
		Ring: r.Proto(),
		Owned: []ipalloc.Owned{
			{Ident: "a1b2c3", Addr: netip.MustParsePrefix("172.16.16.97/24")},
			{Ident: "weave:expose", Addr: netip.MustParsePrefix("172.16.16.98/24")},
			{Ident: "m", Addr: netip.MustParsePrefix("1.1.1.1/24")},
		},
		Holds:     []ipalloc.Hold{{Start: start + 192, End: uint64(start) + 256}},
		Nicknames: []ipalloc.Nickname{{Peer: ipamPeers[0], Nickname: "host1"}, {Peer: ipamPeers[1], Nickname: "h2"}},
	})
	if err != nil {
		panic(err)
	}
	return b
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// FuzzIpallocState: ParseState never panics, and what it accepts survives
// MarshalState and ParseState unchanged. Each input is tried as it is and
// with its checksum made right, so that the fuzzer reaches the decoder
// behind the checksum.
func FuzzIpallocState(f *testing.F) {
	st := ipamState()
	f.Add(st)
	f.Add(st[:len(st)-1])
	f.Add(append(bytes.Clone(st), 0))
	empty, _ := ipalloc.MarshalState(&ipalloc.State{Self: ipamPeers[0], Ring: proto.Ring{Range: ipamRange}})
	f.Add(empty)
	start, _ := ipv4.Bounds(ipamRange)
	v3, _ := ipalloc.MarshalState(&ipalloc.State{Self: ipamPeers[0], Ring: ipamRing().Proto(),
		Holds:     []ipalloc.Hold{{Start: start + 192, End: uint64(start) + 256, InUse: true}},
		Takeovers: []ring.Span{{Start: start + 192, End: uint64(start) + 256, Peer: ipamPeers[1]}}})
	f.Add(v3)
	f.Add([]byte("OVLIPAM"))
	f.Fuzz(func(t *testing.T, b []byte) {
		try := func(b []byte) {
			s, err := ipalloc.ParseState(b)
			if err != nil {
				return
			}
			enc, err := ipalloc.MarshalState(s)
			if err != nil {
				t.Fatalf("cannot re-encode accepted state %+v: %v", s, err)
			}
			again, err := ipalloc.ParseState(enc)
			if err != nil || !reflect.DeepEqual(again, s) {
				t.Fatalf("round trip: %v\n%+v\n%+v", err, s, again)
			}
		}
		try(b)
		if len(b) >= 12 {
			for _, magic := range []string{"OVLIPAM\x01", "OVLIPAM\x02", "OVLIPAM\x03"} { // formats 1, 2 and 3
				c := bytes.Clone(b)
				copy(c, magic)
				binary.BigEndian.PutUint32(c[8:], crc32.Checksum(c[12:], castagnoli))
				try(c)
			}
		}
	})
}

// FuzzIpallocRingMerge merges a decoded ring message into a valid ring and
// into an empty one: a refused ring leaves the ring as it was; an accepted
// one leaves a valid ring, merging it again changes nothing, and a whole
// valid ring merges to the same result in either direction.
func FuzzIpallocRingMerge(f *testing.F) {
	for _, b := range ipamRingSeeds() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := proto.ParseIPAMMsg(b)
		if err != nil || m.Kind != proto.IPAMRing {
			return
		}
		empty, _ := ring.New(ipamRange)
		for _, r := range []*ring.Ring{ipamRing(), empty} {
			before := r.Clone()
			h := r.Hash()
			changed, err := r.Merge(&m.Ring, m.Partial)
			if err != nil {
				if changed || r.Hash() != h || !r.Equal(before) {
					t.Fatalf("refused merge (%v) changed the ring", err)
				}
				continue
			}
			if err := r.Check(); err != nil {
				t.Fatalf("merge left an invalid ring: %v", err)
			}
			p := r.Proto()
			if ring.HashProto(&p) != r.Hash() {
				t.Fatal("stale hash after a merge")
			}
			if changed == r.Equal(before) {
				t.Fatalf("merge reported changed=%v", changed)
			}
			after := r.Clone()
			if changed, err := r.Merge(&m.Ring, m.Partial); err != nil || changed || !r.Equal(after) {
				t.Fatalf("merging again: %v, %v", changed, err)
			}
			if m.Partial || ring.AtLimit(&m.Ring) > 0 {
				continue
			}
			// The join is symmetric (between rings without entries at the
			// version limit, which never win on receipt).
			theirs, err := ring.FromProto(&m.Ring, ipamRange)
			if err != nil {
				t.Fatalf("merged a ring FromProto refuses: %v", err)
			}
			ours := before.Proto()
			if _, err := theirs.Merge(&ours, false); err != nil {
				t.Fatalf("reverse merge: %v", err)
			}
			if !theirs.Equal(r) {
				t.Fatal("merge is not symmetric")
			}
		}
	})
}
