package proto

import (
	"encoding/binary"
	"fmt"
)

// Password mode messages (types 7 to 11): the framing only. What the
// handshake bytes mean and how sealed messages are opened is the business
// of peering/secure; this package checks lengths and nothing else.

// CookieLen is the size of a cookie: a MAC of the dialler's address that
// proves it receives what is sent there.
const CookieLen = 16

// Sizes of the password-mode messages.
const (
	initFixedLen  = HeaderLen + CookieLen
	CookieMsgLen  = HeaderLen + CookieLen
	SealedHeadLen = HeaderLen + 8 // header and counter: the sealed message's additional data
	// SealTagLen is the AEAD tag after a sealed message's ciphertext.
	SealTagLen = 16
	// MaxHandshakeLen bounds the handshake bytes of an init, response or
	// finish: two keys, two tags and a hello are far less.
	MaxHandshakeLen = 512
)

// Cookie is the token a responder hands a dialler (see AppendCookie).
type Cookie [CookieLen]byte

// Init is the first message of a password-mode handshake.
type Init struct {
	Configured bool   // the dialler dials us because an operator told it to
	Cookie     Cookie // zero on the first attempt
	Handshake  []byte // aliases the buffer given to ParseInit
}

// AppendInit appends an init message to b.
func AppendInit(b []byte, in *Init) []byte {
	var flags uint8
	if in.Configured {
		flags = FlagConfigured
	}
	b = appendHeader(b, TypeInit, flags)
	b = append(b, in.Cookie[:]...)
	return append(b, in.Handshake...)
}

// ParseInit decodes an init message (header included).
func ParseInit(b []byte) (Init, error) {
	var in Init
	hd, err := parseTyped(b, TypeInit, initFixedLen+1)
	if err != nil {
		return in, err
	}
	in.Configured = hd.Flags&FlagConfigured != 0
	copy(in.Cookie[:], b[HeaderLen:])
	in.Handshake = b[initFixedLen:]
	if len(in.Handshake) > MaxHandshakeLen {
		return in, fmt.Errorf("%w: handshake of %d bytes", ErrTooLarge, len(in.Handshake))
	}
	return in, nil
}

// AppendCookie appends a cookie message, the answer to an init without a
// valid cookie: it is smaller than any init, so it amplifies nothing.
func AppendCookie(b []byte, c Cookie) []byte {
	b = appendHeader(b, TypeCookie, 0)
	return append(b, c[:]...)
}

// ParseCookie decodes a cookie message (header included).
func ParseCookie(b []byte) (Cookie, error) {
	var c Cookie
	if _, err := parseTyped(b, TypeCookie, CookieMsgLen); err != nil {
		return c, err
	}
	copy(c[:], b[HeaderLen:])
	return c, nil
}

// AppendHandshake appends a response (TypeResponse) or finish (TypeFinish)
// message carrying the handshake bytes hs.
func AppendHandshake(b []byte, t Type, hs []byte) []byte {
	b = appendHeader(b, t, 0)
	return append(b, hs...)
}

// ParseHandshake decodes a response or finish message of type t and
// returns its handshake bytes, which alias b.
func ParseHandshake(b []byte, t Type) ([]byte, error) {
	if t != TypeResponse && t != TypeFinish {
		return nil, fmt.Errorf("%w: %v carries no handshake", ErrType, t)
	}
	if _, err := parseTyped(b, t, HeaderLen+1); err != nil {
		return nil, err
	}
	if len(b)-HeaderLen > MaxHandshakeLen {
		return nil, fmt.Errorf("%w: handshake of %d bytes", ErrTooLarge, len(b)-HeaderLen)
	}
	return b[HeaderLen:], nil
}

// AppendSealedHead appends the header and counter of a sealed message; the
// caller appends the ciphertext, sealed with these SealedHeadLen bytes as
// its additional data.
func AppendSealedHead(b []byte, counter uint64) []byte {
	b = appendHeader(b, TypeSealed, 0)
	return binary.BigEndian.AppendUint64(b, counter)
}

// ParseSealed decodes the framing of a sealed message: its counter, the
// additional data the tag covers, and the ciphertext (tag included). All
// alias b.
func ParseSealed(b []byte) (counter uint64, ad, ciphertext []byte, err error) {
	if _, err := parseTyped(b, TypeSealed, SealedHeadLen+SealTagLen); err != nil {
		return 0, nil, nil, err
	}
	return binary.BigEndian.Uint64(b[HeaderLen:]), b[:SealedHeadLen], b[SealedHeadLen:], nil
}

// parseTyped checks b's header, its type and its minimum length.
func parseTyped(b []byte, t Type, minLen int) (Header, error) {
	hd, err := ParseHeader(b)
	if err != nil {
		return hd, err
	}
	if hd.Type != t {
		return hd, fmt.Errorf("%w: %v is not %v", ErrType, hd.Type, t)
	}
	if len(b) < minLen {
		return hd, fmt.Errorf("%w: %v of %d bytes", ErrShort, t, len(b))
	}
	return hd, nil
}
