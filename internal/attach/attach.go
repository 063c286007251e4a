// Package attach plumbs a container (a network namespace) into the
// overlay, as Weave's attach does: a veth pair whose inner end, ethwe0,
// carries the container's overlay addresses and a route for the range; on
// the host side proxy ARP and a /32 route per address, so that the
// container reaches every overlay address through the host and nothing
// else changes. It decides nothing: addresses and routes are given.
package attach

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"unsafe"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/overlayd/overlayd/internal/netconf"
)

// Iface is the name of the container's end.
const Iface = "ethwe0"

// MaxMTU is Weave's container MTU: room for encryption's overhead too.
const MaxMTU = 1410

// Spec is one container's plumbing.
type Spec struct {
	NetNS  string         // path of the container's network namespace
	Host   string         // name of the host end (HostIface)
	MTU    int            // of both ends
	Addrs  []netip.Prefix // on ethwe0, with the range's mask
	Routes []netip.Prefix // routed through ethwe0 (the range)
}

// ErrNoNamespace is returned when the target namespace does not exist.
var ErrNoNamespace = errors.New("attach: no such network namespace")

// Attach creates or completes the plumbing of s; it is idempotent. It
// returns the MAC address of ethwe0. On error what it made is removed,
// unless the plumbing existed before.
func Attach(s Spec) (mac string, err error) {
	ns, err := netns.GetFromPath(s.NetNS)
	if err != nil {
		return "", fmt.Errorf("%w: %s: %v", ErrNoNamespace, s.NetNS, err)
	}
	defer ns.Close()
	in, err := netlink.NewHandleAt(ns)
	if err != nil {
		return "", fmt.Errorf("attach: netlink in %s: %w", s.NetNS, err)
	}
	defer in.Close()

	host, err := netlink.LinkByName(s.Host)
	created := false
	if err != nil {
		if _, err := in.LinkByName(Iface); err == nil {
			return "", fmt.Errorf("attach: %s already has an %s that is not ours", s.NetNS, Iface)
		}
		la := netlink.NewLinkAttrs()
		la.Name, la.MTU = s.Host, s.MTU
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: Iface, PeerNamespace: netlink.NsFd(int(ns))}); err != nil {
			return "", fmt.Errorf("attach: creating the veth pair %s: %w", s.Host, err)
		}
		created = true
		if host, err = netlink.LinkByName(s.Host); err != nil {
			return "", fmt.Errorf("attach: %w", err)
		}
	}
	defer func() {
		if err != nil && created {
			netlink.LinkDel(host)
		}
	}()
	inner, err := in.LinkByName(Iface)
	if err != nil {
		return "", fmt.Errorf("attach: %s in %s: %w", Iface, s.NetNS, err)
	}
	if err := in.LinkSetMTU(inner, s.MTU); err != nil {
		return "", fmt.Errorf("attach: MTU of %s: %w", Iface, err)
	}
	have, err := in.AddrList(inner, netlink.FAMILY_V4)
	if err != nil {
		return "", fmt.Errorf("attach: %w", err)
	}
	for _, p := range s.Addrs {
		if slices.ContainsFunc(have, func(a netlink.Addr) bool { return a.IPNet.String() == p.String() }) {
			continue
		}
		if err := in.AddrAdd(inner, &netlink.Addr{IPNet: netconf.IPNet(p)}); err != nil {
			return "", fmt.Errorf("attach: address %v on %s: %w", p, Iface, err)
		}
	}
	if err := in.LinkSetUp(inner); err != nil {
		return "", fmt.Errorf("attach: %w", err)
	}
	if lo, err := in.LinkByName("lo"); err == nil {
		in.LinkSetUp(lo)
	}
	for _, r := range s.Routes {
		rt := &netlink.Route{LinkIndex: inner.Attrs().Index, Dst: netconf.IPNet(r.Masked()), Scope: netlink.SCOPE_LINK}
		if err := in.RouteReplace(rt); err != nil {
			return "", fmt.Errorf("attach: route %v through %s: %w", r, Iface, err)
		}
	}
	// With TX checksum offload on the veth, the kernel leaves checksums
	// to a NIC that never sees the packets once they cross the overlay:
	// ping works and TCP does not.
	if err := inNS(ns, func() error { return txChecksumOff(Iface) }); err != nil {
		return "", fmt.Errorf("attach: turning off TX checksum offload on %s: %w", Iface, err)
	}

	if err := plugHost(host, s.MTU, s.Addrs); err != nil {
		return "", err
	}
	return inner.Attrs().HardwareAddr.String(), nil
}

