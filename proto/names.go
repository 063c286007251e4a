package proto

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// ChannelNames is the gossip channel of the name store (Weave's
// "nameserver").
const ChannelNames = "nameserver"

// Limits of name messages.
const (
	MaxHostnameLen  = 254     // an FQDN in text form, with its trailing dot
	MaxContainerLen = 255     // a container ID
	MaxNameVersion  = 1 << 31 // an entry's version; bumping past one never wraps
	// MaxNameAgeMillis bounds a tombstone's age: one older than a day has
	// long expired everywhere.
	MaxNameAgeMillis = 86_400_000
	// MaxNameEntries bounds one message; a sender splits larger sets.
	MaxNameEntries = 4096
	// MaxNameDigests bounds the origins in one digest.
	MaxNameDigests = 8192
)

// NamesKind is the first byte of a name-store gossip payload.
type NamesKind uint8

// Name message kinds.
const (
	NamesEntries NamesKind = 1 // entries to merge
	NamesDigest  NamesKind = 2 // a hash per origin: send back the origins whose hashes differ
	NamesSummary NamesKind = 3 // one hash of every origin's: answer with a digest if yours differs
	// NamesSignedEntries are entries each signed by its origin (password
	// mode, where NamesEntries are refused).
	NamesSignedEntries NamesKind = 4
)

// NameSigLen is the size of an entry's signature (Ed25519).
const NameSigLen = 64

// nameSignContext starts what an entry's signature covers.
const nameSignContext = "overlayd name entry v1\x00"

// NameSigned is what the signature of a signed entry covers: a context
// string and the entry as kind 1 encodes it, but with age zero (the age of
// a tombstone grows as it travels, so it is not signed).
func NameSigned(e *NameEntry) ([]byte, error) {
	c := *e
	c.AgeMillis = 0
	if err := checkNameEntry(&c); err != nil {
		return nil, err
	}
	return appendNameEntry([]byte(nameSignContext), &c), nil
}

// NameEntry is one registration: Hostname has Addr, for ContainerID, as
// registered at the peer Origin. Only the origin changes its entries; a
// change bumps Version.
type NameEntry struct {
	Hostname    string // FQDN with its trailing dot, case preserved
	Addr        netip.Addr
	ContainerID string
	Origin      PeerName
	Version     uint32
	Tombstone   bool
	// AgeMillis is how long ago a tombstone was made, as far as the
	// sender knows; the receiver expires it that much sooner. It is a
	// duration, never a clock reading, so clocks need not agree.
	AgeMillis uint32
	// Sig is the origin's signature of NameSigned(entry), in signed
	// entries (password mode).
	Sig [NameSigLen]byte
}

// NameDigest summarises the entries of one origin.
type NameDigest struct {
	Origin PeerName
	Hash   uint64
}

// NamesMsg is one name-store gossip payload.
type NamesMsg struct {
	Kind    NamesKind
	Entries []NameEntry  // NamesEntries
	Digests []NameDigest // NamesDigest, sorted by origin, distinct
	// Echo (NamesDigest) asks the receiver to answer with its own digest
	// when the two differ, so that each side sends what the other lacks.
	Echo bool
	Hash uint64 // NamesSummary
}

const (
	nameEntryFixedLen = 1 + 4 + 1 + PeerNameLen + 4 + 1 + 4
	nameDigestLen     = PeerNameLen + 8
	nameTombstone     = 0x01
)

