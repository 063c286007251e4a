// Package secure is the cryptography of password mode, made of standard
// pieces: a key derived from the password with Argon2id, a long-term X25519
// identity key per peer, cookies (HMAC-SHA256 of the dialler's address)
// that prove a dialler receives what is sent to it before any state is
// kept for it, the Noise XXpsk0 handshake (github.com/flynn/noise, with
// WireGuard's primitives: Curve25519, ChaCha20-Poly1305, BLAKE2s) that
// proves both sides know the password and authenticates their keys, and
// the sealed framing of control messages after it, with per-direction keys,
// explicit counters and WireGuard's replay window.
//
// Why XXpsk0: the password is mixed in before the first byte is encrypted,
// so a peer without it can read nothing of the first message (the dialler's
// name, nickname and range) and can produce nothing the responder accepts;
// each side's static key travels encrypted and is authenticated by the DH
// operations; both sides' fresh ephemeral keys make every session's keys
// new, so a replayed handshake message completes nothing. The hellos ride
// in the handshake payloads, so the session is bound to both names and
// both keys.
//
// The package is pure: no sockets, clocks or goroutines. Randomness comes
// from the io.Reader the caller gives (crypto/rand.Reader in overlayd).
package secure

import (
	"bytes"
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net/netip"
	"strings"

	"github.com/flynn/noise"
	"golang.org/x/crypto/argon2"
	"golang.org/x/crypto/curve25519"
	"golang.zx2c4.com/wireguard/replay"

	"github.com/overlayd/overlayd/proto"
)

// Key is an X25519 key, public or private.
type Key [32]byte

func (k Key) String() string { return base64.StdEncoding.EncodeToString(k[:]) }

// Identity is a peer's long-term key pair.
type Identity struct {
	Private Key
	Public  Key
}

// NewIdentity draws a new key pair from rand.
func NewIdentity(rand io.Reader) (Identity, error) {
	var id Identity
	if _, err := io.ReadFull(rand, id.Private[:]); err != nil {
		return id, fmt.Errorf("secure: drawing a key: %w", err)
	}
	return identityFrom(id.Private)
}

func identityFrom(priv Key) (Identity, error) {
	// Clamp as X25519 does, so the stored key is the one used.
	priv[0] &= 248
	priv[31] = priv[31]&127 | 64
	pub, err := curve25519.X25519(priv[:], curve25519.Basepoint)
	if err != nil {
		return Identity{}, fmt.Errorf("secure: %w", err)
	}
	return Identity{Private: priv, Public: Key(pub)}, nil
}

// MarshalText is the private key in base64 on one line, the format of
// WireGuard's `wg genkey`, so `wg pubkey < identity.key` prints the public
// key.
func (id Identity) MarshalText() []byte {
	return []byte(id.Private.String() + "\n")
}

// ParseIdentity reads what MarshalText wrote.
func ParseIdentity(text []byte) (Identity, error) {
	s := strings.TrimSpace(string(text))
	raw, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(raw) != len(Key{}) {
		return Identity{}, errors.New("secure: not a key: want 32 bytes in base64 on one line")
	}
	return identityFrom(Key(raw))
}

// SigningKey is a peer's Ed25519 key, which signs the gossip it originates
// (password mode); its public half travels in the handshake and in the
// peer's topology entry.
type SigningKey struct {
	Private ed25519.PrivateKey
	Public  [ed25519.PublicKeySize]byte
}

// NewSigningKey draws a new signing key from rand.
func NewSigningKey(rand io.Reader) (SigningKey, error) {
	seed := make([]byte, ed25519.SeedSize)
	if _, err := io.ReadFull(rand, seed); err != nil {
		return SigningKey{}, fmt.Errorf("secure: drawing a key: %w", err)
	}
	return signingKeyFrom(seed), nil
}

func signingKeyFrom(seed []byte) SigningKey {
	priv := ed25519.NewKeyFromSeed(seed)
	return SigningKey{Private: priv, Public: [ed25519.PublicKeySize]byte(priv.Public().(ed25519.PublicKey))}
}

// MarshalText is the key's seed in base64 on one line.
func (k SigningKey) MarshalText() []byte {
	return []byte(base64.StdEncoding.EncodeToString(k.Private.Seed()) + "\n")
}

