package link

import (
	"errors"
	"fmt"

	"github.com/overlayd/overlayd/peering/handshake"
	"github.com/overlayd/overlayd/peering/secure"
	"github.com/overlayd/overlayd/proto"
)

// Password mode. The dialler and the responder run a Noise handshake
// (package secure) in place of hello and accept:
//
//	dialler                         responder
//	init (no cookie)        ──►
//	                        ◄──     cookie (a MAC of the dialler's address; no state kept)
//	init (cookie, msg 1)    ──►     opens msg 1 with the password: the dialler's hello
//	                        ◄──     response (msg 2): our hello; kept in responding
//	finish (msg 3)          ──►     the session is open; the connection is established
//	sealed heartbeats and gossip, both ways
//
// The responder changes nothing about its connections until the finish
// authenticates the dialler, so a replayed or forged init costs it one
// bounded entry in responding and disturbs no session. Plaintext hellos,
// heartbeats and gossip are refused and counted; so is every sealed
// message that does not authenticate or comes again.
//
// Dials that cross (each side dials the other at once) would make two
// sessions: the side with the higher name answers the other's init and
// stops its own, the side with the lower name ignores the other's init
// while its own is in flight.

// SealedStats counts what password mode refused.
type SealedStats struct {
	Unsealed  uint64 // plaintext control messages while a password is set
	NoSession uint64 // sealed messages or finishes from an endpoint we have no session with
	Forged    uint64 // sealed messages that did not authenticate
	Replayed  uint64 // sealed messages seen before, or older than the window
	Handshake uint64 // handshake messages that did not open or were out of turn
	Password  uint64 // handshakes refused because the passwords differ or one lacks
	Cookies   uint64 // cookies sent to diallers without a valid one
}

// ByReason names the counters, for status and metrics.
func (s *SealedStats) ByReason() map[string]uint64 {
	return map[string]uint64{"unsealed": s.Unsealed, "no_session": s.NoSession, "forged": s.Forged,
		"replayed": s.Replayed, "bad_handshake": s.Handshake, "password": s.Password, "cookie_sent": s.Cookies}
}

// ErrRefused is returned by Step for a password-mode message it refused
// and counted in Sealed.
var ErrRefused = errors.New("link: refused in password mode")

// responding is a handshake we answered and whose finish we await.
type responding struct {
	r          *secure.Responder
	hello      proto.Hello
	configured bool
	at         int64
}

func (m *Machine) tickSecure() {
	if m.now%int64(m.cfg.CookieTicks) == 0 {
		// Rotation fails only if the system's random source does; the old
		// secret then stays, which is safe.
		_ = m.cookies.Rotate(m.cfg.Secure.Random)
	}
	for ep, rs := range m.responding {
		if m.now-rs.at > int64(m.cfg.TimeoutTicks) {
			delete(m.responding, ep)
		}
	}
}

// sendInit starts a new handshake attempt on a dialling connection.
func (m *Machine) sendInit(cn *connection) {
	h := m.cfg.Self.Hello()
	h.Trusted = m.cfg.trusts(cn.ep.Remote.Addr())
	init, hs, err := secure.Initiate(m.cfg.Secure, proto.AppendHello(nil, proto.TypeHello, &h))
	if err != nil {
		m.drop(cn, err)
		return
	}
	cn.init, cn.wantsCookie = init, true
	m.send(cn.ep, proto.AppendInit(nil, &proto.Init{
		Configured: cn.target != nil && !cn.target.discovered, Cookie: cn.cookie, Handshake: hs}))
}

// seal wraps a control message for cn's session; false if there is none
// (the message is not sent).
func (m *Machine) seal(cn *connection, msg []byte) ([]byte, bool) {
	if cn.sess == nil {
		return nil, false
	}
	out, err := cn.sess.Seal(make([]byte, 0, len(msg)+proto.SealedHeadLen+proto.SealTagLen), msg)
	if err != nil {
		m.drop(cn, err) // a new handshake makes new keys
		return nil, false
	}
	return out, true
}

// Seal returns msg as it must go to the peer at ep: sealed for that
// connection's session in password mode, as it is otherwise. It reports
// false when it must not go at all (no session with ep).
func (m *Machine) Seal(ep Endpoint, msg []byte) ([]byte, bool) {
	if m.cfg.Secure == nil {
		return msg, true
	}
	cn := m.conn[ep.Remote]
	if cn == nil {
		return nil, false
	}
	return m.seal(cn, msg)
}

