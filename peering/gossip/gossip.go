// Package gossip splits gossip messages that do not fit in one datagram
// into chunks and puts them back together, with bounded memory.
//
// The package is pure: no sockets, clocks, goroutines or globals. Time is
// the caller's tick count.
package gossip

import (
	"errors"
	"fmt"
	"slices"

	"github.com/overlayd/overlayd/proto"
)

// MaxChunk is the payload carried per datagram. With the gossip header it
// stays under 1280 bytes, the minimum IPv6 MTU, so chunks are never
// fragmented on any underlay.
const MaxChunk = 1200

// Split cuts payload into pieces of at most MaxChunk bytes. One piece means
// the message needs no chunk header. The pieces alias payload.
func Split(payload []byte) [][]byte {
	if len(payload) <= MaxChunk {
		return [][]byte{payload}
	}
	var out [][]byte
	for len(payload) > 0 {
		n := min(len(payload), MaxChunk)
		out = append(out, payload[:n])
		payload = payload[n:]
	}
	return out
}

// Limits of reassembly.
const (
	MaxMessageBytes  = 4 << 20  // a reassembled message; larger ones are refused
	MaxPartialPerSrc = 8        // incomplete messages kept per origin and neighbour
	MaxPartial       = 256      // incomplete messages kept in all
	MaxPartialBytes  = 16 << 20 // bytes held in incomplete messages in all
	ExpireTicks      = 50       // an incomplete message is dropped after this long
)

// Errors of reassembly; each also drops the partial message it concerns.
var (
	ErrTooBig       = errors.New("gossip: reassembled message too large")
	ErrInconsistent = errors.New("gossip: chunk does not match its message")
)

// key names an incomplete message by the neighbour it came through (which
// the connection vouches for) as well as by its claimed origin: a
// neighbour that makes up origins fills only its own share.
type key struct {
	via     proto.PeerName
	src     proto.PeerName
	channel string
	id      uint32
}

type partial struct {
	pieces [][]byte // nil until received
	have   int
	bytes  int
	born   int64
}

// Assembler puts chunked gossip messages back together. The zero value is
// not ready: use NewAssembler. Not safe for concurrent use.
type Assembler struct {
	parts map[key]*partial
	bytes int // held in parts
	// Dropped counts incomplete messages given up (expired or evicted).
	Dropped uint64
}

// NewAssembler makes an empty Assembler.
func NewAssembler() *Assembler { return &Assembler{parts: make(map[key]*partial)} }

// Pending is the number of incomplete messages held.
func (a *Assembler) Pending() int { return len(a.parts) }

// Add takes one chunk of g (which must have g.Chunk set) received from
// neighbour via at tick now. When it completes its message, Add returns
// the whole payload (a new slice); otherwise nil. The chunk's payload is
// copied. When the limits are reached, the neighbour holding the most
// gives up its oldest message: one that floods cannot evict the others'.
func (a *Assembler) Add(g *proto.Gossip, via proto.PeerName, now int64) ([]byte, error) {
	c := g.Chunk
	k := key{via, g.Src, g.Channel, c.MsgID}
	p := a.parts[k]
	if p == nil {
		if int(c.Count)*MaxChunk > MaxMessageBytes+MaxChunk {
			return nil, fmt.Errorf("%w: %d chunks", ErrTooBig, c.Count)
		}
		a.makeRoom(k)
		p = &partial{pieces: make([][]byte, c.Count), born: now}
		a.parts[k] = p
	}
	if int(c.Count) != len(p.pieces) || len(g.Payload) > MaxChunk || len(g.Payload) == 0 {
		a.drop(k)
		return nil, fmt.Errorf("%w: chunk %d/%d of %d bytes", ErrInconsistent, c.Index, c.Count, len(g.Payload))
	}
	if p.pieces[c.Index] != nil {
		return nil, nil // duplicate
	}
	p.pieces[c.Index] = slices.Clone(g.Payload)
	p.have++
	p.bytes += len(g.Payload)
	a.bytes += len(g.Payload)
	if p.bytes > MaxMessageBytes {
		a.drop(k)
		return nil, fmt.Errorf("%w: over %d bytes", ErrTooBig, MaxMessageBytes)
	}
	for a.bytes > MaxPartialBytes {
		a.drop(a.oldest(k, func(p *partial) int { return p.bytes }))
	}
	if p.have < len(p.pieces) {
		return nil, nil
	}
	a.bytes -= p.bytes
	delete(a.parts, k)
	out := make([]byte, 0, p.bytes)
	for _, piece := range p.pieces {
		out = append(out, piece...)
	}
	return out, nil
}

// drop gives up the incomplete message k.
func (a *Assembler) drop(k key) {
	if p := a.parts[k]; p != nil {
		a.bytes -= p.bytes
		delete(a.parts, k)
		a.Dropped++
	}
}

// oldest is the oldest incomplete message, other than keep, of the
// neighbour whose messages weigh the most (weight of each; keep itself if
// it is the only one).
func (a *Assembler) oldest(keep key, weight func(*partial) int) key {
	load := map[proto.PeerName]int{}
	for k, p := range a.parts {
		if k != keep {
			load[k.via] += weight(p)
		}
	}
	var heavy proto.PeerName
	for via, w := range load {
		if w > load[heavy] || w == load[heavy] && via < heavy {
			heavy = via
		}
	}
	o, born := keep, int64(-1)
	for k, p := range a.parts {
		if k != keep && k.via == heavy && (born < 0 || p.born < born || p.born == born && less(k, o)) {
			o, born = k, p.born
		}
	}
	return o
}

// Bytes is what the incomplete messages hold.
func (a *Assembler) Bytes() int { return a.bytes }

// makeRoom evicts incomplete messages so that a new one, k, fits within the
// limits: the oldest of the same origin through the same neighbour, or
// the oldest of the neighbour holding the most.
func (a *Assembler) makeRoom(k key) {
	for {
		n, oldestSrc := 0, key{}
		var bornSrc int64 = -1
		for q, p := range a.parts {
			if q.via == k.via && q.src == k.src {
				n++
				if bornSrc < 0 || p.born < bornSrc || p.born == bornSrc && less(q, oldestSrc) {
					bornSrc, oldestSrc = p.born, q
				}
			}
		}
		switch {
		case n >= MaxPartialPerSrc:
			a.drop(oldestSrc)
		case len(a.parts) >= MaxPartial:
			a.drop(a.oldest(k, func(*partial) int { return 1 }))
		default:
			return
		}
	}
}

func less(a, b key) bool {
	if a.via != b.via {
		return a.via < b.via
	}
	if a.src != b.src {
		return a.src < b.src
	}
	if a.channel != b.channel {
		return a.channel < b.channel
	}
	return a.id < b.id
}

// Expire drops incomplete messages older than ExpireTicks at tick now.
func (a *Assembler) Expire(now int64) {
	for k, p := range a.parts {
		if now-p.born > ExpireTicks {
			a.drop(k)
		}
	}
}
