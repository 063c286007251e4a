package names

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"maps"
	"slices"

	"github.com/overlayd/overlayd/proto"
)

// The saved state is the local entries, tombstones too:
//
//	"OVN1" | count (4) | count × (length (4) | NamesEntries payload) | CRC-32C of all before (4)
//
// Each payload is a proto.NamesMsg of kind NamesEntries.
const stateMagic = "OVN1"

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrState marks a saved state that cannot be read.
var ErrState = errors.New("names: bad saved state")

// EncodeState encodes the local entries.
func (s *Store) EncodeState() []byte {
	var es []proto.NameEntry
	if o := s.origins[s.cfg.Self]; o != nil {
		for _, k := range slices.SortedFunc(maps.Keys(o.entries), key.compare) {
			es = append(es, s.outgoing(o.entries[k]))
		}
	}
	b := append([]byte(stateMagic), 0, 0, 0, 0)
	count := 0
	for len(es) > 0 {
		n := min(len(es), proto.MaxNameEntries)
		at := len(b)
		b = append(b, 0, 0, 0, 0)
		next, err := proto.AppendNamesMsg(b, &proto.NamesMsg{Kind: proto.NamesEntries, Entries: es[:n]})
		if err != nil {
			// Our entries were checked when they were made: this is a bug.
			s.cfg.Infof("names: entries not saved: %v", err)
			b, es = b[:at], es[n:]
			continue
		}
		b = next
		binary.BigEndian.PutUint32(b[at:], uint32(len(b)-at-4))
		es = es[n:]
		count++
	}
	binary.BigEndian.PutUint32(b[len(stateMagic):], uint32(count))
	return binary.BigEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// DecodeState reads a saved state.
func DecodeState(b []byte) ([]proto.NameEntry, error) {
	if len(b) < len(stateMagic)+8 || string(b[:len(stateMagic)]) != stateMagic {
		return nil, fmt.Errorf("%w: not a name state", ErrState)
	}
	body, sum := b[:len(b)-4], binary.BigEndian.Uint32(b[len(b)-4:])
	if crc32.Checksum(body, castagnoli) != sum {
		return nil, fmt.Errorf("%w: checksum mismatch", ErrState)
	}
	count := binary.BigEndian.Uint32(body[len(stateMagic):])
	body = body[len(stateMagic)+4:]
	var out []proto.NameEntry
	for range count {
		if len(body) < 4 || uint64(len(body)-4) < uint64(binary.BigEndian.Uint32(body)) {
			return nil, fmt.Errorf("%w: cut short", ErrState)
		}
		n := binary.BigEndian.Uint32(body)
		m, err := proto.ParseNamesMsg(body[4 : 4+n])
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrState, err)
		}
		if m.Kind != proto.NamesEntries {
			return nil, fmt.Errorf("%w: record of kind %d", ErrState, m.Kind)
		}
		out = append(out, m.Entries...)
		body = body[4+n:]
	}
	if len(body) != 0 {
		return nil, fmt.Errorf("%w: %d bytes after the entries", ErrState, len(body))
	}
	return out, nil
}