// Secure reports whether password mode is on.
func (m *Machine) Secure() bool { return m.cfg.Secure != nil }

// stepSecure handles what Step passes on: every message in password mode
// but rejects, and password-mode messages in plaintext mode.
func (m *Machine) stepSecure(from Endpoint, hd proto.Header, msg []byte) error {
	if m.cfg.Secure == nil {
		if hd.Type != proto.TypeInit {
			return fmt.Errorf("%w: %v without a password", ErrStranger, hd.Type)
		}
		// A dialler with a password: tell it we have none.
		m.Sealed.Password++
		m.refuse(from, &proto.Hello{}, &handshake.PasswordError{Problem: handshake.WeLack})
		return nil
	}
	switch hd.Type {
	case proto.TypeHello:
		h, err := proto.ParseHello(msg)
		if err != nil {
			m.malformed++
			return err
		}
		m.Sealed.Password++
		m.refuse(from, &h, &handshake.PasswordError{Problem: handshake.TheyLack})
		return nil
	case proto.TypeInit:
		in, err := proto.ParseInit(msg)
		if err != nil {
			m.malformed++
			return err
		}
		return m.onInit(from, &in)
	case proto.TypeCookie:
		c, err := proto.ParseCookie(msg)
		if err != nil {
			m.malformed++
			return err
		}
		m.onCookie(from, c)
		return nil
	case proto.TypeResponse, proto.TypeFinish:
		hs, err := proto.ParseHandshake(msg, hd.Type)
		if err != nil {
			m.malformed++
			return err
		}
		if hd.Type == proto.TypeResponse {
			return m.onResponse(from, hs)
		}
		return m.onFinish(from, hs)
	case proto.TypeSealed:
		return m.onSealed(from, msg)
	case proto.TypeData:
		return errors.New("link: data messages belong to the data path")
	}
	m.Sealed.Unsealed++
	return fmt.Errorf("%w: plaintext %v", ErrRefused, hd.Type)
}

func (m *Machine) onInit(from Endpoint, in *proto.Init) error {
	if !m.cookies.Valid(from.Remote, in.Cookie) {
		if m.rejectBudget > 0 {
			m.rejectBudget--
			m.Sealed.Cookies++
			m.send(from, proto.AppendCookie(nil, m.cookies.Make(from.Remote)))
		}
		return nil
	}
	if _, again := m.responding[from.Remote]; !again && len(m.responding) >= m.cfg.MaxPendingInbound {
		return nil // a flood of handshakes; real peers retry
	}
	rs, payload, err := secure.Respond(m.cfg.Secure, in.Handshake)
	if errors.Is(err, secure.ErrPassword) {
		m.Sealed.Password++
		m.refuse(from, &proto.Hello{}, &handshake.PasswordError{Problem: handshake.Mismatch})
		return nil
	}
	if err != nil {
		m.Sealed.Handshake++
		return fmt.Errorf("%w: %w", ErrRefused, err)
	}
	h, err := proto.ParseHello(payload)
	if err != nil || payload[1] != byte(proto.TypeHello) {
		m.Sealed.Handshake++
		return fmt.Errorf("%w: the init carries no hello: %v", ErrRefused, err)
	}
	if !m.acceptable(from, &h) {
		return nil
	}
	cn := m.conn[from.Remote]
	if cn != nil && cn.state == stateConnecting && cn.init != nil {
		if m.cfg.Self.Name < h.Name {
			return nil // crossed dials: ours goes on, theirs gives way
		}
		// Crossed dials: ours gives way. Wait for their finish.
		cn.init, cn.state, cn.lastHeard = nil, statePending, m.now
	}
	us := m.cfg.Self.Hello()
	us.Trusted = m.cfg.trusts(from.Remote.Addr())
	answer, err := rs.Answer(proto.AppendHello(nil, proto.TypeAccept, &us))
	if err != nil {
		return err
	}
	m.responding[from.Remote] = &responding{r: rs, hello: h, configured: in.Configured, at: m.now}
	m.send(from, proto.AppendHandshake(nil, proto.TypeResponse, answer))
	return nil
}

func (m *Machine) onCookie(from Endpoint, c proto.Cookie) {
	cn := m.conn[from.Remote]
	if cn == nil || cn.state != stateConnecting || !cn.wantsCookie {
		return
	}
	// One cookie per init we sent, so a flood of cookies costs at most one
	// init each time.
	cn.cookie = c
	m.sendInit(cn)
	cn.wantsCookie = false
}

