// Package netconf configures the links, addresses and routes overlayd needs
// in its network namespace, through netlink. It decides nothing: callers say
// what to add and remove.
package netconf

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// DefaultUnderlayMTU is assumed when no interface tells us better.
const DefaultUnderlayMTU = 1500

// LinkUp brings interface name up.
func LinkUp(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("netconf: %s: %w", name, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("netconf: bringing %s up: %w", name, err)
	}
	return nil
}

// AddRoute routes prefix to interface name. It fails, with the interface
// that has it, if another route for exactly that prefix exists.
func AddRoute(name string, p netip.Prefix) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("netconf: %s: %w", name, err)
	}
	rt := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: IPNet(p.Masked()), Scope: netlink.SCOPE_LINK}
	if err := netlink.RouteAdd(rt); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("netconf: a route for %v already exists%s: remove it or choose another range", p, routeOwner(p))
		}
		return fmt.Errorf("netconf: adding route %v dev %s: %w", p, name, err)
	}
	return nil
}

// routeOwner names the interface of an existing route for p, if it can.
func routeOwner(p netip.Prefix) string {
	rs, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: IPNet(p.Masked())}, netlink.RT_FILTER_DST)
	if err != nil || len(rs) == 0 {
		return ""
	}
	if l, err := netlink.LinkByIndex(rs[0].LinkIndex); err == nil {
		return " (dev " + l.Attrs().Name + ")"
	}
	return ""
}

// DelRoute removes the route for prefix through interface name; a route that
// is already gone is not an error.
func DelRoute(name string, p netip.Prefix) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return nil // the link, and with it the route, is gone
	}
	rt := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: IPNet(p.Masked()), Scope: netlink.SCOPE_LINK}
	if err := netlink.RouteDel(rt); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("netconf: removing route %v dev %s: %w", p, name, err)
	}
	return nil
}

// AddAddr puts address a (with its prefix length) on interface name without
// the kernel's prefix route: the caller routes the overlay range itself.
// Adding an address that is already there is not an error.
func AddAddr(name string, a netip.Prefix) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("netconf: %s: %w", name, err)
	}
	addr := &netlink.Addr{IPNet: IPNet(a), Flags: unix.IFA_F_NOPREFIXROUTE}
	if err := netlink.AddrAdd(l, addr); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("netconf: adding address %v to %s: %w", a, name, err)
	}
	return nil
}

// DelAddr removes address a from interface name; an address that is not
// there is not an error.
func DelAddr(name string, a netip.Prefix) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return nil
	}
	if err := netlink.AddrDel(l, &netlink.Addr{IPNet: IPNet(a)}); err != nil &&
		!errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("netconf: removing address %v from %s: %w", a, name, err)
	}
	return nil
}

// LinkExists reports whether interface name exists.
func LinkExists(name string) bool {
	_, err := netlink.LinkByName(name)
	return err == nil
}

// UnderlayMTU is the smallest MTU of the interfaces that are up, are not
// loopback, are not skip, and have an IPv4 address: the links peers' packets
// may leave by. DefaultUnderlayMTU when there is none.
func UnderlayMTU(skip string) int {
	links, err := netlink.LinkList()
	if err != nil {
		return DefaultUnderlayMTU
	}
	best := 0
	for _, l := range links {
		a := l.Attrs()
		if a.Name == skip || a.Flags&net.FlagUp == 0 || a.Flags&net.FlagLoopback != 0 || a.MTU <= 0 {
			continue
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
		if err != nil || len(addrs) == 0 {
			continue
		}
		if best == 0 || a.MTU < best {
			best = a.MTU
		}
	}
	if best == 0 {
		return DefaultUnderlayMTU
	}
	return best
}

// IPNet is p as netlink takes it.
func IPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// LinkAddr4 returns the first IPv4 address of interface name, if it exists
// and has one (the docker0 bridge's, for the DNS server).
func LinkAddr4(name string) (netip.Addr, bool) {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return netip.Addr{}, false
	}
	addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
	if err != nil || len(addrs) == 0 {
		return netip.Addr{}, false
	}
	a, ok := netip.AddrFromSlice(addrs[0].IP.To4())
	return a, ok
}

// EnableForwarding turns IPv4 forwarding on in this network namespace.
func EnableForwarding() error {
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
		return fmt.Errorf("netconf: turning IPv4 forwarding on: %w", err)
	}
	return nil
}

// LocalNets lists this namespace's own IPv4 addresses, and the IPv4
// subnets of its bridges (docker0, br-..., cni0: where local containers
// sit).
func LocalNets() (own []netip.Addr, bridges []netip.Prefix, err error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, nil, fmt.Errorf("listing links: %w", err)
	}
	for _, l := range links {
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			continue // the link went away meanwhile
		}
		for _, a := range addrs {
			ip, ok := netip.AddrFromSlice(a.IP.To4())
			if !ok {
				continue
			}
			own = append(own, ip)
			if l.Type() == "bridge" {
				bits, _ := a.Mask.Size()
				bridges = append(bridges, netip.PrefixFrom(ip, bits).Masked())
			}
		}
	}
	return own, bridges, nil
}
