package link

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// DefaultPort is the UDP port peers use when none is given.
const DefaultPort = 6783

// Connect adds targets (HOST, HOST:PORT, [IPv6]:PORT) and dials them at the
// next tick. A target we already have has its back-off reset. Nothing is
// added if any address is malformed.
func (m *Machine) Connect(addrs []string) error {
	type parsed struct {
		host string
		port uint16
	}
	var ps []parsed
	var errs []error
	for _, a := range addrs {
		h, p, err := ParseTarget(a)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		ps = append(ps, parsed{h, p})
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	for _, p := range ps {
		key := JoinTarget(p.host, p.port)
		if t := m.targets[key]; t != nil {
			t.backoff, t.retryAt, t.never, t.discovered = 0, m.now, false, false
			continue
		}
		m.targets[key] = &target{addr: key, host: p.host, port: p.port, retryAt: m.now}
		m.order = append(m.order, key)
		m.event(Event{Kind: EventTargetAdded, Endpoint: key})
	}
	return nil
}

// ErrUnknownTarget is returned by Forget for an address that is not a target.
var ErrUnknownTarget = errors.New("not a target")

// Forget removes targets and drops the connections no other target uses. It
// fails, changing nothing, if an address is malformed or not a target.
func (m *Machine) Forget(addrs []string) error {
	var keys []string
	for _, a := range addrs {
		h, p, err := ParseTarget(a)
		if err != nil {
			return err
		}
		key := JoinTarget(h, p)
		if t := m.targets[key]; t == nil || t.discovered {
			return fmt.Errorf("%w: %s", ErrUnknownTarget, a)
		}
		keys = append(keys, key)
	}
	for _, key := range keys {
		t := m.targets[key]
		if t == nil {
			continue // listed twice
		}
		delete(m.targets, key)
		m.order = slices.DeleteFunc(m.order, func(s string) bool { return s == key })
		t.gen++
		if cn := t.conn; cn != nil {
			t.conn = nil
			if cn.target == t {
				cn.target = nil
			}
			if !m.servesTarget(cn) {
				m.drop(cn, errors.New("target forgotten"))
			}
		}
		m.event(Event{Kind: EventTargetForgotten, Endpoint: key})
	}
	return nil
}

func (m *Machine) servesTarget(cn *connection) bool {
	for _, t := range m.targets {
		if t.conn == cn {
			return true
		}
	}
	return false
}

// Discovered replaces the set of peers found through the topology that we
// should dial (never one we already have a connection with or that is a
// configured target). Discovered targets that drop out of the set are
// forgotten; their connections stay.
func (m *Machine) Discovered(addrs []netip.AddrPort) {
	want := make(map[string]netip.AddrPort, len(addrs))
	for _, a := range addrs {
		a = netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
		if a.IsValid() && a.Port() != 0 && m.conn[a] == nil {
			want[JoinTarget(a.Addr().String(), a.Port())] = a
		}
	}
	for _, key := range slices.Clone(m.order) {
		t := m.targets[key]
		if _, ok := want[key]; !t.discovered || ok || t.conn != nil {
			continue
		}
		delete(m.targets, key)
		m.order = slices.DeleteFunc(m.order, func(s string) bool { return s == key })
	}
	keys := make([]string, 0, len(want))
	for key := range want {
		keys = append(keys, key)
	}
	slices.Sort(keys)
	for _, key := range keys {
		if m.targets[key] != nil {
			continue
		}
		a := want[key]
		m.targets[key] = &target{addr: key, host: a.Addr().String(), port: a.Port(), retryAt: m.now, discovered: true}
		m.order = append(m.order, key)
	}
}

// ParseTarget checks a peer address given as HOST, HOST:PORT, IP, [IPv6] or
// [IPv6]:PORT and returns its host and port (DefaultPort if none).
func ParseTarget(s string) (host string, port uint16, err error) {
	if s == "" {
		return "", 0, errors.New("empty peer address")
	}
	if strings.Contains(s, "%") {
		return "", 0, fmt.Errorf("peer address %q: zoned (link-local) addresses are not supported", s)
	}
	if ap, err := netip.ParseAddrPort(s); err == nil {
		if ap.Port() == 0 {
			return "", 0, fmt.Errorf("peer address %q: port 0", s)
		}
		return ap.Addr().Unmap().String(), ap.Port(), nil
	}
	if a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")); err == nil {
		return a.Unmap().String(), DefaultPort, nil
	}
	h, p := s, strconv.Itoa(DefaultPort)
	if i := strings.LastIndexByte(s, ':'); i >= 0 {
		h, p = s[:i], s[i+1:]
	}
	if h == "" || len(h) > 253 {
		return "", 0, fmt.Errorf("peer address %q: bad host", s)
	}
	for _, ch := range h {
		ok := ch == '-' || ch == '.' || ch == '_' || ch >= '0' && ch <= '9' || ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z'
		if !ok {
			return "", 0, fmt.Errorf("peer address %q: bad host name", s)
		}
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n == 0 {
		return "", 0, fmt.Errorf("peer address %q: bad port %q", s, p)
	}
	return h, uint16(n), nil
}

// JoinTarget is the key of a target: host:port, or [IPv6]:port.
func JoinTarget(host string, port uint16) string {
	if strings.Contains(host, ":") {
		return "[" + host + "]:" + strconv.Itoa(int(port))
	}
	return host + ":" + strconv.Itoa(int(port))
}
