// Package handshake decides whether two peers may talk: it checks a received
// hello or accept against our own identity and configuration, picks the
// protocol version, and maps refusals to and from reject messages.
//
// The package is pure: no sockets, clocks, goroutines or globals. The
// peering shell sends and receives the messages and keeps the connection
// state; every decision about a peer's identity is made here.
package handshake

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/overlayd/overlayd/proto"
)

// Config is our side of every handshake.
type Config struct {
	Name       proto.PeerName
	UID        uint64
	Nickname   string
	Port       uint16
	Range      netip.Prefix // our IPAM range; invalid when IPAM is off
	DataPort   uint16       // our WireGuard data port; 0: none
	SignKey    [32]byte     // our Ed25519 gossip signing key; zero: none
	MinVersion uint8        // 0 means proto.MinVersion
	MaxVersion uint8        // 0 means proto.MaxVersion
}

func (c *Config) versions() (uint8, uint8) {
	lo, hi := c.MinVersion, c.MaxVersion
	if lo == 0 {
		lo = proto.MinVersion
	}
	if hi == 0 {
		hi = proto.MaxVersion
	}
	return lo, hi
}

// Hello is the hello (or accept) we send.
func (c *Config) Hello() proto.Hello {
	lo, hi := c.versions()
	return proto.Hello{MinVersion: lo, MaxVersion: hi, Name: c.Name, UID: c.UID,
		Port: c.Port, Range: c.Range, Nickname: c.Nickname, DataPort: c.DataPort, SignKey: c.SignKey}
}

// RangeError refuses a peer whose allocation range differs from ours. Its
// text is Weave's, verbatim, because operators search their logs for it.
type RangeError struct{ Received, Ours netip.Prefix }

func (e *RangeError) Error() string {
	return fmt.Sprintf("Incompatible IP allocation ranges (received: %v, ours: %v)", e.Received, e.Ours)
}

// CollisionError refuses a peer that claims our own name. The text is
// Weave's.
type CollisionError struct{ Ours, Theirs string }

func (e *CollisionError) Error() string {
	return fmt.Sprintf("local %q and remote %q peer names collision", e.Ours, e.Theirs)
}

// VersionError refuses a peer with no protocol version in common with us.
// The text is Weave's.
type VersionError struct{ TheirMin, TheirMax, OurMin, OurMax uint8 }

func (e *VersionError) Error() string {
	return fmt.Sprintf("remote version range [%d,%d] is incompatible with ours [%d,%d]",
		e.TheirMin, e.TheirMax, e.OurMin, e.OurMax)
}

// RefusedError is a refusal the remote peer sent us, with its reason code
// and its own words.
type RefusedError struct {
	Code    proto.RejectCode
	Message string
}

func (e *RefusedError) Error() string { return "refused by peer: " + e.Message }

// PasswordProblem says how two peers' passwords disagree.
type PasswordProblem int

// Password problems.
const (
	WeLack   PasswordProblem = iota + 1 // the peer uses a password and we have none
	TheyLack                            // we use a password and the peer has none
	Mismatch                            // both use one, and they differ
)

// PasswordError refuses a peer whose password is not ours. Both sides of
// the handshake log it, each saying which side lacks or mismatches it.
type PasswordError struct{ Problem PasswordProblem }

func (e *PasswordError) Error() string {
	switch e.Problem {
	case WeLack:
		return "password: the peer uses one and we have none (set --password, --password-file or OVERLAY_PASSWORD)"
	case TheyLack:
		return "password: the peer has none and ours is set; give it the same password"
	}
	return "password: the peer's password differs from ours (or its handshake was altered on the way)"
}

// Check validates a hello or accept from a peer and returns the protocol
// version to use with it. Ranges are compatible when they are equal or when
// either side has IPAM off.
func (c *Config) Check(h *proto.Hello) (version uint8, err error) {
	lo, hi := c.versions()
	if h.Name == c.Name {
		return 0, &CollisionError{Ours: label(c.Name, c.Nickname), Theirs: label(h.Name, h.Nickname)}
	}
	if max(lo, h.MinVersion) > min(hi, h.MaxVersion) {
		return 0, &VersionError{TheirMin: h.MinVersion, TheirMax: h.MaxVersion, OurMin: lo, OurMax: hi}
	}
	if h.Range.IsValid() && c.Range.IsValid() && h.Range != c.Range {
		return 0, &RangeError{Received: h.Range, Ours: c.Range}
	}
	return min(hi, h.MaxVersion), nil
}

// Reject is the reject message that tells the peer why Check refused it.
// A password refusal says nothing else: a peer without our password learns
// neither our name nor our range from it.
func (c *Config) Reject(err error) proto.Reject {
	var pe *PasswordError
	if errors.As(err, &pe) {
		code := map[PasswordProblem]proto.RejectCode{WeLack: proto.RejectNoPassword,
			TheyLack: proto.RejectNeedPassword, Mismatch: proto.RejectPasswordMismatch}[pe.Problem]
		return proto.Reject{Code: code}
	}
	r := proto.Reject{Code: proto.RejectOther, Name: c.Name, Range: c.Range, Message: err.Error()}
	var re *RangeError
	var ce *CollisionError
	var ve *VersionError
	switch {
	case errors.As(err, &re):
		r.Code = proto.RejectRange
	case errors.As(err, &ce):
		r.Code = proto.RejectCollision
	case errors.As(err, &ve):
		r.Code = proto.RejectVersion
	}
	return r
}

// FromReject turns a reject we received into the error we report, from our
// point of view: a range refusal becomes the same RangeError the refusing
// side logged, with "received" and "ours" swapped.
func (c *Config) FromReject(r *proto.Reject) error {
	switch r.Code {
	case proto.RejectNeedPassword:
		return &PasswordError{Problem: WeLack}
	case proto.RejectNoPassword:
		return &PasswordError{Problem: TheyLack}
	case proto.RejectPasswordMismatch:
		return &PasswordError{Problem: Mismatch}
	}
	if r.Code == proto.RejectRange && r.Range.IsValid() && c.Range.IsValid() && r.Range != c.Range {
		return &RangeError{Received: r.Range, Ours: c.Range}
	}
	return &RefusedError{Code: r.Code, Message: r.Message}
}

// Permanent reports whether a handshake error will not go away by retrying:
// the peer has our name, as we found ourselves. A collision the other side
// reports is not permanent: anyone can send a reject from any address, and
// one must not stop us dialling a peer for good.
func Permanent(err error) bool {
	var ce *CollisionError
	return errors.As(err, &ce)
}

func label(n proto.PeerName, nick string) string {
	return fmt.Sprintf("%v(%s)", n, nick)
}
