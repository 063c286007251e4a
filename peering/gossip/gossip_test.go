package gossip

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/overlayd/overlayd/proto"
)

func chunks(src proto.PeerName, id uint32, payload []byte) []*proto.Gossip {
	pieces := Split(payload)
	var out []*proto.Gossip
	for i, p := range pieces {
		out = append(out, &proto.Gossip{Channel: "topology", Src: src, Payload: p,
			Chunk: &proto.Chunk{MsgID: id, Index: uint16(i), Count: uint16(len(pieces))}})
	}
	return out
}

func TestSplitAndReassembleInAnyOrder(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 1))
	for _, size := range []int{MaxChunk + 1, 5000, 100_000} {
		payload := make([]byte, size)
		for i := range payload {
			payload[i] = byte(r.Uint32())
		}
		cs := chunks(7, uint32(size), payload)
		r.Shuffle(len(cs), func(i, j int) { cs[i], cs[j] = cs[j], cs[i] })
		cs = append(cs[:1], append([]*proto.Gossip{cs[0]}, cs[1:]...)...) // a duplicate
		a := NewAssembler()
		var got []byte
		for _, c := range cs {
			out, err := a.Add(c, 7, 0)
			if err != nil {
				t.Fatal(err)
			}
			if out != nil {
				got = out
			}
		}
		if !bytes.Equal(got, payload) {
			t.Fatalf("size %d: reassembled %d bytes, not the same", size, len(got))
		}
		if a.Pending() != 0 {
			t.Errorf("%d pending", a.Pending())
		}
	}
	if n := len(Split(make([]byte, MaxChunk))); n != 1 {
		t.Errorf("a message of MaxChunk bytes split in %d", n)
	}
}

// TestMemoryIsBounded: chunks that never complete, from one origin or
// many, are evicted and expire; oversized and inconsistent ones are refused.
func TestMemoryIsBounded(t *testing.T) {
	a := NewAssembler()
	for id := range uint32(100) {
		a.Add(chunks(1, id, make([]byte, 3*MaxChunk))[0], 7, 0)
	}
	if a.Pending() != MaxPartialPerSrc {
		t.Errorf("%d pending from one origin, want %d", a.Pending(), MaxPartialPerSrc)
	}
	for src := range proto.PeerName(1000) {
		a.Add(chunks(src+2, 1, make([]byte, 3*MaxChunk))[0], 7, 1)
	}
	if a.Pending() > MaxPartial {
		t.Errorf("%d pending, want at most %d", a.Pending(), MaxPartial)
	}
	a.Expire(1 + ExpireTicks + 1)
	if a.Pending() != 0 {
		t.Errorf("%d pending after expiry", a.Pending())
	}
	huge := &proto.Gossip{Channel: "x", Src: 1, Payload: []byte{1}, Chunk: &proto.Chunk{MsgID: 1, Index: 0, Count: 65535}}
	if _, err := a.Add(huge, 7, 0); !errors.Is(err, ErrTooBig) {
		t.Errorf("65535 chunks: %v", err)
	}
	cs := chunks(3, 9, make([]byte, 3*MaxChunk))
	a.Add(cs[0], 7, 0)
	bad := *cs[1]
	bad.Chunk = &proto.Chunk{MsgID: 9, Index: 1, Count: 5}
	if _, err := a.Add(&bad, 7, 0); !errors.Is(err, ErrInconsistent) || a.Pending() != 0 {
		t.Errorf("inconsistent count: %v, %d pending", err, a.Pending())
	}
}

// TestByteBudget: incomplete messages from many origins never hold more
// than MaxPartialBytes.
func TestByteBudget(t *testing.T) {
	a := NewAssembler()
	for src := range proto.PeerName(200) {
		for id := range uint32(MaxPartialPerSrc) {
			cs := chunks(src+1, id, make([]byte, 200*MaxChunk))
			for _, c := range cs[:len(cs)-1] { // never the last one
				a.Add(c, 7, 0)
			}
			if a.Bytes() > MaxPartialBytes {
				t.Fatalf("%d bytes held", a.Bytes())
			}
		}
	}
}

// TestFloodEvictsOnlyItsOwn: a neighbour sending the first chunks of
// messages of made-up origins, in number and in bytes far past the
// limits, makes room by giving up its own: another neighbour's message,
// incomplete meanwhile, still completes.
func TestFloodEvictsOnlyItsOwn(t *testing.T) {
	a := NewAssembler()
	payload := make([]byte, 3*MaxChunk)
	for i := range payload {
		payload[i] = byte(i)
	}
	real := chunks(5, 1, payload)
	if out, _ := a.Add(real[0], 1, 0); out != nil {
		t.Fatal("complete after one chunk of three")
	}
	for src := range proto.PeerName(2000) {
		cs := chunks(100+src, 1, make([]byte, 40*MaxChunk))
		for _, c := range cs[:3] {
			a.Add(c, 2, 0)
		}
		if a.Pending() > MaxPartial || a.Bytes() > MaxPartialBytes {
			t.Fatalf("%d pending, %d bytes", a.Pending(), a.Bytes())
		}
	}
	a.Add(real[1], 1, 0)
	out, err := a.Add(real[2], 1, 0)
	if err != nil || !bytes.Equal(out, payload) {
		t.Fatalf("the other neighbour's message: %d bytes, %v", len(out), err)
	}
}
