package main

import (
	"fmt"
	"io"
	"net/netip"
	"strings"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/proto"
)

// label prints one "Label: value" line of `status`, the label right-aligned
// in 15 columns as Weave does.
func label(w io.Writer, k string, v any) {
	fmt.Fprintf(w, "%15s: %v\n", k, v)
}

func enabled(b bool) string {
	if b {
		return "enabled"
	}
	return "disabled"
}

// encryption says what password mode protects.
func encryption(r *api.RouterStatus) string {
	switch {
	case r.Encryption && r.DataEncryption:
		return "enabled"
	case r.Encryption:
		return "enabled for control traffic (peers authenticated); data packets are not encrypted"
	}
	return "disabled"
}

// writeStatus prints `overlayctl status` in Weave's layout.
func writeStatus(w io.Writer, st *api.Status) {
	r := &st.Router
	fmt.Fprintln(w)
	label(w, "Version", st.Version)
	fmt.Fprintln(w)
	label(w, "Service", "router")
	proto := fmt.Sprintf("overlayd %d..%d", r.ProtocolMinVersion, r.ProtocolMaxVersion)
	if r.ProtocolMinVersion == r.ProtocolMaxVersion {
		proto = fmt.Sprintf("overlayd %d", r.ProtocolMinVersion)
	}
	label(w, "Protocol", proto)
	label(w, "Name", peerName(r.Name, r.Nickname))
	label(w, "Encryption", encryption(r))
	if r.Encryption {
		// Weave's line: the subnets whose peers may send in clear.
		trusted := "none"
		if len(r.TrustedSubnets) > 0 {
			ps := make([]string, len(r.TrustedSubnets))
			for i, p := range r.TrustedSubnets {
				ps[i] = p.String()
			}
			trusted = strings.Join(ps, ",")
		}
		label(w, "TrustedSubnets", trusted)
	}
	if wg := r.WireGuard; wg != nil {
		label(w, "WireGuard", fmt.Sprintf("UDP port %d, %d peers, %d with a session", wg.Port, wg.Peers, wg.Sessions))
	}
	label(w, "PeerDiscovery", enabled(r.PeerDiscovery))
	label(w, "Targets", len(r.Targets))
	label(w, "Connections", connectionSummary(r.Connections))
	label(w, "Peers", peerSummary(r.Peers))
	if st.IPAM.Enabled {
		fmt.Fprintln(w)
		label(w, "Service", "ipam")
		label(w, "Status", st.IPAM.Status)
		label(w, "Range", st.IPAM.Range)
		label(w, "DefaultSubnet", st.IPAM.DefaultSubnet)
		if n := len(st.IPAM.Lost); n > 0 {
			l := st.IPAM.Lost[n-1]
			label(w, "AddressesLost", fmt.Sprintf("%d after a partition, the last %v of %s (status ipam lists them)", n, l.Address, l.ID))
		}
	}
	if st.DNS.Enabled {
		fmt.Fprintln(w)
		label(w, "Service", "dns")
		label(w, "Domain", st.DNS.Domain)
		up := upstreams(st.DNS.Upstream)
		if up == "" {
			up = "none"
		}
		label(w, "Upstream", up)
		label(w, "TTL", st.DNS.TTL)
		label(w, "Entries", st.DNS.Live)
	}
	if st.Plugin.Enabled {
		fmt.Fprintln(w)
		label(w, "Service", "plugin")
		label(w, "DriverName", st.Plugin.DriverName)
	}
	fmt.Fprintln(w)
}

// writeDNS prints one line per live entry, as `weave status dns`: the
// hostname without the domain, the address, the container ID cut to 12
// and the origin peer.
func writeDNS(w io.Writer, st *api.DNSStatus) {
	for _, e := range st.Entries {
		if e.Tombstone {
			continue
		}
		name := strings.TrimSuffix(e.Hostname, ".")
		if d := "." + strings.TrimSuffix(st.Domain, "."); len(name) > len(d) && strings.EqualFold(name[len(name)-len(d):], d) {
			name = name[:len(name)-len(d)]
		}
		fmt.Fprintf(w, "%-12v %-15v %12.12v %v\n", name, e.Address, e.ContainerID, e.Origin)
	}
}

// dnsArgs is Weave's dns-args: the docker flags that point a container at
// our DNS server, without a trailing newline; nothing when DNS is off.
func dnsArgs(st *api.DNSStatus) (string, error) {
	if !st.Enabled {
		return "", nil
	}
	if st.Address == "" {
		return "", fmt.Errorf("the DNS server listens on %s and this host has no address to give containers: set --dns-listen or expose an address", st.Listen)
	}
	if !strings.HasSuffix(st.Listen, ":53") {
		return "", fmt.Errorf("the DNS server listens on %s, but docker's --dns takes an address on port 53", st.Listen)
	}
	return fmt.Sprintf("--dns=%s --dns-search=%s", st.Address, st.Domain), nil
}

// connectionSummary is "N (a established, b failed)": counts in Weave's fixed
// order, zero counts left out, no parentheses when all are zero.
func connectionSummary(cs []api.Connection) string {
	counts := map[string]int{}
	for _, c := range cs {
		counts[c.State]++
	}
	var parts []string
	for _, s := range []string{"established", "pending", "retrying", "failed", "connecting"} {
		if counts[s] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", counts[s], s))
		}
	}
	if len(parts) == 0 {
		return fmt.Sprint(len(cs))
	}
	return fmt.Sprintf("%d (%s)", len(cs), strings.Join(parts, ", "))
}

