package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap/zapcore"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/daemon"
	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/names"
	"github.com/overlayd/overlayd/peering"
	"github.com/overlayd/overlayd/proto"
	"github.com/overlayd/overlayd/tun"
)

// Defaults of the flags.
const (
	defaultRange    = "10.32.0.0/12"
	defaultIface    = "ovl0"
	defaultStateDir = "/var/lib/overlayd"
)

// options are the raw flag values.
type options struct {
	rangeCIDR     string
	defaultSubnet string
	peers         []string
	name          string
	nickname      string
	port          int
	wgPort        int
	iface         string
	socket        string
	stateDir      string
	logLevel      string
	mtu           int
	metricsAddr   string
	connLimit     int
	noDiscovery   bool
	initPeerCount int
	ipallocInit   string
	dnsListen     string
	dnsDomain     string
	dnsTTL        int
	dnsRateLimit  int
	dnsTombstones time.Duration
	noDNS         bool
	resolvConf    string
	releaseGrace  time.Duration
	dockerPlugin  bool
	dockerAPI     string
	pluginName    string
	pluginDir     string
	dockerNetwork string
	noFirewall    bool
	password      string
	passwordFile  string
	trusted       string
	dnsAllow      string
}

// passwordEnv holds the password when neither flag gives one.
const passwordEnv = "OVERLAY_PASSWORD"

// config is the validated configuration of one daemon.
type config = daemon.Config

// usageError is a bad flag value: exit code 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func badFlag(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

// validate turns options into a config without touching the system.
func (o *options) validate(positional []string) (*config, error) {
	c := &config{Iface: o.iface, Socket: o.socket, StateDir: o.stateDir}
	if o.rangeCIDR != "" {
		r, err := parseSubnet("--range", o.rangeCIDR)
		if err != nil {
			return nil, err
		}
		c.Range = r
	}
	if o.defaultSubnet != "" {
		if !c.Range.IsValid() {
			return nil, badFlag("--default-subnet specified without --range")
		}
		s, err := parseSubnet("--default-subnet", o.defaultSubnet)
		if err != nil {
			return nil, err
		}
		if !s.Overlaps(c.Range) {
			// A subnet larger than the range is allowed: the rest of it
			// is for manual addresses (WEAVE.md §1.8).
			return nil, badFlag("IP address allocation default subnet %v does not overlap with allocation range %v", s, c.Range)
		}
		c.DefaultSubnet = s
	} else {
		c.DefaultSubnet = c.Range
	}
	seen := map[string]bool{}
	for _, p := range append(append([]string(nil), o.peers...), positional...) {
		h, port, err := peering.ParseTarget(p)
		if err != nil {
			return nil, badFlag("invalid peer: %v", err)
		}
		t := joinHostPort(h, port)
		if !seen[t] {
			seen[t] = true
			c.Targets = append(c.Targets, t)
		}
	}
	if o.name != "" {
		n, err := proto.ParsePeerName(o.name)
		if err != nil {
			return nil, badFlag("invalid --name: %v", err)
		}
		c.Name = n
	}
	c.Nickname = o.nickname
	if c.Nickname == "" {
		h, err := os.Hostname()
		if err != nil {
			h = "unknown"
		}
		c.Nickname = h
	}
	if len(c.Nickname) > proto.MaxNicknameLen {
		return nil, badFlag("--nickname is longer than %d bytes", proto.MaxNicknameLen)
	}
	if o.port < 1 || o.port > 65535 {
		return nil, badFlag("--port %d is out of range 1-65535", o.port)
	}
	c.Port = uint16(o.port)
	if o.wgPort < 1 || o.wgPort > 65535 {
		return nil, badFlag("--wg-port %d is out of range 1-65535", o.wgPort)
	}
	c.WGPort = uint16(o.wgPort)
	if c.Iface == "" || len(c.Iface) > tun.MaxNameLen {
		return nil, badFlag("--iface %q: an interface name is 1 to %d bytes long", c.Iface, tun.MaxNameLen)
	}
	if strings.ContainsAny(c.Iface, "/: \t\n") || c.Iface == "." || c.Iface == ".." {
		return nil, badFlag("--iface %q is not a valid interface name", c.Iface)
	}
	if c.Socket == "" {
		return nil, badFlag("--socket must not be empty")
	}
	if c.StateDir == "" {
		return nil, badFlag("--state-dir must not be empty")
	}
	if err := c.LogLevel.UnmarshalText([]byte(o.logLevel)); err != nil || c.LogLevel > zapcore.ErrorLevel {
		return nil, badFlag("--log-level %q: want debug, info, warn or error", o.logLevel)
	}
	if o.mtu != 0 && (o.mtu < 576 || o.mtu > 65535-proto.DataHeaderLen-28) {
		return nil, badFlag("--mtu %d is out of range 576-%d", o.mtu, 65535-proto.DataHeaderLen-28)
	}
	c.MTU = o.mtu
	if o.connLimit < 0 || o.connLimit > peering.MaxConnLimit {
		return nil, badFlag("--conn-limit %d: want 1 to %d, or 0 for the most (%[2]d)", o.connLimit, peering.MaxConnLimit)
	}
	c.ConnLimit, c.Discovery = o.connLimit, !o.noDiscovery
	if err := o.ipam(c); err != nil {
		return nil, err
	}
	if err := o.dns(c); err != nil {
		return nil, err
	}
	if o.releaseGrace < 0 {
		return nil, badFlag("--release-grace %v: want 0 or more", o.releaseGrace)
	}
	c.ReleaseGrace = o.releaseGrace
	if err := o.docker(c); err != nil {
		return nil, err
	}
	if err := o.readPassword(c); err != nil {
		return nil, err
	}
	trusted, err := parseCIDRs("--trusted-subnets", o.trusted)
	if err != nil {
		return nil, err
	}
	c.TrustedSubnets = trusted
	if len(c.Password) > 0 && c.WGPort == c.Port {
		return nil, badFlag("--wg-port %d is also --port: WireGuard needs a port of its own", c.WGPort)
	}
	if o.metricsAddr != "" {
		host, port, err := net.SplitHostPort(o.metricsAddr)
		n, perr := strconv.Atoi(port)
		if err != nil || perr != nil || n < 0 || n > 65535 || strings.ContainsAny(host, " /") {
			return nil, badFlag("--metrics-addr %q: want HOST:PORT, such as 127.0.0.1:9783", o.metricsAddr)
		}
		c.MetricsAddr = o.metricsAddr
	}
	return c, nil
}

