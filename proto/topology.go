package proto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"unicode/utf8"
)

// ChannelTopology is the gossip channel that carries the topology.
const ChannelTopology = "topology"

// Limits of topology messages.
const (
	// MaxTopoVersion bounds entry versions, so that bumping past a
	// received version can never wrap around.
	MaxTopoVersion = 1 << 62
	MaxTopoConns   = 4096  // connections listed in one peer entry
	MaxTopoEntries = 65535 // entries or digest items in one message
)

// TopoConn is one connection in a peer's entry.
type TopoConn struct {
	Peer        PeerName
	Addr        netip.AddrPort // the remote end as the reporting peer sees it
	Outbound    bool
	Established bool
	// Key (signed entries only) is the signing key the reporting peer's
	// neighbour proved in their handshake: the reporting peer vouches for
	// it.
	Key [TopoKeyLen]byte
}

// TopoPeer is one peer's entry in the topology: who it is and the
// connections it reports. Conns are sorted by Peer, without duplicates.
type TopoPeer struct {
	Name     PeerName
	UID      uint64
	Version  uint64
	Port     uint16 // the peer's UDP port, for discovery
	Nickname string
	Conns    []TopoConn
	Prefixes []netip.Prefix // IPv4 prefixes the peer serves
	// Key and Sig are carried in signed entries (password mode): the
	// peer's Ed25519 public key and its signature of TopoSigned(entry).
	Key [TopoKeyLen]byte
	Sig [TopoSigLen]byte
}

// Sizes of a signed entry's key and signature (Ed25519).
const (
	TopoKeyLen = 32
	TopoSigLen = 64
)

// topoSignContext starts what a topology signature covers, so that no
// other signed message of the project can pass for an entry.
const topoSignContext = "overlayd topology entry v1\x00"

// TopoSigned is what the signature of a signed entry covers: a context
// string, the entry as kind 5 encodes it (connections with their keys),
// and the key.
func TopoSigned(p *TopoPeer) ([]byte, error) {
	b := append(make([]byte, 0, len(topoSignContext)+TopoSignedPeerSize(p)), topoSignContext...)
	b, err := appendTopoPeer(b, p, true)
	if err != nil {
		return nil, err
	}
	return append(b, p.Key[:]...), nil
}

// TopoKind is the first byte of a topology gossip payload.
type TopoKind uint8

// Topology message kinds.
const (
	TopoHash          TopoKind = 1 // a summary of everything we know
	TopoDigestRequest TopoKind = 2 // our digest; send what is newer, and ask back if we are newer
	TopoDigestReply   TopoKind = 3 // our digest; send what is newer
	TopoEntries       TopoKind = 4 // peer entries
	TopoSignedEntries TopoKind = 5 // peer entries, each with its key and signature (password mode)
)

// TopoDigestItem says which incarnation and version of a peer's entry we
// hold.
type TopoDigestItem struct {
	Name    PeerName
	UID     uint64
	Version uint64
}

// TopoMsg is one topology gossip payload; which fields are used depends on
// Kind.
type TopoMsg struct {
	Kind    TopoKind
	Count   uint32 // TopoHash: number of entries summarised
	Hash    uint64 // TopoHash
	Digest  []TopoDigestItem
	Entries []TopoPeer
	// Skipped counts the entries and digest items left out on receipt:
	// well formed, but at a version no honest peer reaches. The rest of
	// the message stands.
	Skipped int
}

const (
	topoConnLen   = PeerNameLen + 16 + 2 + 1
	topoDigestLen = PeerNameLen + 8 + 8
	topoPeerFixed = PeerNameLen + 8 + 8 + 2 + 1 + 2 + 2 // plus nickname, conns, prefixes
)

// TopoPeerSize is the encoded size of p in plain entries (kind 4).
func TopoPeerSize(p *TopoPeer) int {
	return topoPeerFixed + len(truncate(p.Nickname, MaxNicknameLen)) + len(p.Conns)*topoConnLen + len(p.Prefixes)*prefixLen
}

// TopoSignedPeerSize is the encoded size of p in signed entries (kind 5):
// a key with each connection, then the entry's key and signature.
func TopoSignedPeerSize(p *TopoPeer) int {
	return TopoPeerSize(p) + len(p.Conns)*TopoKeyLen + TopoKeyLen + TopoSigLen
}