func (m *Machine) onResponse(from Endpoint, hs []byte) error {
	cn := m.conn[from.Remote]
	if cn == nil || cn.state != stateConnecting || cn.init == nil {
		return nil // stale: we are not dialling there (any more)
	}
	payload, err := cn.init.ReadResponse(hs)
	if err != nil {
		m.Sealed.Handshake++
		return fmt.Errorf("%w: %w", ErrRefused, err)
	}
	h, err := proto.ParseHello(payload)
	if err != nil || payload[1] != byte(proto.TypeAccept) {
		m.Sealed.Handshake++
		m.drop(cn, fmt.Errorf("the peer's response carries no accept: %v", err))
		return nil
	}
	if _, err := m.cfg.Self.Check(&h); err != nil {
		m.event(Event{Kind: EventRefused, Peer: h.Name, Nick: h.Nickname, Endpoint: from.Remote.String(), Err: err})
		m.drop(cn, err)
		return nil
	}
	if err := m.settleDuplicates(from.Remote, &h, cn.init.PeerKey()); err != nil {
		m.event(Event{Kind: EventRefused, Peer: h.Name, Nick: h.Nickname, Endpoint: from.Remote.String(), Err: err})
		m.drop(cn, err)
		return nil
	}
	fin, sess, err := cn.init.Finish()
	if err != nil {
		m.drop(cn, err)
		return nil
	}
	cn.init, cn.sess = nil, sess
	cn.finish = proto.AppendHandshake(nil, proto.TypeFinish, fin)
	m.send(cn.ep, cn.finish)
	cn.remote = h
	cn.lastHeard = m.now
	cn.ep.Local = from.Local
	if cn.started == 0 {
		cn.started = m.now
	}
	m.establish(cn)
	return nil
}

func (m *Machine) onFinish(from Endpoint, hs []byte) error {
	rs := m.responding[from.Remote]
	if rs == nil {
		m.Sealed.NoSession++
		return fmt.Errorf("%w: a finish we did not ask for", ErrRefused)
	}
	sess, err := rs.r.ReadFinish(hs)
	if err != nil {
		m.Sealed.Handshake++
		return fmt.Errorf("%w: %w", ErrRefused, err) // the real one may follow
	}
	delete(m.responding, from.Remote)
	cn := m.admit(from, &rs.hello, rs.configured, sess.Peer())
	if cn == nil {
		return nil
	}
	cn.sess, cn.init, cn.finish = sess, nil, nil
	if cn.started == 0 {
		cn.started = m.now
	}
	if cn.state != stateEstablished {
		m.establish(cn)
	}
	return nil
}

func (m *Machine) onSealed(from Endpoint, msg []byte) error {
	cn := m.conn[from.Remote]
	if cn == nil || cn.sess == nil {
		m.Sealed.NoSession++
		return fmt.Errorf("%w: sealed message from an endpoint without a session", ErrRefused)
	}
	inner, err := cn.sess.Open(nil, msg)
	switch {
	case errors.Is(err, secure.ErrReplayed):
		m.Sealed.Replayed++
		return fmt.Errorf("%w: %w", ErrRefused, err)
	case err != nil:
		m.Sealed.Forged++
		return fmt.Errorf("%w: %w", ErrRefused, err)
	}
	cn.finish = nil // the peer has our finish: it answers sealed
	hd, err := proto.ParseHeader(inner)
	if err != nil {
		m.malformed++
		return err
	}
	switch hd.Type {
	case proto.TypeHeartbeat:
		hb, err := proto.ParseHeartbeat(inner)
		if err != nil {
			m.malformed++
			return err
		}
		m.onHeartbeat(from, hb)
		return nil
	case proto.TypeGossip:
		g, err := proto.ParseGossip(inner)
		if err != nil {
			m.malformed++
			return err
		}
		return m.onGossip(from, &g)
	}
	m.malformed++
	return fmt.Errorf("%w: %v sealed", proto.ErrType, hd.Type)
}

// plaintext reports whether cn's data may go in clear: an authenticated
// session, and each side trusts the other's address.
func (cn *connection) plaintext(cfg *Config) bool {
	return cn.sess != nil && cn.remote.Trusted && cfg.trusts(cn.ep.Remote.Addr())
}
