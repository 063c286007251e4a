package ipalloc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"maps"
	"net/netip"
	"slices"

	"github.com/overlayd/overlayd/internal/ipv4"
	"github.com/overlayd/overlayd/ipalloc/ring"
	"github.com/overlayd/overlayd/proto"
)

// The durable state, as Ready.State carries it and New reads it back:
//
//	8  magic "OVLIPAM" and format version 3
//	4  CRC-32C of everything after it
//	6  peer name
//	4  length of the ring, then the ring as an IPAM ring message
//	4  number of addresses, then each: ident length (1), ident, IPv4 prefix (5)
//	4  number of holds (space taken over by rmpeer, not yet confirmed), then
//	   each: first address (4), last address (4), 1 if in use (1)
//	4  number of nicknames, then each: peer name (6), length (1), nickname
//	4  number of takeovers (space taken over by rmpeer), then each: first
//	   address (4), last address (4), the peer it was taken from (6)
//
// Format 2 is format 3 without the takeovers, and with holds of 8 bytes
// (not in use); format 1 is format 2 without the nicknames. Both are still
// read, and written when there is nothing that needs the later format (so
// that an earlier overlayd can still read the state).
// A file that is cut short or altered fails the checksum: ParseState says
// so rather than returning less than was saved.
var stateMagic = [8]byte{'O', 'V', 'L', 'I', 'P', 'A', 'M', 3}

// stateMagicV2 starts a state saved before takeovers were kept, and
// stateMagicV1 one saved before nicknames were.
var (
	stateMagicV2 = [8]byte{'O', 'V', 'L', 'I', 'P', 'A', 'M', 2}
	stateMagicV1 = [8]byte{'O', 'V', 'L', 'I', 'P', 'A', 'M', 1}
)

// MaxIdentLen bounds an allocation ID (a container ID is 64 bytes).
const MaxIdentLen = 255

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrCorruptState is wrapped by ParseState's errors.
var ErrCorruptState = errors.New("ipalloc: state is corrupt")

// Owned is one address held for an ID.
type Owned struct {
	Ident string
	Addr  netip.Prefix
}

// State is what a Node saves.
type State struct {
	Self      proto.PeerName
	Ring      proto.Ring
	Owned     []Owned
	Holds     []Hold
	Nicknames []Nickname  // by peer name
	Takeovers []ring.Span // Peer: the peer the space was taken from
}

// Hold is space taken over by rmpeer that not every peer has confirmed.
type Hold struct {
	Start uint32
	End   uint64
	InUse bool // used although not confirmed (MaxHoldTicks passed)
}

// Nickname is the last nickname known of a peer that owns space.
type Nickname struct {
	Peer     proto.PeerName
	Nickname string
}

func (n *Node) marshal() []byte {
	st := State{Self: n.cfg.Self, Ring: n.ring.Proto()}
	// In address order, without sorting: the allocations are kept sorted.
	for _, v := range n.used {
		id := n.holder[v]
		for _, a := range n.owned[id] {
			if a.Addr() == ipv4.Addr(v) {
				st.Owned = append(st.Owned, Owned{Ident: id, Addr: a})
			}
		}
	}
	for _, m := range n.manualList() {
		st.Owned = append(st.Owned, Owned{Ident: n.manual[m.Addr()], Addr: m})
	}
	for _, h := range n.holds {
		st.Holds = append(st.Holds, Hold{Start: h.Start, End: h.End, InUse: h.inUse})
	}
	for _, t := range n.taken {
		st.Takeovers = append(st.Takeovers, ring.Span{Start: t.Start, End: t.End, Peer: t.From})
	}
	owners := n.spaceOwners()
	for _, p := range slices.Sorted(maps.Keys(n.nicks)) {
		if owners[p] {
			st.Nicknames = append(st.Nicknames, Nickname{Peer: p, Nickname: n.nicks[p]})
		}
	}
	b, err := MarshalState(&st)
	if err != nil {
		// Only an over-long ident could do this, and Submit refuses those.
		n.cfg.Warnf("ipalloc: cannot encode the state, so it is not saved: %v", err)
		return nil
	}
	return b
}

