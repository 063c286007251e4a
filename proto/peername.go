package proto

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// PeerName is a peer's 48-bit identity, printed like a MAC address
// (12:d2:fe:7a:c1:f2). Names compare as unsigned integers. The zero value is
// the "unknown" sentinel and never names a real peer.
type PeerName uint64

// PeerNameLen is the size of a PeerName on the wire.
const PeerNameLen = 6

const maxPeerName = 1<<48 - 1

// ErrBadPeerName is returned by ParsePeerName for malformed input.
var ErrBadPeerName = errors.New("proto: invalid peer name")

// String prints the name as six colon-separated hex octets.
func (n PeerName) String() string {
	var b [17]byte
	const hex = "0123456789abcdef"
	for i := range 6 {
		o := byte(n >> (40 - 8*i))
		b[3*i] = hex[o>>4]
		b[3*i+1] = hex[o&0xf]
		if i < 5 {
			b[3*i+2] = ':'
		}
	}
	return string(b[:])
}

// MarshalText implements encoding.TextMarshaler.
func (n PeerName) MarshalText() ([]byte, error) { return []byte(n.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler. Unlike ParsePeerName it
// accepts the zero name, spelled in full, since MarshalText writes it.
func (n *PeerName) UnmarshalText(b []byte) error {
	if string(b) == PeerName(0).String() {
		*n = 0
		return nil
	}
	p, err := ParsePeerName(string(b))
	if err != nil {
		return err
	}
	*n = p
	return nil
}

// ParsePeerName parses six colon-separated hex octets. Like Weave it accepts a
// single "::" standing for a run of zero octets ("::1" is
// 00:00:00:00:00:01). The zero name is refused.
func ParsePeerName(s string) (PeerName, error) {
	if len(s) > 17 || s == "" {
		return 0, fmt.Errorf("%w %q", ErrBadPeerName, s)
	}
	var head, tail []string
	if i := strings.Index(s, "::"); i >= 0 {
		if strings.Contains(s[i+2:], "::") {
			return 0, fmt.Errorf("%w %q: more than one \"::\"", ErrBadPeerName, s)
		}
		if s[:i] != "" {
			head = strings.Split(s[:i], ":")
		}
		if s[i+2:] != "" {
			tail = strings.Split(s[i+2:], ":")
		}
		if len(head)+len(tail) > 5 {
			return 0, fmt.Errorf("%w %q: too many octets", ErrBadPeerName, s)
		}
	} else {
		head = strings.Split(s, ":")
		if len(head) != 6 {
			return 0, fmt.Errorf("%w %q: want six octets", ErrBadPeerName, s)
		}
	}
	octets := make([]string, 0, 6)
	octets = append(octets, head...)
	for len(octets)+len(tail) < 6 {
		octets = append(octets, "0")
	}
	octets = append(octets, tail...)
	var n uint64
	for _, o := range octets {
		if o == "" || len(o) > 2 {
			return 0, fmt.Errorf("%w %q: bad octet %q", ErrBadPeerName, s, o)
		}
		v, err := strconv.ParseUint(o, 16, 8)
		if err != nil {
			return 0, fmt.Errorf("%w %q: bad octet %q", ErrBadPeerName, s, o)
		}
		n = n<<8 | v
	}
	if n == 0 {
		return 0, fmt.Errorf("%w %q: the zero name is reserved", ErrBadPeerName, s)
	}
	return PeerName(n), nil
}

// PeerNameFromBytes turns 6 random bytes into a peer name the way Weave does:
// the multicast bit cleared and the locally-administered bit set, so the name
// is also a valid unicast MAC address and never zero.
func PeerNameFromBytes(b [6]byte) PeerName {
	b[0] = b[0]&^0x01 | 0x02
	return getName(b[:])
}

func putName(b []byte, n PeerName) {
	_ = b[5]
	b[0] = byte(n >> 40)
	b[1] = byte(n >> 32)
	b[2] = byte(n >> 24)
	b[3] = byte(n >> 16)
	b[4] = byte(n >> 8)
	b[5] = byte(n)
}

func getName(b []byte) PeerName {
	_ = b[5]
	return PeerName(uint64(b[0])<<40 | uint64(b[1])<<32 | uint64(b[2])<<24 |
		uint64(b[3])<<16 | uint64(b[4])<<8 | uint64(b[5]))
}

// AppendPeerName appends n's 6 bytes, as every message carries it.
func AppendPeerName(b []byte, n PeerName) []byte { return appendName(b, n) }

// PeerNameAt reads a peer name from the first 6 bytes of b, which must
// hold them.
func PeerNameAt(b []byte) PeerName { return getName(b) }