// AppendNamesMsg appends the encoded payload of m to b.
func AppendNamesMsg(b []byte, m *NamesMsg) ([]byte, error) {
	b = append(b, byte(m.Kind))
	switch m.Kind {
	case NamesEntries, NamesSignedEntries:
		if len(m.Entries) > MaxNameEntries {
			return b, fmt.Errorf("%w: %d name entries", ErrTooLarge, len(m.Entries))
		}
		b = binary.BigEndian.AppendUint16(b, uint16(len(m.Entries)))
		for i := range m.Entries {
			e := &m.Entries[i]
			if err := checkNameEntry(e); err != nil {
				return b, err
			}
			b = appendNameEntry(b, e)
			if m.Kind == NamesSignedEntries {
				b = append(b, e.Sig[:]...)
			}
		}
		return b, nil
	case NamesDigest:
		if len(m.Digests) > MaxNameDigests {
			return b, fmt.Errorf("%w: digest of %d origins", ErrTooLarge, len(m.Digests))
		}
		b = append(b, boolByte(m.Echo))
		b = binary.BigEndian.AppendUint16(b, uint16(len(m.Digests)))
		for i, d := range m.Digests {
			if i > 0 && d.Origin <= m.Digests[i-1].Origin {
				return b, fmt.Errorf("%w: digest origins out of order", ErrMalform)
			}
			b = appendName(b, d.Origin)
			b = binary.BigEndian.AppendUint64(b, d.Hash)
		}
		return b, nil
	case NamesSummary:
		return binary.BigEndian.AppendUint64(b, m.Hash), nil
	}
	return b, fmt.Errorf("%w: name message kind %d", ErrMalform, m.Kind)
}

// NameEntrySize is the encoded size of e in a message of kind k (its
// signature included in signed entries).
func NameEntrySize(e *NameEntry, k NamesKind) int {
	n := nameEntryFixedLen + len(e.Hostname) + len(e.ContainerID)
	if k == NamesSignedEntries {
		n += NameSigLen
	}
	return n
}

// appendNameEntry appends one checked entry (without its signature).
func appendNameEntry(b []byte, e *NameEntry) []byte {
	b = append(b, byte(len(e.Hostname)))
	b = append(b, e.Hostname...)
	a := e.Addr.As4()
	b = append(b, a[:]...)
	b = append(b, byte(len(e.ContainerID)))
	b = append(b, e.ContainerID...)
	b = appendName(b, e.Origin)
	b = binary.BigEndian.AppendUint32(b, e.Version)
	var flags byte
	if e.Tombstone {
		flags |= nameTombstone
	}
	b = append(b, flags)
	return binary.BigEndian.AppendUint32(b, e.AgeMillis)
}

// checkNameEntry checks what the encoding can carry; what the name means
// (its domain, its labels) is checked by the store.
func checkNameEntry(e *NameEntry) error {
	switch {
	case len(e.Hostname) == 0 || len(e.Hostname) > MaxHostnameLen:
		return fmt.Errorf("%w: hostname of %d bytes", ErrMalform, len(e.Hostname))
	case !e.Addr.Is4():
		return fmt.Errorf("%w: name address %v is not IPv4", ErrMalform, e.Addr)
	case len(e.ContainerID) > MaxContainerLen:
		return fmt.Errorf("%w: container ID of %d bytes", ErrMalform, len(e.ContainerID))
	case e.Origin == 0 || e.Origin >= 1<<48:
		return fmt.Errorf("%w: name entry origin %#x", ErrMalform, uint64(e.Origin))
	case e.Version > MaxNameVersion:
		return fmt.Errorf("%w: name entry version %d", ErrMalform, e.Version)
	case e.AgeMillis > MaxNameAgeMillis || (!e.Tombstone && e.AgeMillis != 0):
		return fmt.Errorf("%w: name entry age %d", ErrMalform, e.AgeMillis)
	}
	return nil
}