// MarshalState encodes st.
func MarshalState(st *State) ([]byte, error) {
	v3 := len(st.Takeovers) > 0 || slices.ContainsFunc(st.Holds, func(h Hold) bool { return h.InUse })
	magic := stateMagic
	switch {
	case !v3 && len(st.Nicknames) > 0:
		magic = stateMagicV2
	case !v3:
		magic = stateMagicV1
	}
	b := append([]byte(nil), magic[:]...)
	b = append(b, 0, 0, 0, 0)
	b = proto.AppendPeerName(b, st.Self)
	ringStart := len(b)
	b = append(b, 0, 0, 0, 0)
	b, err := proto.AppendIPAMMsg(b, &proto.IPAMMsg{Kind: proto.IPAMRing, Ring: st.Ring})
	if err != nil {
		return nil, err
	}
	binary.BigEndian.PutUint32(b[ringStart:], uint32(len(b)-ringStart-4))
	b = binary.BigEndian.AppendUint32(b, uint32(len(st.Owned)))
	for _, o := range st.Owned {
		if len(o.Ident) == 0 || len(o.Ident) > MaxIdentLen || !o.Addr.Addr().Is4() {
			return nil, fmt.Errorf("ipalloc: cannot store %v for %q", o.Addr, o.Ident)
		}
		a := o.Addr.Addr().As4()
		b = append(b, byte(len(o.Ident)))
		b = append(b, o.Ident...)
		b = append(b, a[0], a[1], a[2], a[3], byte(o.Addr.Bits()))
	}
	b = binary.BigEndian.AppendUint32(b, uint32(len(st.Holds)))
	for _, h := range st.Holds {
		if h.End <= uint64(h.Start) {
			return nil, fmt.Errorf("ipalloc: cannot store hold %d-%d", h.Start, h.End)
		}
		b = binary.BigEndian.AppendUint32(b, h.Start)
		b = binary.BigEndian.AppendUint32(b, uint32(h.End-1))
		if v3 {
			b = append(b, boolByte(h.InUse))
		}
	}
	if magic != stateMagicV1 {
		b = binary.BigEndian.AppendUint32(b, uint32(len(st.Nicknames)))
	}
	for _, k := range st.Nicknames {
		if k.Nickname == "" || len(k.Nickname) > proto.MaxNicknameLen {
			return nil, fmt.Errorf("ipalloc: cannot store nickname %q", k.Nickname)
		}
		b = proto.AppendPeerName(b, k.Peer)
		b = append(b, byte(len(k.Nickname)))
		b = append(b, k.Nickname...)
	}
	if v3 {
		b = binary.BigEndian.AppendUint32(b, uint32(len(st.Takeovers)))
	}
	for _, t := range st.Takeovers {
		if t.End <= uint64(t.Start) || t.Peer == 0 {
			return nil, fmt.Errorf("ipalloc: cannot store takeover %d-%d from %v", t.Start, t.End, t.Peer)
		}
		b = binary.BigEndian.AppendUint32(b, t.Start)
		b = binary.BigEndian.AppendUint32(b, uint32(t.End-1))
		b = proto.AppendPeerName(b, t.Peer)
	}
	binary.BigEndian.PutUint32(b[8:], crc32.Checksum(b[12:], castagnoli))
	return b, nil
}