// parseCIDRs reads flag's comma-separated CIDRs, host bits cleared (as
// Weave's net.ParseCIDR does for --trusted-subnets), duplicates dropped.
func parseCIDRs(flag, s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for f := range strings.SplitSeq(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return nil, badFlag("%s: %q is not a CIDR, such as 10.0.0.0/8", flag, f)
		}
		if p = p.Masked(); !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out, nil
}

// readPassword takes the password from --password, --password-file or
// $OVERLAY_PASSWORD, in that order; more than one flag is an error.
func (o *options) readPassword(c *config) error {
	switch {
	case o.password != "" && o.passwordFile != "":
		return badFlag("give --password or --password-file, not both")
	case o.password != "":
		c.Password = []byte(o.password)
	case o.passwordFile != "":
		pw, err := daemon.ReadPasswordFile(o.passwordFile)
		if err != nil {
			return badFlag("--password-file: %v", err)
		}
		c.Password = pw
	default:
		c.Password = []byte(os.Getenv(passwordEnv))
	}
	return nil
}

// ipam sets how the allocator starts: --ipalloc-init (Weave's modes) and
// --init-peer-count; the quorum is a majority of the initial peers, by
// default the targets and us.
func (o *options) ipam(c *config) error {
	if o.initPeerCount < 0 {
		return badFlag("--init-peer-count %d: want the number of initial peers", o.initPeerCount)
	}
	if (o.ipallocInit != "" || o.initPeerCount != 0) && !c.Range.IsValid() {
		return badFlag("--ipalloc-init specified without --ipalloc-range.")
	}
	size := len(c.Targets) + 1
	if o.initPeerCount > 0 {
		size = o.initPeerCount
	}
	mode, arg, hasArg := strings.Cut(o.ipallocInit, "=")
	switch mode {
	case "", "consensus":
		c.IPAMMode = ipalloc.Consensus
		if hasArg {
			n, err := strconv.Atoi(arg)
			if err != nil || n < 1 {
				return badFlag("Unable to parse --ipalloc-init: bad consensus parameter: %q", arg)
			}
			if o.initPeerCount > 0 && n != o.initPeerCount {
				return badFlag("--ipalloc-init=consensus=%d and --init-peer-count %d disagree", n, o.initPeerCount)
			}
			size = n
		}
	case "seed":
		c.IPAMMode = ipalloc.Seed
		if !hasArg || arg == "" {
			return badFlag("Unable to parse --ipalloc-init: seed mode requires peer name list")
		}
		for _, s := range strings.Split(arg, ",") {
			n, err := proto.ParsePeerName(strings.TrimSpace(s))
			if err != nil {
				return badFlag("Unable to parse --ipalloc-init: %v", err)
			}
			c.Seeds = append(c.Seeds, n)
		}
	case "observer":
		if hasArg {
			return badFlag("Unable to parse --ipalloc-init: observer mode takes no parameter")
		}
		c.IPAMMode = ipalloc.Observer
	default:
		return badFlag("Unable to parse --ipalloc-init: unknown mode %q (want consensus[=N], seed=NAME,... or observer)", mode)
	}
	c.Quorum = size/2 + 1
	return nil
}

// maxDNSRateLimit bounds --dns-rate-limit: more is no limit (and 0 says
// so).
const maxDNSRateLimit = 1_000_000

