package main

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/overlayd/overlayd/ipalloc"
)

// defaults are overlayd's options with no flags given (addFlags's
// defaults), but for paths under /tmp and a fixed nickname.
func defaults() options {
	var o options
	if err := fuzzFlagSet(&o).Parse(nil); err != nil {
		panic(err)
	}
	o.socket, o.stateDir, o.nickname = "/tmp/x.sock", "/tmp/state", "me"
	return o
}

func TestDockerFlags(t *testing.T) {
	for _, tc := range []struct {
		set  func(o *options)
		want string // the error; "" for none
	}{
		{func(o *options) {}, ""},
		{func(o *options) { o.dockerPlugin = true }, ""},
		{func(o *options) { o.dockerPlugin, o.dockerNetwork = true, "" }, ""},
		{func(o *options) { o.dockerAPI = "" }, ""},
		{func(o *options) { o.dockerAPI = "tcp://127.0.0.1:2375" }, ""},
		{func(o *options) { o.dockerAPI = "/var/run/docker.sock" }, "invalid --docker-api"},
		{func(o *options) { o.dockerPlugin, o.rangeCIDR = true, "" }, "--docker-plugin needs IPAM: give --range"},
		{func(o *options) { o.dockerPlugin, o.dockerAPI = true, "" }, "--docker-plugin needs the Docker API"},
		{func(o *options) { o.dockerPlugin, o.noFirewall = true, true }, "drop --no-firewall"},
		{func(o *options) { o.dockerPlugin, o.pluginName = true, "../x" }, "invalid --docker-plugin-name"},
		{func(o *options) { o.dockerPlugin, o.pluginName = true, "" }, "invalid --docker-plugin-name"},
		{func(o *options) { o.dockerPlugin, o.pluginDir = true, "" }, "--docker-plugin-dir must not be empty"},
		{func(o *options) { o.dockerPlugin, o.dockerNetwork = true, "a b" }, "invalid --docker-network"},
	} {
		o := defaults()
		tc.set(&o)
		c, err := o.validate(nil)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%+v: %v", o, err)
		case tc.want == "" && c.DockerPlugin != o.dockerPlugin:
			t.Errorf("%+v: DockerPlugin %v", o, c.DockerPlugin)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%+v: got %v, want %q", o, err, tc.want)
		}
	}
}

func TestDNSFlags(t *testing.T) {
	for _, tc := range []struct {
		mod  func(*options)
		want string // the error; "" for none
		chk  func(*config) bool
	}{
		{func(o *options) {}, "", func(c *config) bool {
			return c.DNS && c.DNSDomain == "weave.local." && c.DNSTTL == 1 && !c.DNSListen.IsValid() && c.DNSRateLimit == 1000
		}},
		{func(o *options) { o.dnsRateLimit = 0 }, "", func(c *config) bool { return c.DNSRateLimit == 0 }},
		{func(o *options) {}, "", func(c *config) bool { return c.DNSTombstones == 30*time.Minute }},
		{func(o *options) { o.dnsTombstones = 5 * time.Minute }, "", func(c *config) bool { return c.DNSTombstones == 5*time.Minute }},
		{func(o *options) { o.dnsTombstones = 59 * time.Second }, "--dns-tombstone-lifetime 59s", nil},
		{func(o *options) { o.dnsTombstones = 25 * time.Hour }, "--dns-tombstone-lifetime", nil},
		{func(o *options) { o.dnsRateLimit = -1 }, "--dns-rate-limit -1", nil},
		{func(o *options) { o.dnsRateLimit = maxDNSRateLimit + 1 }, "--dns-rate-limit", nil},
		{func(o *options) { o.dnsDomain = "Cluster.Example" }, "", func(c *config) bool { return c.DNSDomain == "cluster.example." }},
		{func(o *options) { o.dnsListen = "172.17.0.1" }, "", func(c *config) bool { return c.DNSListen.String() == "172.17.0.1:53" }},
		{func(o *options) { o.dnsListen = "10.0.0.1:5353" }, "", func(c *config) bool { return c.DNSListen.String() == "10.0.0.1:5353" }},
		{func(o *options) { o.dnsListen = ":5353" }, "", func(c *config) bool { return c.DNSListen.String() == "0.0.0.0:5353" }},
		{func(o *options) { o.dnsListen = ":0" }, "invalid --dns-listen", nil},
		{func(o *options) { o.dnsListen = "host:53" }, "invalid --dns-listen", nil},
		{func(o *options) { o.dnsListen = "[::1]:53" }, "invalid --dns-listen", nil},
		{func(o *options) { o.dnsAllow = "192.0.2.7/24, 198.51.100.0/24" }, "", func(c *config) bool {
			return fmt.Sprint(c.DNSAllow) == "[192.0.2.0/24 198.51.100.0/24]"
		}},
		{func(o *options) { o.dnsAllow = "192.0.2.0" }, `--dns-allow: "192.0.2.0" is not a CIDR`, nil},
		{func(o *options) { o.dnsDomain = "" }, "invalid --dns-domain", nil},
		{func(o *options) { o.dnsDomain = "we ave.local" }, "invalid --dns-domain", nil},
		{func(o *options) { o.dnsTTL = -1 }, "--dns-ttl", nil},
		{func(o *options) { o.resolvConf = "" }, "--resolv-conf", nil},
		// With --no-dns the DNS flags are not looked at.
		{func(o *options) { o.noDNS = true; o.dnsDomain = ""; o.dnsListen = "x" }, "", func(c *config) bool { return !c.DNS }},
	} {
		o := defaults()
		tc.mod(&o)
		c, err := o.validate(nil)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%+v: %v", o, err)
		case tc.want == "" && !tc.chk(c):
			t.Errorf("%+v: config %+v", o, c)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%+v: got %v, want %q", o, err, tc.want)
		}
	}
}

