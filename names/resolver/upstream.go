package resolver

import (
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/zap"
)

// Upstream is the list of servers that queries outside the domain go to,
// read from a resolv.conf and read again when the file changes (checked at
// most once a second). Our own listening address is left out, so that a
// query never loops back to us. It is safe for concurrent use.
type Upstream struct {
	path string
	self netip.AddrPort // where we listen; an unspecified address means every local one
	log  *zap.Logger

	mu      sync.Mutex
	checked time.Time // guarded by mu
	mtime   time.Time // guarded by mu: of the file last read
	size    int64     // guarded by mu
	servers []string  // guarded by mu: host:port
}

// NewUpstream reads path now; a missing or unreadable file means no
// servers until it appears.
func NewUpstream(path string, self netip.AddrPort, log *zap.Logger) *Upstream {
	if log == nil {
		log = zap.NewNop()
	}
	u := &Upstream{path: path, self: self, log: log}
	u.mu.Lock()
	u.refreshLocked(time.Now())
	u.mu.Unlock()
	return u
}

// Path is the resolv.conf read.
func (u *Upstream) Path() string { return u.path }

// Servers returns the upstream servers as host:port, in order.
func (u *Upstream) Servers() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	if now := time.Now(); now.Sub(u.checked) >= time.Second {
		u.refreshLocked(now)
	}
	return u.servers
}

func (u *Upstream) refreshLocked(now time.Time) {
	u.checked = now
	fi, err := os.Stat(u.path)
	if err != nil {
		if u.servers != nil || u.mtime.IsZero() {
			u.log.Warn("no upstream DNS servers: cannot read resolv.conf", zap.Error(err))
		}
		u.servers, u.mtime = nil, time.Unix(1, 0)
		return
	}
	if fi.ModTime().Equal(u.mtime) && fi.Size() == u.size {
		return
	}
	cc, err := dns.ClientConfigFromFile(u.path)
	if err != nil {
		u.log.Warn("no upstream DNS servers: cannot read resolv.conf", zap.Error(err))
		u.servers, u.mtime = nil, fi.ModTime()
		return
	}
	var out []string
	for _, s := range cc.Servers {
		a, err := netip.ParseAddr(s)
		if err != nil {
			continue
		}
		port, _ := strconv.Atoi(cc.Port)
		if u.isSelf(netip.AddrPortFrom(a.Unmap(), uint16(port))) {
			continue
		}
		out = append(out, net.JoinHostPort(a.String(), cc.Port))
	}
	if !slices.Equal(out, u.servers) {
		u.log.Info("upstream DNS servers", zap.Strings("endpoint", out))
	}
	u.servers, u.mtime, u.size = out, fi.ModTime(), fi.Size()
}

// isSelf reports whether a server is our own listening address.
func (u *Upstream) isSelf(s netip.AddrPort) bool {
	if s.Port() != u.self.Port() {
		return false
	}
	if !u.self.Addr().IsUnspecified() {
		return s.Addr() == u.self.Addr()
	}
	if s.Addr().IsLoopback() || s.Addr().IsUnspecified() {
		return true
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false
	}
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Unmap() == s.Addr() {
			return true
		}
	}
	return false
}