// peerSummary is "N (with a established[, b pending] connections)", counting
// every peer's connection list, so each link counts from both ends.
func peerSummary(ps []api.Peer) string {
	var est, pend int
	for _, p := range ps {
		for _, c := range p.Connections {
			if c.Established {
				est++
			} else {
				pend++
			}
		}
	}
	var parts []string
	if est > 0 {
		parts = append(parts, fmt.Sprintf("%d established", est))
	}
	if pend > 0 {
		parts = append(parts, fmt.Sprintf("%d pending", pend))
	}
	if len(parts) == 0 {
		return fmt.Sprint(len(ps))
	}
	return fmt.Sprintf("%d (with %s connections)", len(ps), strings.Join(parts, ", "))
}

func dir(outbound bool) string {
	if outbound {
		return "->"
	}
	return "<-"
}

// writeConnections prints `status connections` like Weave:
// "<dir> <address %-21v> <state %-11v> <info>".
func writeConnections(w io.Writer, cs []api.Connection) {
	for _, c := range cs {
		info := c.Info
		if c.Name != 0 {
			info = fmt.Sprintf("%-6v %s", c.Overlay, peerName(c.Name, c.Nickname))
			if c.MTU != 0 {
				info += fmt.Sprintf(" mtu=%d", c.MTU)
			}
		}
		fmt.Fprintf(w, "%s %-21v %-11v %s\n", dir(c.Outbound), c.Address, c.State, info)
	}
}

// writePeers prints `status peers` like Weave: each peer, then each of its
// connections indented.
func writePeers(w io.Writer, ps []api.Peer) {
	for _, p := range ps {
		fmt.Fprintln(w, peerName(p.Name, p.Nickname))
		for _, c := range p.Connections {
			state := "pending"
			if c.Established {
				state = "established"
			}
			fmt.Fprintf(w, "   %s %-21v %-37v %s\n", dir(c.Outbound), c.Address,
				peerName(c.Name, c.Nickname), state)
		}
	}
}

func writeTargets(w io.Writer, ts []string) {
	for _, t := range ts {
		fmt.Fprintln(w, t)
	}
}

// writeIPAM prints `overlayctl status ipam` as `weave status ipam`: one
// line per peer owning space, ourselves first with our active count,
// unreachable peers marked. Nothing while the ring is empty.
func writeIPAM(w io.Writer, st *api.IPAMStatus) {
	for _, o := range st.Owners {
		pct := 0.0
		if st.RangeNumIPs > 0 {
			pct = 100 * float64(o.Size) / float64(st.RangeNumIPs)
		}
		suffix := ""
		switch {
		case o.Self:
			suffix = fmt.Sprintf("(%d active)", st.ActiveIPs)
		case !o.Reachable:
			suffix = "- unreachable!"
		}
		fmt.Fprintf(w, "%-37v %8d IPs (%04.1f%% of total) %s\n", peerName(o.Peer, o.Nickname), o.Size, pct, suffix)
	}
	for _, l := range st.Lost {
		how := "which did not answer"
		if l.AllocatedThere {
			how = "which allocated it too"
		}
		fmt.Fprintf(w, "lost %v of %s after a partition: owned by %s, %s\n", l.Address, l.ID, peerName(l.Owner, l.Nickname), how)
	}
}

// writeRing prints the ring's tokens, one per line.
func writeRing(w io.Writer, st *api.IPAMStatus) {
	for _, e := range st.Entries {
		fmt.Fprintf(w, "%-15v %10d  %s v%d free %d\n", e.Token, e.Size, peerName(e.Peer, e.Nickname), e.Version, e.Free)
	}
}

// writePs prints `weave ps`: first weave:expose with the peer name and the
// exposed CIDRs, then each container: its ID cut to 12, the MAC of ethwe0
// and its addresses, then those it lost after a partition as lost:CIDR.
func writePs(w io.Writer, ps *api.PsResponse) {
	line := func(id, mac string, addrs, lost []netip.Prefix) {
		fmt.Fprintf(w, "%s %s", id, mac)
		for _, a := range addrs {
			fmt.Fprintf(w, " %v", a)
		}
		for _, a := range lost {
			fmt.Fprintf(w, " lost:%v", a)
		}
		fmt.Fprintln(w)
	}
	line("weave:expose", ps.Peer.String(), ps.Exposed, nil)
	for _, c := range ps.Containers {
		id := c.ID
		if len(id) > 12 {
			id = id[:12]
		}
		line(id, c.MAC, c.Addresses, c.Lost)
	}
}

// peerName prints a peer as Weave does, NAME(NICKNAME); a peer whose
// nickname is not known is its name alone, never NAME().
func peerName(name proto.PeerName, nick string) string {
	if nick == "" {
		return name.String()
	}
	return name.String() + "(" + nick + ")"
}

// upstreams lists the upstream DNS servers as Weave does: an address
// alone, with its port only when that is not 53.
func upstreams(servers []string) string {
	out := make([]string, len(servers))
	for i, s := range servers {
		out[i] = s
		if ap, err := netip.ParseAddrPort(s); err == nil && ap.Port() == 53 {
			out[i] = ap.Addr().String()
		}
	}
	return strings.Join(out, ", ")
}