// plugHost sets up the host end of a pair: proxy ARP answered at once,
// forwarding on, the MTU, up, and a /32 route per address.
func plugHost(host netlink.Link, mtu int, addrs []netip.Prefix) error {
	name := host.Attrs().Name
	for _, kv := range [][2]string{
		{"ipv4/ip_forward", "1"},
		{"ipv4/conf/" + name + "/proxy_arp", "1"},
		{"ipv4/neigh/" + name + "/proxy_delay", "0"}, // answer ARP at once, not after up to 0.8 s
	} {
		if err := sysctl(kv[0], kv[1]); err != nil {
			return err
		}
	}
	if err := netlink.LinkSetMTU(host, mtu); err != nil {
		return fmt.Errorf("attach: MTU of %s: %w", name, err)
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return fmt.Errorf("attach: %w", err)
	}
	for _, p := range addrs {
		rt := &netlink.Route{LinkIndex: host.Attrs().Index, Dst: netconf.IPNet(netip.PrefixFrom(p.Addr(), 32)), Scope: netlink.SCOPE_LINK}
		if err := netlink.RouteReplace(rt); err != nil {
			return fmt.Errorf("attach: route to %v through %s: %w", p.Addr(), name, err)
		}
	}
	return nil
}

// Pair makes the plumbing of a container that Docker starts (the network
// plugin): a veth pair in our namespace whose end inner Docker moves into
// the container, renamed ethwe0. inner gets the MTU, the MAC if one is
// given and TX checksum offload off; the host end is set up as Attach
// does. It is idempotent, and returns inner's MAC.
func Pair(host, inner string, mtu int, mac net.HardwareAddr, addrs []netip.Prefix) (_ string, err error) {
	h, err := netlink.LinkByName(host)
	created := false
	if err != nil {
		la := netlink.NewLinkAttrs()
		la.Name, la.MTU = host, mtu
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: inner, PeerHardwareAddr: mac}); err != nil {
			return "", fmt.Errorf("attach: creating the veth pair %s: %w", host, err)
		}
		created = true
		if h, err = netlink.LinkByName(host); err != nil {
			return "", fmt.Errorf("attach: %w", err)
		}
	}
	defer func() {
		if err != nil && created {
			netlink.LinkDel(h)
		}
	}()
	in, err := netlink.LinkByName(inner)
	if err != nil {
		return "", fmt.Errorf("attach: %s, the container end of %s: %w", inner, host, err)
	}
	if err := netlink.LinkSetMTU(in, mtu); err != nil {
		return "", fmt.Errorf("attach: MTU of %s: %w", inner, err)
	}
	if err := txChecksumOff(inner); err != nil {
		return "", fmt.Errorf("attach: turning off TX checksum offload on %s: %w", inner, err)
	}
	if err := plugHost(h, mtu, addrs); err != nil {
		return "", err
	}
	return in.Attrs().HardwareAddr.String(), nil
}