func TestValidate(t *testing.T) {
	o := defaults()
	o.peers = []string{"10.0.0.1", "10.0.0.1:6783", "host.example:7000"}
	c, err := o.validate([]string{"10.0.0.2"})
	if err != nil {
		t.Fatal(err)
	}
	if c.Range != netip.MustParsePrefix("10.32.0.0/12") || c.DefaultSubnet != c.Range {
		t.Errorf("range %v, default subnet %v", c.Range, c.DefaultSubnet)
	}
	if got := strings.Join(c.Targets, " "); got != "10.0.0.1:6783 host.example:7000 10.0.0.2:6783" {
		t.Errorf("targets %q", got)
	}
	for _, tc := range []struct {
		mod  func(*options)
		want string
	}{
		{func(o *options) { o.rangeCIDR = "10.0.0.1/8" }, "bits after network prefix are not all zero: 10.0.0.1/8"},
		{func(o *options) { o.rangeCIDR = "10.0.0.0/31" }, "smaller than minimum size 4"},
		{func(o *options) { o.rangeCIDR = "fd00::/64" }, "only IPv4"},
		{func(o *options) { o.rangeCIDR = ""; o.defaultSubnet = "10.0.0.0/24" }, "--default-subnet specified without --range"},
		{func(o *options) { o.defaultSubnet = "10.48.0.0/16" }, "does not overlap with allocation range 10.32.0.0/12"},
		{func(o *options) { o.port = 0 }, "out of range"},
		{func(o *options) { o.ipallocInit = "bogus" }, "Unable to parse --ipalloc-init: unknown mode"},
		{func(o *options) { o.ipallocInit = "seed=" }, "Unable to parse --ipalloc-init: seed mode requires peer name list"},
		{func(o *options) { o.ipallocInit = "seed=xx" }, "Unable to parse --ipalloc-init"},
		{func(o *options) { o.ipallocInit = "observer=1" }, "observer mode takes no parameter"},
		{func(o *options) { o.ipallocInit = "consensus=x" }, "bad consensus parameter"},
		{func(o *options) { o.initPeerCount = -1 }, "--init-peer-count"},
		{func(o *options) { o.ipallocInit = "consensus=3"; o.initPeerCount = 5 }, "disagree"},
		{func(o *options) { o.rangeCIDR = ""; o.ipallocInit = "observer" }, "--ipalloc-init specified without --ipalloc-range."},
		{func(o *options) { o.iface = "" }, "1 to 15 bytes"},
		{func(o *options) { o.iface = "a/b" }, "not a valid interface name"},
		{func(o *options) { o.name = "::" }, "invalid --name"},
		{func(o *options) { o.peers = []string{"a:b:c"} }, "invalid peer"},
		{func(o *options) { o.logLevel = "panic" }, "--log-level"},
		{func(o *options) { o.mtu = 100 }, "--mtu"},
		{func(o *options) { o.socket = "" }, "--socket"},
		{func(o *options) { o.metricsAddr = "9783" }, "--metrics-addr"},
		{func(o *options) { o.connLimit = -1 }, "--conn-limit"},
		{func(o *options) { o.connLimit = 4097 }, "--conn-limit 4097: want 1 to 4096"},
		{func(o *options) { o.metricsAddr = "host:99999" }, "--metrics-addr"},
		{func(o *options) { o.nickname = strings.Repeat("n", 65) }, "--nickname"},
	} {
		o := defaults()
		tc.mod(&o)
		if _, err := o.validate(nil); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("got %v, want %q", err, tc.want)
		} else if _, ok := err.(usageError); !ok {
			t.Errorf("%v is not a usage error (exit code 2)", err)
		}
	}
	o = defaults()
	o.rangeCIDR = ""
	if c, err := o.validate(nil); err != nil || c.Range.IsValid() {
		t.Errorf("IPAM off: %v, %v", c, err)
	}
}

