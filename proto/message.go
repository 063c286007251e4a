package proto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"unicode/utf8"
)

// Version is the wire version this implementation speaks. MinVersion and
// MaxVersion bound the range it offers in a hello.
const (
	Version    = 1
	MinVersion = 1
	MaxVersion = 1
)

// Sizes of the fixed parts of each message, including the header.
const (
	HeaderLen      = 4
	DataHeaderLen  = HeaderLen + 2*PeerNameLen // 16: the whole per-packet overhead
	helloFixedLen  = HeaderLen + 1 + 1 + PeerNameLen + 8 + 2 + prefixLen + 1
	rejectFixedLen = HeaderLen + 1 + PeerNameLen + prefixLen + 1
	HeartbeatLen   = HeaderLen + PeerNameLen + 8
	gossipFixedLen = HeaderLen + 1 + 2*PeerNameLen
	prefixLen      = 5
)

// Limits on variable-length fields.
const (
	MaxNicknameLen = 64
	// HelloMinLen is the least size of a hello: AppendHello pads hellos
	// with zeros to it, and a plaintext peer answers none shorter, so that
	// no accept or reject (at most 17+255 bytes) is larger than the hello
	// it answers, whoever forged its source address.
	HelloMinLen         = 288
	MaxRejectMessageLen = 255
	MaxChannelLen       = 32
	MaxGossipPayload    = 60000
	MaxPrefixes         = 4096 // prefixes one peer may serve
)

// UDPOverhead is what the overlay adds to every packet on an IPv4 underlay:
// the IPv4 header (20), the UDP header (8) and DataHeaderLen (16).
const UDPOverhead = 20 + 8 + DataHeaderLen

// Type is the message type in byte 1 of the header.
type Type uint8

// Message types.
const (
	TypeHello     Type = 1
	TypeAccept    Type = 2
	TypeReject    Type = 3
	TypeHeartbeat Type = 4
	TypeGossip    Type = 5
	TypeData      Type = 6
	// Password mode (see secure.go): the handshake, then sealed control.
	TypeInit     Type = 7  // handshake request, with a cookie
	TypeCookie   Type = 8  // a cookie for the dialler to prove its address with
	TypeResponse Type = 9  // handshake answer
	TypeFinish   Type = 10 // handshake conclusion, from the dialler
	TypeSealed   Type = 11 // a heartbeat or gossip message, encrypted and authenticated
	// TypeMax is the highest type defined.
	TypeMax = TypeSealed
)

var typeNames = [...]string{"", "hello", "accept", "reject", "heartbeat", "gossip", "data",
	"init", "cookie", "response", "finish", "sealed"}

