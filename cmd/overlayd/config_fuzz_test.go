package main

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/pflag"
	"go.uber.org/zap/zapcore"

	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/names"
	"github.com/overlayd/overlayd/peering"
	"github.com/overlayd/overlayd/tun"
)

// fuzzFlagSet is overlayd's flag set (addFlags) on its own, without the
// command that starts the daemon.
func fuzzFlagSet(o *options) *pflag.FlagSet {
	f := pflag.NewFlagSet("overlayd", pflag.ContinueOnError)
	f.SetOutput(io.Discard)
	var showVersion bool
	addFlags(f, o, &showVersion)
	return f
}

// FuzzOverlaydFlags parses an argument list (the input split at NUL
// bytes) as overlayd does, then validates it. It never panics: the result
// is a config or a usage error (exit code 2). A config holds only what
// validate checks: an IPv4 range of at least 4 addresses with no host
// bits and a default subnet that overlaps it, distinct normalised
// targets, ports, interface name, MTU, log level, nickname and DNS
// settings in their bounds, Docker settings that fit together, and a
// WireGuard port of its own when there is a password. A --password-file
// is not read from where the input says: its value is written to a file
// of the test's, so that the fuzzer reads no file of the machine's.
func FuzzOverlaydFlags(f *testing.F) {
	for _, args := range [][]string{
		{},
		{"10.10.10.101"},
		{"--range", "172.16.16.0/24", "--peer", "10.10.10.101", "--peer", "host.example:7000", "10.0.0.2"},
		{"--ipalloc-range=10.32.0.0/12", "--ipalloc-default-subnet=10.32.1.0/24", "--ipalloc-init=consensus=3"},
		{"--ipalloc-init", "seed=12:d2:fe:7a:c1:f2,::1", "--name", "12:d2:fe:7a:c1:f2", "--nickname", "host1"},
		{"--ipalloc-init=observer", "--init-peer-count", "5", "--conn-limit", "0", "--no-discovery"},
		{"--range=", "--no-dns", "--iface", "weave", "--mtu", "1376", "--log-level", "debug"},
		{"--dns-listen-address", "172.17.0.1:53", "--dns-domain", "Cluster.Example", "--dns-ttl", "30", "--dns-rate-limit", "50", "--dns-allow", "192.0.2.0/24,198.51.100.7/24"},
		{"--password", "s3cret", "--wg-port", "6784", "--trusted-subnets", "10.0.0.0/8, 192.168.1.7/24"},
		{"--password-file", "s3cret\nsecond line\n"},
		{"--docker-plugin", "--docker-plugin-name", "weavemesh", "--docker-network", "", "--docker-api", "tcp://127.0.0.1:2375"},
		{"--metrics-addr", "127.0.0.1:9783", "--release-grace", "1m30s", "--socket", "/tmp/o.sock", "--state-dir", "/tmp/o"},
		// Refused.
		{"--range", "10.0.0.1/8"},
		{"--port", "0"},
		{"--peer", "a:b:c"},
		{"--ipalloc-init", "consensus=3", "--init-peer-count", "5"},
		{"--password", "x", "--wg-port", "6783"},
		{"--mtu", "100"},
		{"--bogus"},
		{"--port"},
		{"-"},
		{"--", "--port", "0"},
	} {
		f.Add([]byte(strings.Join(args, "\x00")))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var args []string
		if len(b) > 0 {
			args = strings.Split(string(b), "\x00")
		}
		var o options
		fs := fuzzFlagSet(&o)
		if err := fs.Parse(args); err != nil {
			return // execute answers it as a usage error
		}
		if o.passwordFile != "" {
			p := filepath.Join(t.TempDir(), "password")
			if err := os.WriteFile(p, []byte(o.passwordFile), 0o600); err != nil {
				t.Fatal(err)
			}
			o.passwordFile = p
		}
		c, err := o.validate(fs.Args())
		if err != nil {
			var ue usageError
			if !errors.As(err, &ue) {
				t.Fatalf("%q: %v is not a usage error (exit code 2)", args, err)
			}
			if c != nil {
				t.Fatalf("%q: a config and an error", args)
			}
			return
		}
		if c == nil {
			t.Fatalf("%q: neither a config nor an error", args)
		}
		fuzzCheckConfig(t, args, c)
	})
}