// ParseSigningKey reads what MarshalText wrote.
func ParseSigningKey(text []byte) (SigningKey, error) {
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(text)))
	if err != nil || len(raw) != ed25519.SeedSize {
		return SigningKey{}, errors.New("secure: not a signing key: want a 32-byte seed in base64 on one line")
	}
	return signingKeyFrom(raw), nil
}

// Sign signs msg.
func (k SigningKey) Sign(msg []byte) [ed25519.SignatureSize]byte {
	return [ed25519.SignatureSize]byte(ed25519.Sign(k.Private, msg))
}

// PSK is the key every peer derives from the shared password.
type PSK [32]byte

// The Argon2id parameters and salt: fixed, because every peer must derive
// the same key from the same password with nothing exchanged first. The
// cost (about 0.1 s and 64 MiB, once at start) is what a guess costs an
// attacker who recorded a handshake.
const (
	argonTime    = 3
	argonMemory  = 64 * 1024 // KiB
	argonThreads = 4
	argonSalt    = "overlayd mesh password v1"
)

// DataKey is the preshared key of the WireGuard data plane: HKDF-SHA256 of
// the password's key with its own label, so that the two uses share no key.
func (k PSK) DataKey() [32]byte {
	// HKDF fails only for keys longer than 255 hashes; 32 bytes is one.
	out, _ := hkdf.Key(sha256.New, k[:], nil, "overlayd wireguard psk v1", 32)
	return [32]byte(out)
}

// DeriveKey turns the password into the handshake's preshared key.
func DeriveKey(password []byte) PSK {
	return PSK(argon2.IDKey(password, []byte(argonSalt), argonTime, argonMemory, argonThreads, 32))
}

// Cookies makes and checks the cookies that prove a dialler's address: a
// MAC of the address under a secret that rotates, the previous secret still
// accepted, so a cookie stays good for one to two rotation periods.
type Cookies struct {
	cur, prev [32]byte
}

// NewCookies draws the first secret.
func NewCookies(rand io.Reader) (*Cookies, error) {
	c := &Cookies{}
	if err := c.Rotate(rand); err != nil {
		return nil, err
	}
	c.prev = c.cur
	return c, nil
}

// Rotate draws a new secret; cookies made under the one before stay valid
// until the next rotation.
func (c *Cookies) Rotate(rand io.Reader) error {
	c.prev = c.cur
	if _, err := io.ReadFull(rand, c.cur[:]); err != nil {
		return fmt.Errorf("secure: drawing a cookie secret: %w", err)
	}
	return nil
}

// Make is the cookie for a dialler at ep.
func (c *Cookies) Make(ep netip.AddrPort) proto.Cookie { return mac(&c.cur, ep) }

// Valid reports whether cookie is the one a dialler at ep was given.
func (c *Cookies) Valid(ep netip.AddrPort, cookie proto.Cookie) bool {
	a, b := mac(&c.cur, ep), mac(&c.prev, ep)
	return subtle.ConstantTimeCompare(a[:], cookie[:])|subtle.ConstantTimeCompare(b[:], cookie[:]) == 1
}

func mac(secret *[32]byte, ep netip.AddrPort) proto.Cookie {
	h := hmac.New(sha256.New, secret[:])
	a := ep.Addr().As16()
	h.Write(a[:])
	h.Write([]byte{byte(ep.Port() >> 8), byte(ep.Port())})
	var c proto.Cookie
	copy(c[:], h.Sum(nil))
	return c
}

// Config is our side of every handshake.
type Config struct {
	Identity Identity
	PSK      PSK
	Random   io.Reader
}

var suite = noise.NewCipherSuite(noise.DH25519, noise.CipherChaChaPoly, noise.HashBLAKE2s)

// prologue binds the handshake to this protocol and version.
var prologue = []byte("overlayd handshake v1")

// A handshake's ephemeral key comes from a generator seeded once from
// Config.Random, so that the handshake can be rebuilt exactly. That is how
// a forged message is undone: the noise package does not restore its
// cipher state after a message fails to open, so the state is made again
// from the seed and the messages that did open.
type seed [32]byte