// ParseNamesMsg decodes a name-store gossip payload. Strings are copied,
// so the result does not alias b.
func ParseNamesMsg(b []byte) (NamesMsg, error) {
	var m NamesMsg
	if len(b) < 1 {
		return m, fmt.Errorf("%w: empty name message", ErrShort)
	}
	m.Kind, b = NamesKind(b[0]), b[1:]
	switch m.Kind {
	case NamesEntries, NamesSignedEntries:
		if len(b) < 2 {
			return m, fmt.Errorf("%w: name entries of %d bytes", ErrShort, len(b))
		}
		n := int(binary.BigEndian.Uint16(b))
		b = b[2:]
		if n > MaxNameEntries {
			return m, fmt.Errorf("%w: %d name entries", ErrMalform, n)
		}
		fixed := nameEntryFixedLen + 1
		if m.Kind == NamesSignedEntries {
			fixed += NameSigLen
		}
		if len(b) < n*fixed {
			return m, fmt.Errorf("%w: %d name entries in %d bytes", ErrShort, n, len(b))
		}
		m.Entries = make([]NameEntry, n)
		for i := range m.Entries {
			e := &m.Entries[i]
			var err error
			if e.Hostname, b, err = getString(b); err != nil {
				return m, err
			}
			if len(b) < 4+1 {
				return m, fmt.Errorf("%w: name entry cut short", ErrShort)
			}
			e.Addr = netip.AddrFrom4([4]byte(b[:4]))
			if e.ContainerID, b, err = getString(b[4:]); err != nil {
				return m, err
			}
			if len(b) < PeerNameLen+4+1+4 {
				return m, fmt.Errorf("%w: name entry cut short", ErrShort)
			}
			e.Origin = getName(b)
			e.Version = binary.BigEndian.Uint32(b[PeerNameLen:])
			flags := b[PeerNameLen+4]
			if flags&^nameTombstone != 0 {
				return m, fmt.Errorf("%w: name entry flags %#x", ErrMalform, flags)
			}
			e.Tombstone = flags&nameTombstone != 0
			e.AgeMillis = binary.BigEndian.Uint32(b[PeerNameLen+5:])
			b = b[PeerNameLen+9:]
			if err := checkNameEntry(e); err != nil {
				return m, err
			}
			if m.Kind == NamesSignedEntries {
				if len(b) < NameSigLen {
					return m, fmt.Errorf("%w: name entry without its signature", ErrShort)
				}
				e.Sig, b = [NameSigLen]byte(b), b[NameSigLen:]
			}
		}
		if len(b) != 0 {
			return m, fmt.Errorf("%w: %d bytes after the name entries", ErrMalform, len(b))
		}
		return m, nil
	case NamesDigest:
		if len(b) < 3 || b[0] > 1 {
			return m, fmt.Errorf("%w: name digest of %d bytes", ErrMalform, len(b))
		}
		m.Echo = b[0] == 1
		n := int(binary.BigEndian.Uint16(b[1:]))
		b = b[3:]
		if n > MaxNameDigests || len(b) != n*nameDigestLen {
			return m, fmt.Errorf("%w: name digest of %d origins in %d bytes", ErrMalform, n, len(b))
		}
		m.Digests = make([]NameDigest, n)
		for i := range m.Digests {
			q := b[i*nameDigestLen:]
			m.Digests[i] = NameDigest{Origin: getName(q), Hash: binary.BigEndian.Uint64(q[PeerNameLen:])}
			if i > 0 && m.Digests[i].Origin <= m.Digests[i-1].Origin {
				return m, fmt.Errorf("%w: name digest origins out of order", ErrMalform)
			}
		}
		return m, nil
	case NamesSummary:
		if len(b) != 8 {
			return m, fmt.Errorf("%w: name summary of %d bytes", ErrMalform, len(b))
		}
		m.Hash = binary.BigEndian.Uint64(b)
		return m, nil
	}
	return m, fmt.Errorf("%w: name message kind %d", ErrMalform, m.Kind)
}

// getString reads a string prefixed by its length in one byte.
func getString(b []byte) (string, []byte, error) {
	if len(b) < 1 || len(b) < 1+int(b[0]) {
		return "", b, fmt.Errorf("%w: string cut short", ErrShort)
	}
	n := int(b[0])
	return string(b[1 : 1+n]), b[1+n:], nil
}