func TestExitCodes(t *testing.T) {
	if code := execute([]string{"--port", "0"}); code != 2 {
		t.Errorf("bad flag: exit %d", code)
	}
	if code := execute([]string{"--version"}); code != 0 {
		t.Errorf("--version: exit %d", code)
	}
}

func TestQuorum(t *testing.T) {
	for _, tc := range []struct {
		peers     []string
		count     int
		init      string
		mode      ipalloc.Mode
		quorum    int
		seedCount int
	}{
		{nil, 0, "", ipalloc.Consensus, 1, 0},
		{[]string{"10.0.0.1"}, 0, "", ipalloc.Consensus, 2, 0},
		{[]string{"10.0.0.1", "10.0.0.2", "10.0.0.3"}, 0, "", ipalloc.Consensus, 3, 0},
		{[]string{"10.0.0.1"}, 5, "", ipalloc.Consensus, 3, 0},
		{nil, 0, "consensus=4", ipalloc.Consensus, 3, 0},
		{nil, 0, "seed=::1,12:d2:fe:7a:c1:f2", ipalloc.Seed, 1, 2},
		{nil, 0, "observer", ipalloc.Observer, 1, 0},
	} {
		o := defaults()
		o.peers, o.initPeerCount, o.ipallocInit = tc.peers, tc.count, tc.init
		c, err := o.validate(nil)
		if err != nil {
			t.Fatalf("%+v: %v", tc, err)
		}
		if c.IPAMMode != tc.mode || (tc.mode == ipalloc.Consensus && c.Quorum != tc.quorum) || len(c.Seeds) != tc.seedCount {
			t.Errorf("%+v: mode %v quorum %d seeds %v", tc, c.IPAMMode, c.Quorum, c.Seeds)
		}
	}
}

func TestPasswordFlags(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("good", "s3cret\r\nsecond line\n", 0o600)
	open := write("open", "s3cret\n", 0o640)
	empty := write("empty", "\nx\n", 0o600)
	for _, tc := range []struct {
		mod  func(*options)
		env  string
		want string // the password, or the error after "!"
	}{
		{func(o *options) {}, "", ""},
		{func(o *options) {}, "from-env", "from-env"},
		{func(o *options) { o.password = "flag" }, "from-env", "flag"},
		{func(o *options) { o.passwordFile = good }, "from-env", "s3cret"},
		{func(o *options) { o.password, o.passwordFile = "a", good }, "", "!not both"},
		{func(o *options) { o.passwordFile = open }, "", "!readable by group or others (mode 0640)"},
		{func(o *options) { o.passwordFile = empty }, "", "!is empty"},
		{func(o *options) { o.passwordFile = filepath.Join(dir, "none") }, "", "!no such file"},
		{func(o *options) { o.password, o.wgPort = "a", 6783 }, "", "!WireGuard needs a port of its own"},
		{func(o *options) { o.wgPort = 6783 }, "", ""}, // no password, no WireGuard
		{func(o *options) { o.wgPort = 0 }, "", "!--wg-port 0 is out of range"},
	} {
		t.Setenv(passwordEnv, tc.env)
		o := defaults()
		tc.mod(&o)
		c, err := o.validate(nil)
		if want, isErr := strings.CutPrefix(tc.want, "!"); isErr {
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("%+v: got %v, want %q", o, err, want)
			}
			continue
		}
		if err != nil {
			t.Errorf("%+v (env %q): %v; want password %q", o, tc.env, err, tc.want)
		} else if string(c.Password) != tc.want {
			t.Errorf("%+v (env %q): password %q; want %q", o, tc.env, c.Password, tc.want)
		}
	}
}

func TestTrustedSubnets(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string // the subnets, or the error after "!"
	}{
		{"", "[]"},
		{"10.0.0.0/8", "[10.0.0.0/8]"},
		{" 192.168.1.7/24 , 10.0.0.0/8,192.168.1.0/24,", "[192.168.1.0/24 10.0.0.0/8]"}, // host bits cleared, duplicates dropped
		{"fd00::/8", "[fd00::/8]"},
		{"10.0.0.0", `!"10.0.0.0" is not a CIDR`},
		{"10.0.0.0/33", `!"10.0.0.0/33" is not a CIDR`},
		{"10.0.0.0/8;192.168.0.0/16", "!is not a CIDR"},
	} {
		o := defaults()
		o.trusted = tc.in
		c, err := o.validate(nil)
		if want, isErr := strings.CutPrefix(tc.want, "!"); isErr {
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("--trusted-subnets %q: got %v, want %q", tc.in, err, want)
			}
			continue
		}
		if err != nil {
			t.Errorf("--trusted-subnets %q: %v", tc.in, err)
		} else if got := fmt.Sprint(c.TrustedSubnets); got != tc.want {
			t.Errorf("--trusted-subnets %q: %s, want %s", tc.in, got, tc.want)
		}
	}
}
