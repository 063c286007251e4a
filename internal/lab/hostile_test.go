package lab_test

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/overlayd/overlayd/internal/lab"
	"github.com/overlayd/overlayd/proto"
)

// hostile is a peer driven by hand on a real socket in a lab host: it
// completes a plaintext hello with one honest host, keeps the connection
// with heartbeats, and sends whatever gossip the test forges.
type hostile struct {
	t      *testing.T
	c      *net.UDPConn
	to     netip.AddrPort
	name   proto.PeerName
	uid    uint64
	mu     sync.Mutex
	remote proto.PeerName // the honest host's name, from its accept
	proof  uint64         // what its accept asks us to send back
	ring   *proto.Ring    // the latest ring the honest host sent us
}

const hostileName proto.PeerName = 0x0a0b0c0d0e0f

func newHostile(t *testing.T, h *lab.Host, to netip.AddrPort) *hostile {
	t.Helper()
	p := &hostile{t: t, to: to, name: hostileName, uid: 0x5eed}
	if err := h.Do(func() (err error) {
		p.c, err = net.ListenUDP("udp4", &net.UDPAddr{Port: 6783})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.c.Close() })
	go p.read()
	return p
}

// read takes the honest host's accept and the rings it sends.
func (p *hostile) read() {
	buf := make([]byte, 65536)
	for {
		n, err := p.c.Read(buf)
		if err != nil {
			return
		}
		msg := buf[:n]
		hd, err := proto.ParseHeader(msg)
		if err != nil {
			continue
		}
		switch hd.Type {
		case proto.TypeAccept:
			if h, err := proto.ParseHello(msg); err == nil {
				p.mu.Lock()
				p.remote, p.proof = h.Name, h.Proof
				p.mu.Unlock()
			}
		case proto.TypeGossip:
			g, err := proto.ParseGossip(msg)
			if err != nil || g.Channel != proto.ChannelIPAM || g.Chunk != nil {
				continue
			}
			if m, err := proto.ParseIPAMMsg(g.Payload); err == nil && m.Kind == proto.IPAMRing && !m.Partial {
				p.mu.Lock()
				p.ring = &m.Ring
				p.mu.Unlock()
			}
		}
	}
}

func (p *hostile) send(b []byte) {
	if _, err := p.c.WriteToUDPAddrPort(b, p.to); err != nil {
		p.t.Errorf("hostile peer: %v", err)
	}
}

