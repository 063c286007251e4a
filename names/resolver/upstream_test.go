package resolver_test

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/overlayd/overlayd/names/resolver"
)

// localAddrs are the addresses of this host's interfaces.
func localAddrs(t *testing.T) []netip.Addr {
	t.Helper()
	as, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	var out []netip.Addr
	for _, a := range as {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p.Addr().Unmap())
		}
	}
	return out
}

func TestUpstreamServers(t *testing.T) {
	local := localAddrs(t)
	// Two addresses of TEST-NET-2 that must not be this host's.
	remote1, remote2 := "198.51.100.1", "198.51.100.2"
	for _, r := range []string{remote1, remote2} {
		if slices.Contains(local, netip.MustParseAddr(r)) {
			t.Skipf("%s is an address of this host", r)
		}
	}
	var ours []string
	for _, a := range local {
		ours = append(ours, "nameserver "+a.String())
	}
	tests := []struct {
		name string
		conf []string // nil: no file
		self string
		want []string
	}{
		{"missing file", nil, "127.0.0.1:53", nil},
		{"empty file", []string{""}, "127.0.0.1:53", nil},
		{"in order", []string{"nameserver " + remote2, "nameserver " + remote1}, "127.0.0.1:53",
			[]string{remote2 + ":53", remote1 + ":53"}},
		{"other lines and host names are skipped", []string{
			"# a comment", "; another", "search example.com", "domain example.com",
			"options ndots:2 timeout:1 attempts:3 rotate", "nameserver", "nameserver dns.example.com",
			"nameserver " + remote1 + " trailing words", "  nameserver\t" + remote2},
			"127.0.0.1:53", []string{remote1 + ":53", remote2 + ":53"}},
		{"our address is left out", []string{"nameserver 127.0.0.1", "nameserver 127.0.0.53", "nameserver " + remote1},
			"127.0.0.1:53", []string{"127.0.0.53:53", remote1 + ":53"}},
		{"our address, IPv4-mapped", []string{"nameserver ::ffff:127.0.0.1", "nameserver " + remote1},
			"127.0.0.1:53", []string{remote1 + ":53"}},
		{"our address on another port is kept", []string{"nameserver 127.0.0.1"},
			"127.0.0.1:5353", []string{"127.0.0.1:53"}},
		{"IPv6", []string{"nameserver ::1", "nameserver 2001:db8::1", "nameserver fe80::1%eth0"},
			"[::1]:53", []string{"[2001:db8::1]:53", "[fe80::1%eth0]:53"}},
		{"unspecified: loopback and every local address are us",
			append([]string{"nameserver 127.0.0.1", "nameserver 127.0.0.53", "nameserver 0.0.0.0",
				"nameserver " + remote1}, ours...),
			"0.0.0.0:53", []string{remote1 + ":53"}},
		{"unspecified on another port", []string{"nameserver 127.0.0.1", "nameserver " + remote1},
			"0.0.0.0:5353", []string{"127.0.0.1:53", remote1 + ":53"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "resolv.conf")
			if tt.conf != nil {
				writeResolvConf(t, path, tt.conf...)
			}
			u := resolver.NewUpstream(path, netip.MustParseAddrPort(tt.self), nil)
			if u.Path() != path {
				t.Errorf("Path() = %q, want %q", u.Path(), path)
			}
			got := u.Servers()
			if len(got) != 0 || len(tt.want) != 0 {
				if !slices.Equal(got, tt.want) {
					t.Errorf("Servers() = %q, want %q\nresolv.conf:\n%s", got, tt.want, strings.Join(tt.conf, "\n"))
				}
			}
		})
	}
}

// TestUpstreamReread checks that resolv.conf is read again when it
// appears, changes or goes, at most once a second.
func TestUpstreamReread(t *testing.T) {
	path := filepath.Join(t.TempDir(), "resolv.conf")
	self := netip.MustParseAddrPort("127.0.0.1:53")
	t0 := time.Now()
	u := resolver.NewUpstream(path, self, nil)
	check := func(step string, want ...string) {
		t.Helper()
		if got := u.Servers(); !slices.Equal(got, want) && (len(got) != 0 || len(want) != 0) {
			t.Errorf("%s: Servers() = %q, want %q", step, got, want)
		}
	}
	const checkEvery = 1100 * time.Millisecond
	check("missing")
	writeResolvConf(t, path, "nameserver 198.51.100.1")
	if time.Since(t0) < 800*time.Millisecond {
		check("just written, not yet checked")
	}
	time.Sleep(checkEvery)
	check("appeared", "198.51.100.1:53")

	// The same size, so that only the time shows the change.
	writeResolvConf(t, path, "nameserver 198.51.100.2")
	time.Sleep(checkEvery)
	check("rewritten", "198.51.100.2:53")

	// Renamed over, as editors and resolvconf do.
	tmp := path + ".new"
	writeResolvConf(t, tmp, "nameserver 198.51.100.3", "nameserver 198.51.100.4")
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	time.Sleep(checkEvery)
	check("renamed over", "198.51.100.3:53", "198.51.100.4:53")

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	time.Sleep(checkEvery)
	check("removed")
}