// fuzzCheckConfig checks what validate promises of a config.
func fuzzCheckConfig(t *testing.T, args []string, c *config) {
	t.Helper()
	fail := func(what string, v any) { t.Fatalf("%q: %s %v", args, what, v) }
	subnet := func(p netip.Prefix) bool { return p.Addr().Is4() && p.Masked() == p && p.Bits() <= 30 }
	switch {
	case c.Range.IsValid() && !subnet(c.Range):
		fail("range", c.Range)
	case c.Range.IsValid() && (!subnet(c.DefaultSubnet) || !c.DefaultSubnet.Overlaps(c.Range)):
		fail("default subnet", c.DefaultSubnet)
	case !c.Range.IsValid() && c.DefaultSubnet.IsValid():
		fail("default subnet without a range", c.DefaultSubnet)
	case c.Port == 0 || c.WGPort == 0:
		fail("ports", []uint16{c.Port, c.WGPort})
	case len(c.Password) > 0 && c.WGPort == c.Port:
		fail("WireGuard port is the control port", c.WGPort)
	case c.Iface == "" || len(c.Iface) > tun.MaxNameLen || strings.ContainsAny(c.Iface, "/: \t\n") || c.Iface == "." || c.Iface == "..":
		fail("interface", c.Iface)
	case c.Socket == "" || c.StateDir == "":
		fail("socket or state directory", []string{c.Socket, c.StateDir})
	case c.LogLevel < zapcore.DebugLevel || c.LogLevel > zapcore.ErrorLevel:
		fail("log level", c.LogLevel)
	case c.MTU != 0 && (c.MTU < 576 || c.MTU > 65535-16-28):
		fail("MTU", c.MTU)
	case c.ConnLimit < 0:
		fail("connection limit", c.ConnLimit)
	case c.Nickname == "" || len(c.Nickname) > 64:
		fail("nickname", c.Nickname)
	case c.ReleaseGrace < 0:
		fail("release grace", c.ReleaseGrace)
	case c.Range.IsValid() && c.Quorum < 1:
		fail("quorum", c.Quorum)
	case c.IPAMMode == ipalloc.Seed && (len(c.Seeds) == 0 || slices.Contains(c.Seeds, 0)):
		fail("seeds", c.Seeds)
	case c.DockerAPI != "" && !strings.HasPrefix(c.DockerAPI, "unix:///") && !strings.HasPrefix(c.DockerAPI, "tcp://"):
		fail("Docker API", c.DockerAPI)
	case c.DockerPlugin && (!c.Range.IsValid() || c.DockerAPI == "" || !c.Firewall || !validPluginName(c.PluginName) || c.PluginDir == "" ||
		c.DockerNetwork != "" && !validPluginName(c.DockerNetwork)):
		fail("Docker plugin", []string{c.PluginName, c.PluginDir, c.DockerNetwork})
	}
	if c.MetricsAddr != "" {
		if _, _, err := net.SplitHostPort(c.MetricsAddr); err != nil {
			fail("metrics address", c.MetricsAddr)
		}
	}
	for i, tg := range c.Targets {
		h, p, err := peering.ParseTarget(tg)
		if err != nil || joinHostPort(h, p) != tg || slices.Contains(c.Targets[:i], tg) {
			fail("target", tg)
		}
	}
	if c.DNS {
		d, err := names.CheckDomain(c.DNSDomain)
		switch {
		case err != nil || d != c.DNSDomain || !strings.HasSuffix(d, "."):
			fail("DNS domain", c.DNSDomain)
		case c.DNSTTL > 1<<31-1:
			fail("DNS TTL", c.DNSTTL)
		case c.ResolvConf == "":
			fail("resolv.conf", c.ResolvConf)
		case c.DNSListen.IsValid() && (!c.DNSListen.Addr().Is4() || c.DNSListen.Port() == 0):
			fail("DNS address", c.DNSListen)
		}
	}
	for _, ps := range [][]netip.Prefix{c.DNSAllow, c.TrustedSubnets} {
		for i, p := range ps {
			if !p.IsValid() || p.Masked() != p || slices.Contains(ps[:i], p) {
				fail("subnets", ps)
			}
		}
	}
}