// RemoveAddrs takes addresses off ethwe0, and their host routes.
func RemoveAddrs(s Spec, addrs []netip.Prefix) error {
	ns, err := netns.GetFromPath(s.NetNS)
	if err != nil {
		return fmt.Errorf("%w: %s: %v", ErrNoNamespace, s.NetNS, err)
	}
	defer ns.Close()
	in, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("attach: netlink in %s: %w", s.NetNS, err)
	}
	defer in.Close()
	inner, err := in.LinkByName(Iface)
	if err != nil {
		return fmt.Errorf("attach: %s in %s: %w", Iface, s.NetNS, err)
	}
	for _, p := range addrs {
		if err := in.AddrDel(inner, &netlink.Addr{IPNet: netconf.IPNet(p)}); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("attach: removing %v: %w", p, err)
		}
		if host, err := netlink.LinkByName(s.Host); err == nil {
			netlink.RouteDel(&netlink.Route{LinkIndex: host.Attrs().Index, Dst: netconf.IPNet(netip.PrefixFrom(p.Addr(), 32)), Scope: netlink.SCOPE_LINK})
		}
	}
	return nil
}

// Detach removes the veth pair (both ends, and the routes through them).
// A pair already gone is not an error.
func Detach(host string) error {
	l, err := netlink.LinkByName(host)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("attach: %w", err)
	}
	if err := netlink.LinkDel(l); err != nil {
		return fmt.Errorf("attach: removing %s: %w", host, err)
	}
	return nil
}

// Exists reports whether the host end of a pair exists.
func Exists(host string) bool {
	_, err := netlink.LinkByName(host)
	return err == nil
}

// WatchGone calls fn with the name of the host end of each pair the
// kernel deletes (the container's namespace went away, or someone removed
// it), until ctx ends or the subscription fails.
func WatchGone(ctx context.Context, fn func(host string)) error {
	ch := make(chan netlink.LinkUpdate, 64)
	done := make(chan struct{})
	defer func() {
		// The subscription's goroutine blocks sending to ch: drain it
		// until it gives up and closes ch.
		close(done)
		for range ch {
		}
	}()
	errc := make(chan error, 1)
	opts := netlink.LinkSubscribeOptions{ErrorCallback: func(err error) {
		select {
		case errc <- err:
		default:
		}
	}}
	if err := netlink.LinkSubscribeWithOptions(ch, done, opts); err != nil {
		return fmt.Errorf("attach: following link deletions: %w", err)
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			return fmt.Errorf("attach: following link deletions: %w", err)
		case u, ok := <-ch:
			if !ok {
				return errors.New("attach: following link deletions: the subscription ended")
			}
			if u.Header.Type == unix.RTM_DELLINK && u.Attrs() != nil && strings.HasPrefix(u.Attrs().Name, "vethwe") {
				fn(u.Attrs().Name)
			}
		}
	}
}

// MAC returns the address of ethwe0 in a namespace.
func MAC(nsPath string) (string, error) {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return "", fmt.Errorf("%w: %s: %v", ErrNoNamespace, nsPath, err)
	}
	defer ns.Close()
	in, err := netlink.NewHandleAt(ns)
	if err != nil {
		return "", err
	}
	defer in.Close()
	l, err := in.LinkByName(Iface)
	if err != nil {
		return "", err
	}
	return l.Attrs().HardwareAddr.String(), nil
}

// sysctl writes a value under /proc/sys/net of our namespace.
func sysctl(name, v string) error {
	if err := os.WriteFile("/proc/sys/net/"+name, []byte(v), 0o644); err != nil {
		return fmt.Errorf("attach: sysctl net.%s: %w", name, err)
	}
	return nil
}

// inNS runs fn on a thread in namespace ns.
func inNS(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// The thread is left locked, so that it dies with the goroutine
		// rather than go back to the pool in another namespace.
		runtime.LockOSThread()
		if err := netns.Set(ns); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// txChecksumOff is `ethtool -K iface tx off` (ETHTOOL_STXCSUM).
func txChecksumOff(iface string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	const ethtoolSTXCSUM = 0x17
	value := struct{ cmd, data uint32 }{ethtoolSTXCSUM, 0}
	var req struct {
		name [unix.IFNAMSIZ]byte
		data unsafe.Pointer
		_    [16]byte
	}
	copy(req.name[:], iface)
	req.data = unsafe.Pointer(&value)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&req))); e != 0 {
		return e
	}
	return nil
}