// join says hello until the honest host accepts, then keeps the
// connection alive until stop is closed.
func (p *hostile) join(stop <-chan struct{}) proto.PeerName {
	p.t.Helper()
	hello := proto.AppendHello(nil, proto.TypeHello, &proto.Hello{MinVersion: proto.MinVersion, MaxVersion: proto.MaxVersion,
		Name: p.name, UID: p.uid, Port: 6783, Range: netip.MustParsePrefix(testRange), Nickname: "hostile"})
	var remote proto.PeerName
	lab.Eventually(p.t, 5*time.Second, "the hostile peer's hello accepted", func() error {
		p.send(hello)
		time.Sleep(100 * time.Millisecond)
		p.mu.Lock()
		defer p.mu.Unlock()
		if remote = p.remote; remote == 0 {
			return errors.New("no accept")
		}
		return nil
	})
	p.mu.Lock()
	proof := p.proof
	p.mu.Unlock()
	go func() {
		hb := proto.AppendHeartbeat(nil, proto.Heartbeat{Name: p.name, UID: p.uid, Established: true, Proof: proof})
		for {
			p.send(hb)
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	return remote
}

// gossip sends payload on channel from the hostile peer to dst, directly.
func (p *hostile) gossip(channel string, dst proto.PeerName, payload []byte) {
	b, err := proto.AppendGossip(nil, &proto.Gossip{Channel: channel, Src: p.name, Dst: dst, Payload: payload})
	if err != nil {
		p.t.Fatal(err)
	}
	p.send(b)
}

// TestHostilePeer: in plaintext mode a peer on the underlay, driven by
// hand, joins one honest host and sends rings that give it the whole
// range at the version limit and one version up, tombstones and moved
// copies of another host's DNS name, and a topology entry of its own
// announcing another host's exposed address as a /32. Nothing changes on
// the honest hosts: the ring's owners, the names, the route to the
// address, traffic to it; each refusal is counted.
func TestHostilePeer(t *testing.T) {
	t.Parallel() // see parallel in e2e_test.go
	l := lab.New(t, bin, 4)
	h1, h2, h3, h4 := l.Host(1), l.Host(2), l.Host(3), l.Host(4)
	const metrics = "127.0.0.1:9783"
	args := []string{"--range", testRange, "--init-peer-count", "3", "--metrics-addr", metrics}
	d1 := h1.Start(args...)
	d2 := h2.Start(append(args, "--peer", h1.Addr.String())...)
	d3 := h3.Start(append(args, "--peer", h1.Addr.String())...)
	honest := []*lab.Daemon{d1, d2, d3}
	for _, d := range honest {
		waitConnected(t, d, 2, 10*time.Second)
	}
	for i, d := range honest {
		expose(t, d, i+1)
	}
	owners := func(d *lab.Daemon) string {
		var b strings.Builder
		for _, e := range mustStatus(t, d).IPAM.Entries {
			fmt.Fprintf(&b, "%v %v %v\n", e.Token, e.Size, e.Peer)
		}
		return b.String()
	}
	var before []string
	lab.Eventually(t, 10*time.Second, "one ring on every honest host", func() error {
		before = before[:0]
		for _, d := range honest {
			before = append(before, owners(d))
		}
		if before[0] == "" || before[0] != before[1] || before[0] != before[2] {
			return fmt.Errorf("rings:\n%s", strings.Join(before, "--\n"))
		}
		return nil
	})
	waitPing(t, h1, overlayAddr(2), 5*time.Second)
	d2.MustCtl("dns-add", overlayAddr(2).String(), "victim")
	lab.Eventually(t, 10*time.Second, "h2's name on every host", func() error {
		for _, d := range honest {
			if out := d.MustCtl("dns"); !strings.Contains(out, "victim") {
				return fmt.Errorf("%s: %q", d.Host.NS, out)
			}
		}
		return nil
	})

	stop := make(chan struct{})
	defer close(stop)
	p := newHostile(t, h4, netip.AddrPortFrom(h1.Addr, 6783))
	name1 := p.join(stop)
	waitConnected(t, d1, 3, 5*time.Second)

	// Ask for the ring, then send it back with every range ours at the
	// version limit.
	req, _ := proto.AppendIPAMMsg(nil, &proto.IPAMMsg{Kind: proto.IPAMRingRequest})
	var ring proto.Ring
	lab.Eventually(t, 5*time.Second, "h1 sends the hostile peer its ring", func() error {
		p.gossip(proto.ChannelIPAM, name1, req)
		time.Sleep(100 * time.Millisecond)
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.ring == nil {
			return errors.New("no ring yet")
		}
		ring = *p.ring
		return nil
	})
	// Every range ours one version up (what wins a merge), and every
	// range ours at the version limit.
	bumped := ring
	bumped.Entries = slices.Clone(ring.Entries)
	for i := range bumped.Entries {
		bumped.Entries[i].Peer, bumped.Entries[i].Version = p.name, bumped.Entries[i].Version+1
	}
	forgedBumped, err := proto.AppendIPAMMsg(nil, &proto.IPAMMsg{Kind: proto.IPAMRing, Ring: bumped})
	if err != nil {
		t.Fatal(err)
	}
	for i := range ring.Entries {
		ring.Entries[i].Peer, ring.Entries[i].Version = p.name, proto.MaxRingVersion
	}
	forgedRing, err := proto.AppendIPAMMsg(nil, &proto.IPAMMsg{Kind: proto.IPAMRing, Ring: ring})
	if err != nil {
		t.Fatal(err)
	}
	// h2's name, tombstoned and moved, at every version it may have.
	name2 := mustStatus(t, d2).Router.Name
	var forgedNames []proto.NameEntry
	for v := range uint32(8) {
		e := proto.NameEntry{Hostname: "victim.weave.local.", Addr: overlayAddr(2), ContainerID: "weave:extern", Origin: name2, Version: v}
		tomb, moved := e, e
		tomb.Tombstone = true
		moved.Addr = netip.MustParseAddr("10.99.0.1")
		forgedNames = append(forgedNames, tomb, moved)
	}
	namesMsg, err := proto.AppendNamesMsg(nil, &proto.NamesMsg{Kind: proto.NamesEntries, Entries: forgedNames})
	if err != nil {
		t.Fatal(err)
	}
	// Our own topology entry, connected to h1, serving h2's address.
	topo, err := proto.AppendTopoMsg(nil, &proto.TopoMsg{Kind: proto.TopoEntries, Entries: []proto.TopoPeer{{
		Name: p.name, UID: p.uid, Version: 1 << 20, Port: 6783, Nickname: "hostile",
		Conns:    []proto.TopoConn{{Peer: name1, Addr: netip.AddrPortFrom(h1.Addr, 6783), Outbound: true, Established: true}},
		Prefixes: []netip.Prefix{netip.PrefixFrom(overlayAddr(2), 32)},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	for range 10 {
		p.gossip(proto.ChannelIPAM, name1, forgedRing)
		p.gossip(proto.ChannelIPAM, name1, forgedBumped)
		p.gossip(proto.ChannelTopology, name1, topo)
		p.gossip(proto.ChannelNames, name1, namesMsg)
		time.Sleep(200 * time.Millisecond)
	}

	// Each refusal is counted ...
	lab.Eventually(t, 5*time.Second, "h1 counts the refusals", func() error {
		m, err := h1.Get(metrics, "/metrics")
		if err != nil {
			return err
		}
		for _, reason := range []string{"version_limit", "not_owner"} {
			name := `overlayd_ipam_refused_entries_total{reason="` + reason + `"}`
			if v := metricValue(m, name); v < float64(len(ring.Entries)) {
				return fmt.Errorf("%s %v, want at least %d", name, v, len(ring.Entries))
			}
		}
		if v := metricValue(m, "overlayd_dns_relayed_entries_total"); v < float64(len(forgedNames)) {
			return fmt.Errorf("overlayd_dns_relayed_entries_total %v, want at least %d", v, len(forgedNames))
		}
		if v := metricValue(m, "overlayd_routes_refused_announcements"); v < 1 {
			return fmt.Errorf("overlayd_routes_refused_announcements %v", v)
		}
		return nil
	})
	// ... the hostile peer is known (its entry was taken) but owns nothing
	// and serves nothing ...
	st := mustStatus(t, d1)
	known := false
	for _, pe := range st.Router.Peers {
		known = known || pe.Name == p.name
	}
	if !known {
		t.Errorf("h1 does not know the hostile peer: the test did not reach the route table")
	}
	for _, r := range st.Router.Routes {
		if r.Via == p.name {
			t.Errorf("h1 routes %v to the hostile peer", r.Prefix)
		}
	}
	// ... and no honest host's ring or names changed.
	for i, d := range honest {
		if got := owners(d); got != before[i] {
			t.Errorf("%s's ring changed:\n%s\nwas:\n%s", d.Host.NS, got, before[i])
		}
		if out := d.MustCtl("dns"); !strings.Contains(out, overlayAddr(2).String()) || strings.Contains(out, "10.99.0.1") {
			t.Errorf("%s's names after the forgeries:\n%s", d.Host.NS, out)
		}
	}
	if _, err := lab.TransferTCP(h1, h2, overlayAddr(2), 5001, 1<<20, 20*time.Second); err != nil {
		t.Fatalf("TCP h1 -> h2 after the attack: %v", err)
	}
}

// metricValue sums the samples of a metric in a Prometheus text page.
func metricValue(page, name string) float64 {
	var sum float64
	for _, line := range strings.Split(page, "\n") {
		if !strings.HasPrefix(line, name) || strings.HasPrefix(line, "#") {
			continue
		}
		rest := strings.TrimPrefix(line, name)
		if rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue // a longer name
		}
		f := strings.Fields(line)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			sum += v
		}
	}
	return sum
}