func (t Type) String() string {
	if int(t) < len(typeNames) && t != 0 {
		return typeNames[t]
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// FlagEstablished, on a heartbeat, says the sender considers the connection
// established.
const FlagEstablished = 0x01

// FlagConfigured, on a hello, says the sender dials us because an operator
// configured it to (not discovery): it may take a place kept free for such
// peers under the connection limit.
const FlagConfigured = 0x01

// Decoding errors. Every decoder wraps one of these, so callers can count
// rejected datagrams by kind.
var (
	ErrShort    = errors.New("proto: message too short")
	ErrVersion  = errors.New("proto: unsupported wire version")
	ErrType     = errors.New("proto: unknown message type")
	ErrMalform  = errors.New("proto: malformed message")
	ErrTooLarge = errors.New("proto: message too large")
)

// Header is the first 4 bytes of every datagram.
type Header struct {
	Version uint8
	Type    Type
	Flags   uint8
}

// ParseHeader decodes and checks the header of b.
func ParseHeader(b []byte) (Header, error) {
	if len(b) < HeaderLen {
		return Header{}, fmt.Errorf("%w: %d bytes, header needs %d", ErrShort, len(b), HeaderLen)
	}
	h := Header{Version: b[0], Type: Type(b[1]), Flags: b[2]}
	if h.Version != Version {
		return h, fmt.Errorf("%w %d", ErrVersion, h.Version)
	}
	if h.Type < TypeHello || h.Type > TypeMax {
		return h, fmt.Errorf("%w %d", ErrType, uint8(h.Type))
	}
	return h, nil
}

func putHeader(b []byte, t Type, flags uint8) {
	b[0], b[1], b[2], b[3] = Version, byte(t), flags, 0
}

// Hello is the body of hello and accept messages: who the sender is and what
// it speaks.
type Hello struct {
	MinVersion, MaxVersion uint8
	Name                   PeerName
	UID                    uint64
	Port                   uint16
	Range                  netip.Prefix // the sender's IPAM range; invalid if none
	Nickname               string
	// DataPort is the UDP port of the sender's WireGuard data plane
	// (password mode); 0: it has none. Sent after the nickname, and only
	// when not zero, so that older peers read the same hello.
	DataPort uint16
	// SignKey is the sender's Ed25519 public key (password mode), which
	// signs its gossip; zero: none. Sent after DataPort (then always
	// present, zero or not), and only when not zero or Trusted is set.
	SignKey [32]byte
	// Trusted says the sender trusts the receiver's underlay address (it
	// lies in the sender's --trusted-subnets): data may cross in clear if
	// the receiver trusts the sender's too (password mode). Sent after
	// SignKey (then always present, zero or not), as a flags byte (bit
	// 0), and only when set.
	Trusted bool
	// Proof, in an accept (plaintext mode), is what the dialler must send
	// back in its heartbeats before we take its gossip or count it
	// established: only a dialler that receives at the address it claims
	// learns it, so a hello from a forged address opens nothing. Sent
	// after the flags byte (then always present), and only when not zero.
	Proof uint64
}

// helloTrusted is bit 0 of the hello's optional flags byte.
const helloTrusted = 0x01

// AppendHello appends a hello (t == TypeHello) or accept (t == TypeAccept)
// message to b. A nickname longer than MaxNicknameLen is cut.
func AppendHello(b []byte, t Type, h *Hello) []byte {
	nick := truncate(h.Nickname, MaxNicknameLen)
	start := len(b)
	b = appendHeader(b, t, 0)
	b = append(b, h.MinVersion, h.MaxVersion)
	b = appendName(b, h.Name)
	b = binary.BigEndian.AppendUint64(b, h.UID)
	b = binary.BigEndian.AppendUint16(b, h.Port)
	b = appendPrefix(b, h.Range)
	b = append(b, byte(len(nick)))
	b = append(b, nick...)
	// Each optional field is sent if it or a later one is set.
	if h.DataPort != 0 || h.SignKey != [32]byte{} || h.Trusted || h.Proof != 0 {
		b = binary.BigEndian.AppendUint16(b, h.DataPort)
	}
	if h.SignKey != [32]byte{} || h.Trusted || h.Proof != 0 {
		b = append(b, h.SignKey[:]...)
	}
	if h.Trusted || h.Proof != 0 {
		var flags byte
		if h.Trusted {
			flags |= helloTrusted
		}
		b = append(b, flags)
	}
	if h.Proof != 0 {
		b = binary.BigEndian.AppendUint64(b, h.Proof)
	}
	if t == TypeHello {
		// Zeros read as absent optional fields, then as ignored trailing
		// bytes.
		for len(b) < start+HelloMinLen {
			b = append(b, 0)
		}
	}
	return b
}

// ParseHello decodes a hello or accept message (header included).
func ParseHello(b []byte) (Hello, error) {
	var h Hello
	hd, err := ParseHeader(b)
	if err != nil {
		return h, err
	}
	if hd.Type != TypeHello && hd.Type != TypeAccept {
		return h, fmt.Errorf("%w: %v is not a hello", ErrType, hd.Type)
	}
	if len(b) < helloFixedLen {
		return h, fmt.Errorf("%w: hello of %d bytes", ErrShort, len(b))
	}
	p := b[HeaderLen:]
	h.MinVersion, h.MaxVersion = p[0], p[1]
	h.Name = getName(p[2:])
	h.UID = binary.BigEndian.Uint64(p[8:])
	h.Port = binary.BigEndian.Uint16(p[16:])
	if h.Range, err = getPrefix(p[18:]); err != nil {
		return h, err
	}
	n := int(p[23])
	if n > MaxNicknameLen {
		return h, fmt.Errorf("%w: nickname of %d bytes", ErrMalform, n)
	}
	if len(p) < 24+n {
		return h, fmt.Errorf("%w: nickname cut short", ErrShort)
	}
	nick := p[24 : 24+n]
	if !utf8.Valid(nick) {
		return h, fmt.Errorf("%w: nickname is not UTF-8", ErrMalform)
	}
	h.Nickname = string(nick)
	if rest := p[24+n:]; len(rest) >= 2 {
		h.DataPort = binary.BigEndian.Uint16(rest)
		if rest = rest[2:]; len(rest) >= len(h.SignKey) {
			h.SignKey = [32]byte(rest)
			if rest = rest[len(h.SignKey):]; len(rest) >= 1 {
				h.Trusted = rest[0]&helloTrusted != 0 // other bits: later flags
				if rest = rest[1:]; len(rest) >= 8 {
					h.Proof = binary.BigEndian.Uint64(rest)
				}
			}
		}
	}
	switch {
	case h.Name == 0:
		return h, fmt.Errorf("%w: zero peer name", ErrMalform)
	case h.UID == 0:
		return h, fmt.Errorf("%w: zero UID", ErrMalform)
	case h.MinVersion == 0 || h.MinVersion > h.MaxVersion:
		return h, fmt.Errorf("%w: version range [%d,%d]", ErrMalform, h.MinVersion, h.MaxVersion)
	}
	return h, nil
}

// RejectCode says why a hello was refused.
type RejectCode uint8

// Reject codes.
const (
	RejectRange     RejectCode = 1 // IPAM ranges differ
	RejectCollision RejectCode = 2 // the dialler has our name
	RejectVersion   RejectCode = 3 // no protocol version in common
	RejectOther     RejectCode = 4
	// Password mode. These rejects carry no name, range or message, so a
	// peer without the password learns nothing from them.
	RejectNeedPassword     RejectCode = 5 // we have a password and the dialler has none
	RejectNoPassword       RejectCode = 6 // the dialler has a password and we have none
	RejectPasswordMismatch RejectCode = 7 // the dialler's password differs from ours
)

// Reject refuses a hello.
type Reject struct {
	Code    RejectCode
	Name    PeerName     // the refusing peer
	Range   netip.Prefix // the refusing peer's IPAM range; invalid if none
	Message string
}

// AppendReject appends a reject message to b. A message longer than
// MaxRejectMessageLen is cut.
func AppendReject(b []byte, r *Reject) []byte {
	msg := truncate(r.Message, MaxRejectMessageLen)
	b = appendHeader(b, TypeReject, 0)
	b = append(b, byte(r.Code))
	b = appendName(b, r.Name)
	b = appendPrefix(b, r.Range)
	b = append(b, byte(len(msg)))
	return append(b, msg...)
}

// ParseReject decodes a reject message (header included).
func ParseReject(b []byte) (Reject, error) {
	var r Reject
	hd, err := ParseHeader(b)
	if err != nil {
		return r, err
	}
	if hd.Type != TypeReject {
		return r, fmt.Errorf("%w: %v is not a reject", ErrType, hd.Type)
	}
	if len(b) < rejectFixedLen {
		return r, fmt.Errorf("%w: reject of %d bytes", ErrShort, len(b))
	}
	p := b[HeaderLen:]
	r.Code = RejectCode(p[0])
	if r.Code < RejectRange || r.Code > RejectPasswordMismatch {
		return r, fmt.Errorf("%w: reject code %d", ErrMalform, p[0])
	}
	r.Name = getName(p[1:])
	if r.Range, err = getPrefix(p[7:]); err != nil {
		return r, err
	}
	n := int(p[12])
	if len(p) < 13+n {
		return r, fmt.Errorf("%w: reject message cut short", ErrShort)
	}
	if !utf8.Valid(p[13 : 13+n]) {
		return r, fmt.Errorf("%w: reject message is not UTF-8", ErrMalform)
	}
	r.Message = string(p[13 : 13+n])
	return r, nil
}

// Heartbeat proves a connection is alive.
type Heartbeat struct {
	Name        PeerName
	UID         uint64
	Established bool // the sender considers the connection established
	// Proof is the accept's proof, sent back by the dialler (plaintext
	// mode); sent after the UID only when not zero.
	Proof uint64
}

// AppendHeartbeat appends a heartbeat message to b.
func AppendHeartbeat(b []byte, h Heartbeat) []byte {
	var flags uint8
	if h.Established {
		flags = FlagEstablished
	}
	b = appendHeader(b, TypeHeartbeat, flags)
	b = appendName(b, h.Name)
	b = binary.BigEndian.AppendUint64(b, h.UID)
	if h.Proof != 0 {
		b = binary.BigEndian.AppendUint64(b, h.Proof)
	}
	return b
}

// ParseHeartbeat decodes a heartbeat message (header included).
func ParseHeartbeat(b []byte) (Heartbeat, error) {
	hd, err := ParseHeader(b)
	if err != nil {
		return Heartbeat{}, err
	}
	if hd.Type != TypeHeartbeat {
		return Heartbeat{}, fmt.Errorf("%w: %v is not a heartbeat", ErrType, hd.Type)
	}
	if len(b) < HeartbeatLen {
		return Heartbeat{}, fmt.Errorf("%w: heartbeat of %d bytes", ErrShort, len(b))
	}
	hb := Heartbeat{
		Name:        getName(b[HeaderLen:]),
		UID:         binary.BigEndian.Uint64(b[HeaderLen+PeerNameLen:]),
		Established: hd.Flags&FlagEstablished != 0,
	}
	if len(b) >= HeartbeatLen+8 {
		hb.Proof = binary.BigEndian.Uint64(b[HeartbeatLen:])
	}
	return hb, nil
}

// Gossip carries opaque control-plane state for one named channel.
type Gossip struct {
	Channel string
	Src     PeerName // the origin
	Dst     PeerName // 0 means every peer
	Hops    uint8    // relays it has crossed (byte 3 of the header)
	// Chunk is set when Payload is one piece of a larger message.
	Chunk   *Chunk
	Payload []byte // aliases the buffer given to ParseGossip
}

// Chunk places a piece of a gossip message that was split to fit in
// datagrams.
type Chunk struct {
	MsgID uint32 // chosen by the origin; unique among its messages in flight
	Index uint16 // 0-based
	Count uint16 // pieces in all, at least 2
}

// FlagChunk, on gossip, says a chunk header follows the destination.
const FlagChunk = 0x01

const chunkLen = 8

// AppendGossip appends a gossip message to b. It fails for a channel name or
// payload over the limits.
func AppendGossip(b []byte, g *Gossip) ([]byte, error) {
	if len(g.Channel) == 0 || len(g.Channel) > MaxChannelLen {
		return b, fmt.Errorf("%w: channel name of %d bytes", ErrMalform, len(g.Channel))
	}
	if len(g.Payload) > MaxGossipPayload {
		return b, fmt.Errorf("%w: gossip payload of %d bytes", ErrTooLarge, len(g.Payload))
	}
	var flags uint8
	if g.Chunk != nil {
		if g.Chunk.Count < 2 || g.Chunk.Index >= g.Chunk.Count {
			return b, fmt.Errorf("%w: chunk %d of %d", ErrMalform, g.Chunk.Index, g.Chunk.Count)
		}
		flags = FlagChunk
	}
	b = append(b, Version, byte(TypeGossip), flags, g.Hops)
	b = append(b, byte(len(g.Channel)))
	b = append(b, g.Channel...)
	b = appendName(b, g.Src)
	b = appendName(b, g.Dst)
	if g.Chunk != nil {
		b = binary.BigEndian.AppendUint32(b, g.Chunk.MsgID)
		b = binary.BigEndian.AppendUint16(b, g.Chunk.Index)
		b = binary.BigEndian.AppendUint16(b, g.Chunk.Count)
	}
	return append(b, g.Payload...), nil
}

// ParseGossip decodes a gossip message (header included). The returned
// Payload aliases b.
func ParseGossip(b []byte) (Gossip, error) {
	var g Gossip
	hd, err := ParseHeader(b)
	if err != nil {
		return g, err
	}
	if hd.Type != TypeGossip {
		return g, fmt.Errorf("%w: %v is not gossip", ErrType, hd.Type)
	}
	if len(b) < gossipFixedLen+1 {
		return g, fmt.Errorf("%w: gossip of %d bytes", ErrShort, len(b))
	}
	p := b[HeaderLen:]
	n := int(p[0])
	if n == 0 || n > MaxChannelLen {
		return g, fmt.Errorf("%w: channel name of %d bytes", ErrMalform, n)
	}
	if len(p) < 1+n+2*PeerNameLen {
		return g, fmt.Errorf("%w: gossip cut short", ErrShort)
	}
	ch := p[1 : 1+n]
	for _, c := range ch {
		if c <= ' ' || c >= 0x7f {
			return g, fmt.Errorf("%w: channel name is not printable ASCII", ErrMalform)
		}
	}
	g.Channel = string(ch)
	g.Src = getName(p[1+n:])
	g.Dst = getName(p[1+n+PeerNameLen:])
	g.Hops = b[3]
	g.Payload = p[1+n+2*PeerNameLen:]
	if hd.Flags&FlagChunk != 0 {
		if len(g.Payload) < chunkLen {
			return g, fmt.Errorf("%w: chunk header cut short", ErrShort)
		}
		c := Chunk{MsgID: binary.BigEndian.Uint32(g.Payload), Index: binary.BigEndian.Uint16(g.Payload[4:]),
			Count: binary.BigEndian.Uint16(g.Payload[6:])}
		if c.Count < 2 || c.Index >= c.Count {
			return g, fmt.Errorf("%w: chunk %d of %d", ErrMalform, c.Index, c.Count)
		}
		g.Chunk = &c
		g.Payload = g.Payload[chunkLen:]
	}
	if g.Src == 0 {
		return g, fmt.Errorf("%w: zero origin", ErrMalform)
	}
	if len(g.Payload) > MaxGossipPayload {
		return g, fmt.Errorf("%w: gossip payload of %d bytes", ErrTooLarge, len(g.Payload))
	}
	return g, nil
}

// PutDataHeader writes the 16-byte data header into b[:DataHeaderLen], in
// place in front of the packet that follows it. It does not allocate.
func PutDataHeader(b []byte, src, dst PeerName) {
	_ = b[DataHeaderLen-1]
	putHeader(b, TypeData, 0)
	putName(b[HeaderLen:], src)
	putName(b[HeaderLen+PeerNameLen:], dst)
}

// ParseData decodes the header of a data message and returns the source and
// destination peers and the packet, which aliases b. It does not allocate.
// The packet must be at least a minimal IPv4 or IPv6 header.
func ParseData(b []byte) (src, dst PeerName, packet []byte, err error) {
	if len(b) < DataHeaderLen {
		return 0, 0, nil, ErrShort
	}
	if b[0] != Version {
		return 0, 0, nil, ErrVersion
	}
	if Type(b[1]) != TypeData {
		return 0, 0, nil, ErrType
	}
	src = getName(b[HeaderLen:])
	dst = getName(b[HeaderLen+PeerNameLen:])
	packet = b[DataHeaderLen:]
	if _, ok := DstAddr(packet); !ok || src == 0 || dst == 0 {
		return 0, 0, nil, ErrMalform
	}
	return src, dst, packet, nil
}

// DstAddr returns the destination address of an IPv4 or IPv6 packet, and
// false if the packet is too short or of another version. It does not
// allocate.
func DstAddr(packet []byte) (netip.Addr, bool) { return ipAddr(packet, 16, 24) }

// SrcAddr returns the source address of an IPv4 or IPv6 packet, like
// DstAddr.
func SrcAddr(packet []byte) (netip.Addr, bool) { return ipAddr(packet, 12, 8) }

// ipAddr reads the address at offset at4 of an IPv4 header or at6 of an
// IPv6 header.
func ipAddr(packet []byte, at4, at6 int) (netip.Addr, bool) {
	if len(packet) == 0 {
		return netip.Addr{}, false
	}
	switch packet[0] >> 4 {
	case 4:
		if len(packet) < 20 {
			return netip.Addr{}, false
		}
		return netip.AddrFrom4([4]byte(packet[at4 : at4+4])), true
	case 6:
		if len(packet) < 40 {
			return netip.Addr{}, false
		}
		return netip.AddrFrom16([16]byte(packet[at6 : at6+16])), true
	}
	return netip.Addr{}, false
}

func appendHeader(b []byte, t Type, flags uint8) []byte {
	return append(b, Version, byte(t), flags, 0)
}

func appendName(b []byte, n PeerName) []byte {
	return append(b, byte(n>>40), byte(n>>32), byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
}

const noPrefixBits = 255

func appendPrefix(b []byte, p netip.Prefix) []byte {
	if !p.IsValid() || !p.Addr().Is4() {
		return append(b, 0, 0, 0, 0, noPrefixBits)
	}
	a := p.Addr().As4()
	return append(b, a[0], a[1], a[2], a[3], byte(p.Bits()))
}

// getPrefix decodes a 5-byte IPv4 prefix; "none" decodes as the invalid
// prefix.
func getPrefix(b []byte) (netip.Prefix, error) {
	_ = b[4]
	addr := netip.AddrFrom4([4]byte(b[:4]))
	bits := int(b[4])
	if bits == noPrefixBits {
		if !addr.IsUnspecified() {
			return netip.Prefix{}, fmt.Errorf("%w: address %v with no prefix length", ErrMalform, addr)
		}
		return netip.Prefix{}, nil
	}
	if bits > 32 {
		return netip.Prefix{}, fmt.Errorf("%w: prefix length %d", ErrMalform, bits)
	}
	return netip.PrefixFrom(addr, bits), nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[:n]
	for len(s) > 0 && !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s
}

// GossipSigLen is the length of the Ed25519 signature that ends the
// payload of a gossip message on a channel other than topology in password
// mode: its origin signs GossipSigned, after any chunks are put together.
const GossipSigLen = 64

// gossipSignContext starts what a gossip signature covers.
const gossipSignContext = "overlayd gossip v1\x00"

// GossipSigned is what the origin of a gossip message signs: the channel,
// the origin, the destination and the payload, so that a relay can
// neither forge a message nor hand one to another peer.
func GossipSigned(channel string, src, dst PeerName, payload []byte) []byte {
	b := make([]byte, 0, len(gossipSignContext)+1+len(channel)+12+len(payload))
	b = append(b, gossipSignContext...)
	b = append(b, byte(len(channel)))
	b = append(b, channel...)
	b = appendName(b, src)
	b = appendName(b, dst)
	return append(b, payload...)
}