// AppendTopoMsg appends the encoded payload of m to b.
func AppendTopoMsg(b []byte, m *TopoMsg) ([]byte, error) {
	b = append(b, byte(m.Kind))
	switch m.Kind {
	case TopoHash:
		b = binary.BigEndian.AppendUint32(b, m.Count)
		return binary.BigEndian.AppendUint64(b, m.Hash), nil
	case TopoDigestRequest, TopoDigestReply:
		if len(m.Digest) > MaxTopoEntries {
			return b, fmt.Errorf("%w: digest of %d items", ErrTooLarge, len(m.Digest))
		}
		b = binary.BigEndian.AppendUint16(b, uint16(len(m.Digest)))
		for _, d := range m.Digest {
			b = appendName(b, d.Name)
			b = binary.BigEndian.AppendUint64(b, d.UID)
			b = binary.BigEndian.AppendUint64(b, d.Version)
		}
		return b, nil
	case TopoEntries, TopoSignedEntries:
		if len(m.Entries) > MaxTopoEntries {
			return b, fmt.Errorf("%w: %d entries", ErrTooLarge, len(m.Entries))
		}
		b = binary.BigEndian.AppendUint16(b, uint16(len(m.Entries)))
		for i := range m.Entries {
			e := &m.Entries[i]
			var err error
			if b, err = appendTopoPeer(b, e, m.Kind == TopoSignedEntries); err != nil {
				return b, err
			}
			if m.Kind == TopoSignedEntries {
				b = append(append(b, e.Key[:]...), e.Sig[:]...)
			}
		}
		return b, nil
	}
	return b, fmt.Errorf("%w: topology message kind %d", ErrMalform, m.Kind)
}

// appendTopoPeer appends p; signed adds each connection's key.
func appendTopoPeer(b []byte, p *TopoPeer, signed bool) ([]byte, error) {
	if len(p.Conns) > MaxTopoConns || len(p.Prefixes) > MaxPrefixes {
		return b, fmt.Errorf("%w: entry of %v with %d connections, %d prefixes", ErrTooLarge, p.Name, len(p.Conns), len(p.Prefixes))
	}
	nick := truncate(p.Nickname, MaxNicknameLen)
	b = appendName(b, p.Name)
	b = binary.BigEndian.AppendUint64(b, p.UID)
	b = binary.BigEndian.AppendUint64(b, p.Version)
	b = binary.BigEndian.AppendUint16(b, p.Port)
	b = append(b, byte(len(nick)))
	b = append(b, nick...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(p.Conns)))
	for _, c := range p.Conns {
		b = appendName(b, c.Peer)
		a := c.Addr.Addr().As16()
		b = append(b, a[:]...)
		b = binary.BigEndian.AppendUint16(b, c.Addr.Port())
		var f byte
		if c.Outbound {
			f |= 1
		}
		if c.Established {
			f |= 2
		}
		b = append(b, f)
		if signed {
			b = append(b, c.Key[:]...)
		}
	}
	b = binary.BigEndian.AppendUint16(b, uint16(len(p.Prefixes)))
	for _, pf := range p.Prefixes {
		if !pf.IsValid() || !pf.Addr().Is4() {
			return b, fmt.Errorf("%w: prefix %v", ErrMalform, pf)
		}
		b = appendPrefix(b, pf)
	}
	return b, nil
}

// ParseTopoMsg decodes a topology payload. What it allocates is bounded by
// the length of b. It checks each entry's own consistency (names, sorted
// connections, no connection to itself); merging is the caller's business.
func ParseTopoMsg(b []byte) (TopoMsg, error) {
	var m TopoMsg
	if len(b) < 1 {
		return m, fmt.Errorf("%w: empty topology message", ErrShort)
	}
	m.Kind = TopoKind(b[0])
	p := b[1:]
	switch m.Kind {
	case TopoHash:
		if len(p) != 12 {
			return m, fmt.Errorf("%w: topology hash of %d bytes", ErrMalform, len(p))
		}
		m.Count = binary.BigEndian.Uint32(p)
		m.Hash = binary.BigEndian.Uint64(p[4:])
		return m, nil
	case TopoDigestRequest, TopoDigestReply:
		if len(p) < 2 {
			return m, fmt.Errorf("%w: digest", ErrShort)
		}
		n := int(binary.BigEndian.Uint16(p))
		p = p[2:]
		if len(p) != n*topoDigestLen {
			return m, fmt.Errorf("%w: digest of %d bytes for %d items", ErrMalform, len(p), n)
		}
		m.Digest = make([]TopoDigestItem, 0, n)
		for i := range n {
			q := p[i*topoDigestLen:]
			d := TopoDigestItem{Name: getName(q), UID: binary.BigEndian.Uint64(q[6:]), Version: binary.BigEndian.Uint64(q[14:])}
			switch {
			case d.Name == 0:
				return TopoMsg{}, fmt.Errorf("%w: zero name in digest", ErrMalform)
			case d.Version >= MaxTopoVersion:
				m.Skipped++
			default:
				m.Digest = append(m.Digest, d)
			}
		}
		return m, nil
	case TopoEntries, TopoSignedEntries:
		if len(p) < 2 {
			return m, fmt.Errorf("%w: entries", ErrShort)
		}
		n := int(binary.BigEndian.Uint16(p))
		p = p[2:]
		fixed := topoPeerFixed
		if m.Kind == TopoSignedEntries {
			fixed += TopoKeyLen + TopoSigLen
		}
		if n > len(p)/fixed {
			return m, fmt.Errorf("%w: %d entries in %d bytes", ErrMalform, n, len(p))
		}
		m.Entries = make([]TopoPeer, 0, n)
		for range n {
			e, rest, err := parseTopoPeer(p, m.Kind == TopoSignedEntries)
			if m.Kind == TopoSignedEntries && (err == nil || errors.Is(err, errTopoVersion)) {
				if len(rest) < TopoKeyLen+TopoSigLen {
					return TopoMsg{}, fmt.Errorf("%w: signed entry without its key and signature", ErrShort)
				}
				e.Key, e.Sig = [TopoKeyLen]byte(rest), [TopoSigLen]byte(rest[TopoKeyLen:])
				rest = rest[TopoKeyLen+TopoSigLen:]
			}
			switch {
			case errors.Is(err, errTopoVersion):
				m.Skipped++
			case err != nil:
				return TopoMsg{}, err
			default:
				m.Entries = append(m.Entries, e)
			}
			p = rest
		}
		if len(p) != 0 {
			return TopoMsg{}, fmt.Errorf("%w: %d bytes after the entries", ErrMalform, len(p))
		}
		return m, nil
	}
	return m, fmt.Errorf("%w: topology message kind %d", ErrMalform, b[0])
}