// ParseState decodes a saved state, checking its checksum and encoding.
func ParseState(b []byte) (*State, error) {
	if len(b) < 12+6+4 || [8]byte(b[:8]) != stateMagic && [8]byte(b[:8]) != stateMagicV2 && [8]byte(b[:8]) != stateMagicV1 {
		return nil, fmt.Errorf("%w: not an overlayd IPAM state of format 1, 2 or 3 (%d bytes)", ErrCorruptState, len(b))
	}
	v1, v3 := [8]byte(b[:8]) == stateMagicV1, [8]byte(b[:8]) == stateMagic
	if crc32.Checksum(b[12:], castagnoli) != binary.BigEndian.Uint32(b[8:]) {
		return nil, fmt.Errorf("%w: checksum mismatch (truncated or altered)", ErrCorruptState)
	}
	st := &State{}
	p := b[12:]
	st.Self = proto.PeerNameAt(p)
	p = p[6:]
	n := binary.BigEndian.Uint32(p)
	p = p[4:]
	if uint64(n) > uint64(len(p)) {
		return nil, fmt.Errorf("%w: ring of %d bytes in %d", ErrCorruptState, n, len(p))
	}
	m, err := proto.ParseIPAMMsg(p[:n])
	if err != nil || m.Kind != proto.IPAMRing {
		return nil, fmt.Errorf("%w: ring: %v", ErrCorruptState, err)
	}
	st.Ring = m.Ring
	p = p[n:]
	if len(p) < 4 {
		return nil, fmt.Errorf("%w: no address list", ErrCorruptState)
	}
	k := binary.BigEndian.Uint32(p)
	p = p[4:]
	if uint64(k)*7 > uint64(len(p)) {
		return nil, fmt.Errorf("%w: %d addresses in %d bytes", ErrCorruptState, k, len(p))
	}
	st.Owned = make([]Owned, 0, k)
	for range k {
		if len(p) < 1 || len(p) < 1+int(p[0])+5 || p[0] == 0 {
			return nil, fmt.Errorf("%w: address list cut short", ErrCorruptState)
		}
		l := int(p[0])
		id := string(p[1 : 1+l])
		q := p[1+l:]
		bits := int(q[4])
		if bits > 32 {
			return nil, fmt.Errorf("%w: prefix length %d", ErrCorruptState, bits)
		}
		st.Owned = append(st.Owned, Owned{Ident: id, Addr: netip.PrefixFrom(netip.AddrFrom4([4]byte(q[:4])), bits)})
		p = q[5:]
	}
	if len(p) < 4 {
		return nil, fmt.Errorf("%w: no hold list", ErrCorruptState)
	}
	k = binary.BigEndian.Uint32(p)
	p = p[4:]
	size := uint64(8)
	if v3 {
		size = 9
	}
	if uint64(k)*size > uint64(len(p)) || v1 && uint64(k)*size != uint64(len(p)) {
		return nil, fmt.Errorf("%w: %d holds in %d bytes", ErrCorruptState, k, len(p))
	}
	for range k {
		start, last := binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])
		if last < start || v3 && p[8] > 1 {
			return nil, fmt.Errorf("%w: hold %d-%d", ErrCorruptState, start, last)
		}
		st.Holds = append(st.Holds, Hold{Start: start, End: uint64(last) + 1, InUse: v3 && p[8] == 1})
		p = p[size:]
	}
	if v1 {
		return st, nil
	}
	if len(p) < 4 {
		return nil, fmt.Errorf("%w: no nickname list", ErrCorruptState)
	}
	k = binary.BigEndian.Uint32(p)
	p = p[4:]
	if uint64(k)*8 > uint64(len(p)) {
		return nil, fmt.Errorf("%w: %d nicknames in %d bytes", ErrCorruptState, k, len(p))
	}
	for range k {
		if len(p) < proto.PeerNameLen+1 {
			return nil, fmt.Errorf("%w: nickname list cut short", ErrCorruptState)
		}
		l := int(p[proto.PeerNameLen])
		if l == 0 || l > proto.MaxNicknameLen || len(p) < proto.PeerNameLen+1+l {
			return nil, fmt.Errorf("%w: nickname of %d bytes", ErrCorruptState, l)
		}
		peer := proto.PeerNameAt(p)
		st.Nicknames = append(st.Nicknames, Nickname{Peer: peer, Nickname: string(p[proto.PeerNameLen+1 : proto.PeerNameLen+1+l])})
		p = p[proto.PeerNameLen+1+l:]
	}
	if v3 {
		if len(p) < 4 {
			return nil, fmt.Errorf("%w: no takeover list", ErrCorruptState)
		}
		k = binary.BigEndian.Uint32(p)
		p = p[4:]
		if uint64(k)*14 != uint64(len(p)) || k > maxTakeovers {
			return nil, fmt.Errorf("%w: %d takeovers in %d bytes", ErrCorruptState, k, len(p))
		}
		for range k {
			start, last := binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])
			peer := proto.PeerNameAt(p[8:])
			if last < start || peer == 0 {
				return nil, fmt.Errorf("%w: takeover %d-%d from %v", ErrCorruptState, start, last, peer)
			}
			st.Takeovers = append(st.Takeovers, ring.Span{Start: start, End: uint64(last) + 1, Peer: peer})
			p = p[14:]
		}
	}
	if len(p) != 0 {
		return nil, fmt.Errorf("%w: %d bytes after the last list", ErrCorruptState, len(p))
	}
	return st, nil
}

func boolByte(b bool) byte {
	if b {
		return 1
	}
	return 0
}
