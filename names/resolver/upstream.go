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
// query never loops back to us; with a wildcard listening address that is
// every address of the host, looked at again at every check, since
// addresses come and go. It is safe for concurrent use.
type Upstream struct {
	path string
	self netip.AddrPort // where we listen; an unspecified address means every local one
	log  *zap.Logger

	mu      sync.Mutex
	checked time.Time        // guarded by mu
	mtime   time.Time        // guarded by mu: of the file last read
	size    int64            // guarded by mu
	listed  []netip.AddrPort // guarded by mu: the file's servers
	servers []string         // guarded by mu: host:port, without ourselves
	problem string           // guarded by mu: why there are none, as last logged
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

// Servers returns the upstream servers as host:port, in order. The slice
// is shared: do not change it.
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
	u.readLocked()
	var out []string
	for _, s := range u.listed {
		if !u.isSelf(s) {
			out = append(out, s.String())
		}
	}
	if !slices.Equal(out, u.servers) {
		u.log.Info("upstream DNS servers", zap.Strings("endpoint", out))
	}
	u.servers = out
}

// readLocked reads the file if it changed since the last read.
func (u *Upstream) readLocked() {
	fi, err := os.Stat(u.path)
	if err == nil && fi.ModTime().Equal(u.mtime) && fi.Size() == u.size {
		return
	}
	var cc *dns.ClientConfig
	if err == nil {
		u.mtime, u.size = fi.ModTime(), fi.Size()
		cc, err = dns.ClientConfigFromFile(u.path)
	} else {
		u.mtime, u.size = time.Time{}, -1
	}
	if err != nil {
		u.listed = nil
		if msg := err.Error(); msg != u.problem {
			u.problem = msg
			u.log.Warn("no upstream DNS servers: cannot read resolv.conf", zap.Error(err))
		}
		return
	}
	u.problem = ""
	port, _ := strconv.Atoi(cc.Port)
	u.listed = u.listed[:0]
	for _, s := range cc.Servers {
		if a, err := netip.ParseAddr(s); err == nil {
			u.listed = append(u.listed, netip.AddrPortFrom(a.Unmap(), uint16(port)))
		}
	}
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
