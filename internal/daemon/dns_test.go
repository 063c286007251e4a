package daemon

import (
	"errors"
	"net/netip"
	"testing"
)

// TestDNSClients: loopback, the fixed subnets, the host's own addresses
// and its bridges' subnets are answered, nobody else; the host's list is
// read again only after dnsClientsRefresh, and a failed read keeps the
// last one.
func TestDNSClients(t *testing.T) {
	reads := 0
	var fail bool
	list := func() ([]netip.Addr, []netip.Prefix, error) {
		reads++
		if fail {
			return nil, nil, errors.New("netlink")
		}
		return []netip.Addr{netip.MustParseAddr("192.168.1.5")}, []netip.Prefix{netip.MustParsePrefix("172.17.0.0/16")}, nil
	}
	c := newDNSClients([]netip.Prefix{netip.MustParsePrefix("10.32.0.0/12"), {}}, list)
	for addr, want := range map[string]bool{
		"127.0.0.1": true, "127.3.2.1": true, "10.40.1.1": true, "192.168.1.5": true, "172.17.0.2": true,
		"192.168.1.6": false, "10.48.0.1": false, "8.8.8.8": false, "172.18.0.1": false,
	} {
		if got := c.allow(netip.MustParseAddr(addr)); got != want {
			t.Errorf("%s: allowed %v, want %v", addr, got, want)
		}
	}
	if c.allow(netip.Addr{}) {
		t.Error("a query with no source address was allowed")
	}
	if reads != 1 {
		t.Errorf("the host's addresses were read %d times in one refresh period", reads)
	}
	fail = true
	c.read = c.read.Add(-dnsClientsRefresh)
	if !c.allow(netip.MustParseAddr("172.17.0.2")) || reads != 2 {
		t.Errorf("after a failed read: reads %d, the bridge forgotten", reads)
	}
}