func (c *Config) seed() (seed, error) {
	var s seed
	if _, err := io.ReadFull(c.Random, s[:]); err != nil {
		return s, fmt.Errorf("secure: drawing an ephemeral key seed: %w", err)
	}
	return s, nil
}

// state makes a fresh handshake state whose randomness is the generator
// seeded with sd (ChaCha8, a cryptographically strong generator).
func (c *Config) state(initiator bool, sd seed) (*noise.HandshakeState, error) {
	return noise.NewHandshakeState(noise.Config{
		CipherSuite:           suite,
		Random:                mrand.NewChaCha8(sd),
		Pattern:               noise.HandshakeXX,
		Initiator:             initiator,
		Prologue:              prologue,
		PresharedKey:          c.PSK[:],
		PresharedKeyPlacement: 0,
		StaticKeypair:         noise.DHKey{Private: c.Identity.Private[:], Public: c.Identity.Public[:]},
	})
}

// Errors of the handshake and of sealed messages.
var (
	// ErrPassword: the first handshake message does not open with our
	// password. Either the dialler's password differs from ours or the
	// message was altered on the way; nobody can tell which.
	ErrPassword = errors.New("secure: the handshake does not open with our password")
	// ErrHandshake: a later handshake message is malformed or forged.
	ErrHandshake = errors.New("secure: handshake message refused")
	ErrForged    = errors.New("secure: sealed message does not authenticate")
	ErrReplayed  = errors.New("secure: sealed message replayed or too old")
	ErrExhausted = errors.New("secure: session has sealed all the messages it may")
)

// Initiator is the dialler's side of one handshake attempt.
type Initiator struct {
	cfg   *Config
	seed  seed
	hello []byte
	hs    *noise.HandshakeState
}

// Initiate starts a handshake whose first message carries hello (the
// dialler's identity, encrypted under the password). It returns the
// message's handshake bytes.
func Initiate(c *Config, hello []byte) (*Initiator, []byte, error) {
	sd, err := c.seed()
	if err != nil {
		return nil, nil, err
	}
	i := &Initiator{cfg: c, seed: sd, hello: hello}
	msg, err := i.start()
	if err != nil {
		return nil, nil, err
	}
	return i, msg, nil
}

// start makes the handshake state and writes the first message; the same
// bytes every time for one Initiator.
func (i *Initiator) start() ([]byte, error) {
	hs, err := i.cfg.state(true, i.seed)
	if err != nil {
		return nil, err
	}
	msg, _, _, err := hs.WriteMessage(nil, i.hello)
	if err != nil {
		return nil, fmt.Errorf("secure: %w", err)
	}
	i.hs = hs
	return msg, nil
}

// ReadResponse opens the responder's answer and returns its hello. A
// message that does not open leaves the Initiator as it was, ready for
// the real one.
func (i *Initiator) ReadResponse(msg []byte) ([]byte, error) {
	if i.hs.MessageIndex() != 1 {
		return nil, fmt.Errorf("%w: out of turn", ErrHandshake)
	}
	hello, _, _, err := i.hs.ReadMessage(nil, msg)
	if err != nil {
		if _, rerr := i.start(); rerr != nil {
			return nil, rerr
		}
		return nil, fmt.Errorf("%w: %v", ErrHandshake, err)
	}
	return hello, nil
}

// PeerKey is the responder's identity key, known once ReadResponse has
// succeeded (zero before).
func (i *Initiator) PeerKey() Key {
	var k Key
	if ps := i.hs.PeerStatic(); len(ps) == len(k) {
		k = Key(ps)
	}
	return k
}

// Finish writes the last handshake message and returns it with the
// session it opens.
func (i *Initiator) Finish() ([]byte, *Session, error) {
	if i.hs.MessageIndex() != 2 {
		return nil, nil, fmt.Errorf("%w: out of turn", ErrHandshake)
	}
	msg, send, recv, err := i.hs.WriteMessage(nil, nil)
	if err != nil || send == nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrHandshake, err)
	}
	return msg, newSession(send, recv, i.hs.PeerStatic()), nil
}