// errTopoVersion marks an entry at or over MaxTopoVersion: it is skipped,
// the rest of the message read.
var errTopoVersion = fmt.Errorf("%w: topology entry version at the limit", ErrMalform)

// parseTopoPeer reads one entry; signed entries carry a key with each
// connection.
func parseTopoPeer(p []byte, signed bool) (TopoPeer, []byte, error) {
	connLen := topoConnLen
	if signed {
		connLen += TopoKeyLen
	}
	var e TopoPeer
	if len(p) < topoPeerFixed {
		return e, nil, fmt.Errorf("%w: topology entry", ErrShort)
	}
	e.Name = getName(p)
	e.UID = binary.BigEndian.Uint64(p[6:])
	e.Version = binary.BigEndian.Uint64(p[14:])
	e.Port = binary.BigEndian.Uint16(p[22:])
	nl := int(p[24])
	p = p[25:]
	if nl > MaxNicknameLen || len(p) < nl+2 {
		return e, nil, fmt.Errorf("%w: topology entry nickname", ErrMalform)
	}
	if !utf8.Valid(p[:nl]) {
		return e, nil, fmt.Errorf("%w: nickname is not UTF-8", ErrMalform)
	}
	e.Nickname = string(p[:nl])
	p = p[nl:]
	nc := int(binary.BigEndian.Uint16(p))
	p = p[2:]
	if nc > MaxTopoConns || len(p) < nc*connLen+2 {
		return e, nil, fmt.Errorf("%w: %d connections", ErrMalform, nc)
	}
	if nc > 0 {
		e.Conns = make([]TopoConn, nc)
	}
	for i := range nc {
		q := p[i*connLen:]
		a := netip.AddrFrom16([16]byte(q[6:22])).Unmap()
		f := q[24]
		e.Conns[i] = TopoConn{Peer: getName(q), Addr: netip.AddrPortFrom(a, binary.BigEndian.Uint16(q[22:])),
			Outbound: f&1 != 0, Established: f&2 != 0}
		if f&^3 != 0 {
			return e, nil, fmt.Errorf("%w: connection flags %#x", ErrMalform, f)
		}
		if signed {
			e.Conns[i].Key = [TopoKeyLen]byte(q[topoConnLen:])
		}
		if e.Conns[i].Peer == 0 || e.Conns[i].Peer == e.Name || (i > 0 && e.Conns[i].Peer <= e.Conns[i-1].Peer) {
			return e, nil, fmt.Errorf("%w: connections of %v not sorted and distinct", ErrMalform, e.Name)
		}
	}
	p = p[nc*connLen:]
	np := int(binary.BigEndian.Uint16(p))
	p = p[2:]
	if np > MaxPrefixes || len(p) < np*prefixLen {
		return e, nil, fmt.Errorf("%w: %d prefixes", ErrMalform, np)
	}
	if np > 0 {
		e.Prefixes = make([]netip.Prefix, np)
	}
	for i := range np {
		pf, err := getPrefix(p[i*prefixLen:])
		if err != nil {
			return e, nil, err
		}
		if !pf.IsValid() {
			return e, nil, fmt.Errorf("%w: empty prefix", ErrMalform)
		}
		e.Prefixes[i] = pf
	}
	if e.Name == 0 || e.UID == 0 {
		return e, nil, fmt.Errorf("%w: topology entry without name or UID", ErrMalform)
	}
	if e.Version >= MaxTopoVersion {
		return e, p[np*prefixLen:], errTopoVersion
	}
	return e, p[np*prefixLen:], nil
}

// TopoMsgSize is the encoded size of m's payload, computed without encoding
// it.
func TopoMsgSize(m *TopoMsg) int {
	switch m.Kind {
	case TopoHash:
		return 1 + 12
	case TopoDigestRequest, TopoDigestReply:
		return 1 + 2 + len(m.Digest)*topoDigestLen
	case TopoEntries, TopoSignedEntries:
		n := 1 + 2
		for i := range m.Entries {
			if m.Kind == TopoSignedEntries {
				n += TopoSignedPeerSize(&m.Entries[i])
			} else {
				n += TopoPeerSize(&m.Entries[i])
			}
		}
		return n
	}
	return 1
}