// dns checks the name server's flags.
func (o *options) dns(c *config) error {
	c.DNS = !o.noDNS
	if !c.DNS {
		return nil
	}
	d, err := names.CheckDomain(o.dnsDomain)
	if err != nil {
		return badFlag("invalid --dns-domain %q: %v", o.dnsDomain, strings.TrimPrefix(err.Error(), "names: "))
	}
	c.DNSDomain = d
	if o.dnsTTL < 0 || o.dnsTTL > 1<<31-1 {
		return badFlag("--dns-ttl %d: want 0 to %d seconds", o.dnsTTL, 1<<31-1)
	}
	c.DNSTTL = uint32(o.dnsTTL)
	if o.dnsRateLimit < 0 || o.dnsRateLimit > maxDNSRateLimit {
		return badFlag("--dns-rate-limit %d: want 0 (no limit) to %d answers a second", o.dnsRateLimit, maxDNSRateLimit)
	}
	c.DNSRateLimit = o.dnsRateLimit
	if o.dnsTombstones < time.Minute || o.dnsTombstones > 24*time.Hour {
		return badFlag("--dns-tombstone-lifetime %v: want 1m to 24h", o.dnsTombstones)
	}
	c.DNSTombstones = o.dnsTombstones
	if o.resolvConf == "" {
		return badFlag("--resolv-conf must not be empty")
	}
	c.ResolvConf = o.resolvConf
	if o.dnsListen != "" {
		ap, err := parseListen(o.dnsListen)
		if err != nil {
			return badFlag("invalid --dns-listen %q: want IP:PORT, IP or :PORT, such as 172.17.0.1:53", o.dnsListen)
		}
		c.DNSListen = ap
	}
	allow, err := parseCIDRs("--dns-allow", o.dnsAllow)
	if err != nil {
		return err
	}
	c.DNSAllow = allow
	return nil
}

// docker checks the Docker flags.
func (o *options) docker(c *config) error {
	c.DockerAPI, c.Firewall = o.dockerAPI, !o.noFirewall
	if c.DockerAPI != "" && !strings.HasPrefix(c.DockerAPI, "unix:///") && !strings.HasPrefix(c.DockerAPI, "tcp://") {
		return badFlag("invalid --docker-api %q: want unix:///PATH or tcp://HOST:PORT", c.DockerAPI)
	}
	if !o.dockerPlugin {
		return nil
	}
	switch {
	case !c.Range.IsValid():
		return badFlag("--docker-plugin needs IPAM: give --range")
	case c.DockerAPI == "":
		return badFlag("--docker-plugin needs the Docker API: --docker-api must not be empty")
	case !c.Firewall:
		return badFlag("--docker-plugin needs the firewall rules: drop --no-firewall")
	case !validPluginName(o.pluginName):
		return badFlag("invalid --docker-plugin-name %q: want letters, digits, '-' and '_', such as weavemesh", o.pluginName)
	case o.pluginDir == "":
		return badFlag("--docker-plugin-dir must not be empty")
	case o.dockerNetwork != "" && !validPluginName(o.dockerNetwork):
		return badFlag("invalid --docker-network %q: want letters, digits, '-' and '_', such as weave", o.dockerNetwork)
	}
	c.DockerPlugin, c.PluginName, c.PluginDir, c.DockerNetwork = true, o.pluginName, o.pluginDir, o.dockerNetwork
	return nil
}

func validPluginName(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return true
}

// parseListen reads IP:PORT, IP (port 53) or :PORT (every address).
func parseListen(s string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil && ap.Addr().Is4() && ap.Port() != 0 {
		return ap, nil
	}
	if a, err := netip.ParseAddr(s); err == nil && a.Is4() {
		return netip.AddrPortFrom(a, 53), nil
	}
	if p, ok := strings.CutPrefix(s, ":"); ok {
		if n, err := strconv.ParseUint(p, 10, 16); err == nil && n != 0 {
			return netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(n)), nil
		}
	}
	return netip.AddrPort{}, errors.New("bad address")
}

// parseSubnet parses a CIDR that must be an IPv4 subnet of at least 4
// addresses with no host bits set; the errors are Weave's.
func parseSubnet(flag, s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return p, badFlag("invalid %s %q: not a CIDR such as %s", flag, s, defaultRange)
	}
	switch {
	case !p.Addr().Is4():
		return p, badFlag("invalid %s %v: only IPv4 is supported", flag, p)
	case p.Masked() != p:
		return p, badFlag("invalid %s: invalid subnet - bits after network prefix are not all zero: %v", flag, p)
	case p.Bits() > 30:
		return p, badFlag("invalid %s: invalid subnet - smaller than minimum size 4: %v", flag, p)
	}
	return p, nil
}

func joinHostPort(h string, p uint16) string {
	if strings.Contains(h, ":") {
		return fmt.Sprintf("[%s]:%d", h, p)
	}
	return fmt.Sprintf("%s:%d", h, p)
}

// socketDefault is the control socket unless --socket or OVERLAY_SOCKET say
// otherwise.
func socketDefault() string {
	if s := os.Getenv(api.SocketEnv); s != "" {
		return s
	}
	return api.DefaultSocket
}

// dockerAPIDefault is $DOCKER_HOST, else Docker's own socket.
func dockerAPIDefault() string {
	if h := os.Getenv("DOCKER_HOST"); h != "" {
		return h
	}
	return "unix:///var/run/docker.sock"
}