// Responder is the answering side of one handshake.
type Responder struct {
	cfg    *Config
	seed   seed
	init   []byte // the dialler's first message
	answer []byte // our hello, once answered
	hs     *noise.HandshakeState
}

// Respond opens a dialler's first message and returns its hello. It fails
// with ErrPassword when the message does not open with our password.
func Respond(c *Config, msg []byte) (*Responder, []byte, error) {
	sd, err := c.seed()
	if err != nil {
		return nil, nil, err
	}
	r := &Responder{cfg: c, seed: sd, init: bytes.Clone(msg)}
	hello, err := r.start()
	switch {
	case errors.Is(err, noise.ErrShortMessage):
		return nil, nil, fmt.Errorf("%w: %v", ErrHandshake, err)
	case err != nil:
		return nil, nil, ErrPassword
	}
	return r, hello, nil
}

// start makes the handshake state, reads the first message and, once we
// answered, writes the same answer again.
func (r *Responder) start() ([]byte, error) {
	hs, err := r.cfg.state(false, r.seed)
	if err != nil {
		return nil, err
	}
	hello, _, _, err := hs.ReadMessage(nil, r.init)
	if err != nil {
		return nil, err
	}
	if r.answer != nil {
		if _, _, _, err := hs.WriteMessage(nil, r.answer); err != nil {
			return nil, err
		}
	}
	r.hs = hs
	return hello, nil
}

// Answer writes the response, carrying our hello.
func (r *Responder) Answer(hello []byte) ([]byte, error) {
	if r.hs.MessageIndex() != 1 {
		return nil, fmt.Errorf("%w: out of turn", ErrHandshake)
	}
	msg, _, _, err := r.hs.WriteMessage(nil, hello)
	if err != nil {
		return nil, fmt.Errorf("secure: %w", err)
	}
	r.answer = append([]byte{}, hello...)
	return msg, nil
}

// ReadFinish opens the dialler's last message and returns the session. A
// message that does not open leaves the Responder as it was, ready for
// the real one.
func (r *Responder) ReadFinish(msg []byte) (*Session, error) {
	if r.hs.MessageIndex() != 2 {
		return nil, fmt.Errorf("%w: out of turn", ErrHandshake)
	}
	_, recv, send, err := r.hs.ReadMessage(nil, msg)
	if err != nil || recv == nil {
		if _, rerr := r.start(); rerr != nil {
			return nil, rerr
		}
		return nil, fmt.Errorf("%w: %v", ErrHandshake, err)
	}
	return newSession(send, recv, r.hs.PeerStatic()), nil
}

// rejectAfter is the last counter a session seals or opens; a session
// that reaches it is replaced by a new handshake (WireGuard's limit).
const rejectAfter = 1<<64 - 1<<13 - 1

// Session seals and opens the control messages of one connection. Not safe
// for concurrent use.
type Session struct {
	send, recv noise.Cipher
	next       uint64 // counter of the next message sealed
	filter     replay.Filter
	peer       Key
}

func newSession(send, recv *noise.CipherState, peer []byte) *Session {
	return &Session{send: send.Cipher(), recv: recv.Cipher(), peer: Key(peer)}
}

// Peer is the remote peer's public key, authenticated by the handshake.
func (s *Session) Peer() Key { return s.peer }

// Seal appends a sealed message carrying inner to dst.
func (s *Session) Seal(dst, inner []byte) ([]byte, error) {
	if s.next >= rejectAfter {
		return dst, ErrExhausted
	}
	n := s.next
	s.next++
	start := len(dst)
	dst = proto.AppendSealedHead(dst, n)
	return s.send.Encrypt(dst, n, dst[start:], inner), nil
}

// Open authenticates a sealed message, checks its counter against the
// replay window (after authenticating, so forgeries move nothing), and
// appends its content to dst.
func (s *Session) Open(dst, msg []byte) ([]byte, error) {
	n, ad, ct, err := proto.ParseSealed(msg)
	if err != nil {
		return dst, err
	}
	out, err := s.recv.Decrypt(dst, n, ad, ct)
	if err != nil {
		return dst, ErrForged
	}
	if !s.filter.ValidateCounter(n, rejectAfter) {
		return dst, ErrReplayed
	}
	return out, nil
}
