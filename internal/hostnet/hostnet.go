// Package hostnet decides what overlayd must put back in its network
// namespace: the TUN device up with its MTU, the exposed addresses on it,
// the route for the whole allocation range through it, and for each
// attached container its host veth up with a /32 route per address.
//
// The kernel removes these behind overlayd's back: deleting the last IPv4
// address of a device flushes every route through it (so hiding the only
// exposed address took the range route with it and cut the host off the
// overlay), deleting a primary address takes its secondaries with it
// unless promote_secondaries is set, a link set down loses its routes, and
// people run `ip route del`. Plan compares what overlayd wants with what the
// kernel has and returns the fixes, in the order they must be applied.
//
// The package is pure: no netlink, clocks or goroutines. netconf.Keeper
// reads the kernel's state, calls Plan and applies the fixes.
package hostnet

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
)

// Want is the state overlayd keeps in place. The zero Range means IPAM is
// off: no range route is kept.
type Want struct {
	Iface string       // the TUN device
	MTU   int          // of the TUN device
	Range netip.Prefix // routed to Iface; invalid for none
	// Addrs are the exposed addresses on Iface, with their prefix length.
	Addrs []netip.Prefix
	// Hosts maps the host end of each attached container's veth to the
	// addresses routed to it (as /32s). A container whose veth is gone
	// (it is within its grace period) is left alone.
	Hosts map[string][]netip.Addr
}

// Link is the kernel's view of one interface.
type Link struct {
	Index int
	Up    bool // administratively up (IFF_UP)
	MTU   int
}

// Route is one IPv4 unicast route of the main table.
type Route struct {
	Dst   netip.Prefix
	Index int // of the output interface; 0 for a route without one
}

// Have is the kernel's state, as the shell read it.
type Have struct {
	Links  map[string]Link // by name; only those Want names need be here
	Addrs  []netip.Prefix  // IPv4 addresses on Want.Iface
	Routes []Route
}

// Kind says what a Fix puts back. Its String is the metric label.
type Kind int

const (
	LinkUp     Kind = iota // a link we own was set down
	LinkMTU                // the TUN device's MTU was changed
	Address                // an exposed address is missing
	RangeRoute             // the range's route is missing or leads elsewhere
	HostRoute              // a container's /32 route is missing or leads elsewhere
	NumKinds               // the number of kinds
)

var kindNames = [NumKinds]string{"link_up", "mtu", "address", "range_route", "container_route"}

func (k Kind) String() string {
	if k < 0 || k >= NumKinds {
		return fmt.Sprintf("Kind(%d)", int(k))
	}
	return kindNames[k]
}

// Fix is one change that puts back what overlayd wants.
type Fix struct {
	Kind   Kind
	Iface  string
	Prefix netip.Prefix // the address or route; zero for LinkUp and LinkMTU
	MTU    int          // for LinkMTU
}

func (f Fix) String() string {
	switch f.Kind {
	case LinkUp:
		return f.Iface + " up"
	case LinkMTU:
		return fmt.Sprintf("MTU %d of %s", f.MTU, f.Iface)
	case Address:
		return fmt.Sprintf("%v on %s", f.Prefix, f.Iface)
	default:
		return fmt.Sprintf("route %v through %s", f.Prefix, f.Iface)
	}
}

// Plan returns the fixes that turn have into want, in the order they must
// be applied: links up first (a down link takes no routes), then the MTU,
// the addresses and the routes. It never removes anything: what overlayd
// does not want is not its business. A link that does not exist is left
// alone, and so is everything through it: the TUN device's loss is the
// router's to report, a container's veth's loss is its grace period's.
func Plan(want Want, have Have) []Fix {
	var fixes []Fix
	tun, ok := have.Links[want.Iface]
	if ok {
		if !tun.Up {
			fixes = append(fixes, Fix{Kind: LinkUp, Iface: want.Iface})
		}
		if want.MTU > 0 && tun.MTU != want.MTU {
			fixes = append(fixes, Fix{Kind: LinkMTU, Iface: want.Iface, MTU: want.MTU})
		}
	}
	hosts := slices.Sorted(maps.Keys(want.Hosts))
	for _, h := range hosts {
		if l, ok := have.Links[h]; ok && !l.Up {
			fixes = append(fixes, Fix{Kind: LinkUp, Iface: h})
		}
	}
	if ok {
		for _, a := range want.Addrs {
			if !slices.Contains(have.Addrs, a) {
				fixes = append(fixes, Fix{Kind: Address, Iface: want.Iface, Prefix: a})
			}
		}
		if want.Range.IsValid() && !routed(have.Routes, want.Range.Masked(), tun.Index) {
			fixes = append(fixes, Fix{Kind: RangeRoute, Iface: want.Iface, Prefix: want.Range.Masked()})
		}
	}
	// An address wanted on two veths (two containers given the same
	// address while IPAM is off) is routed to one of them: whichever
	// the kernel has, or else the first by name. Never both in turn.
	byAddr := map[netip.Addr][]int{} // indexes of the veths that want it
	var addrs []netip.Addr
	for _, h := range hosts {
		l, ok := have.Links[h]
		if !ok {
			continue
		}
		for _, a := range want.Hosts[h] {
			if !slices.Contains(byAddr[a], l.Index) {
				if byAddr[a] == nil {
					addrs = append(addrs, a)
				}
				byAddr[a] = append(byAddr[a], l.Index)
			}
		}
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	for _, a := range addrs {
		p := netip.PrefixFrom(a, 32)
		if !slices.ContainsFunc(byAddr[a], func(i int) bool { return routed(have.Routes, p, i) }) {
			fixes = append(fixes, Fix{Kind: HostRoute, Iface: nameOf(have.Links, byAddr[a][0]), Prefix: p})
		}
	}
	return fixes
}

// nameOf is the name of the link with index i.
func nameOf(links map[string]Link, i int) string {
	for name, l := range links {
		if l.Index == i {
			return name
		}
	}
	return ""
}

// routed reports whether dst is routed through the interface with index
// ifindex. Another route for exactly dst (through another interface) does
// not count: the fix replaces it.
func routed(rs []Route, dst netip.Prefix, ifindex int) bool {
	return slices.ContainsFunc(rs, func(r Route) bool { return r.Dst == dst && r.Index == ifindex })
}
