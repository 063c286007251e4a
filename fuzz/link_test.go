package fuzz

import (
	crand "crypto/rand"
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"github.com/overlayd/overlayd/peering/handshake"
	"github.com/overlayd/overlayd/peering/link"
	"github.com/overlayd/overlayd/proto"
)

const (
	linkOpStep    = iota // from (1) | length (2) | datagram: a datagram from linkEps[from]
	linkOpTick           // n (1): 1 + n%8 ticks
	linkOpEcho           // from (1): the peer at linkEps[from] answers as a real peer would: a heartbeat with the proof of the last accept it got
	linkOpConnect        // which (1): Connect (even) or Forget (odd) one of linkEps as a target
	linkOpCount
)

var (
	linkSelf  = proto.PeerName(0x12d2fe7ac1f2)
	linkRange = netip.MustParsePrefix("10.40.0.0/16")
	// linkEps are where datagrams come from; the first is a configured
	// target from the start.
	linkEps = []link.Endpoint{
		{Remote: netip.MustParseAddrPort("192.0.2.1:6783")},
		{Remote: netip.MustParseAddrPort("192.0.2.2:6783"), Local: netip.MustParseAddr("192.0.2.100")},
		{Remote: netip.MustParseAddrPort("192.0.2.3:6783")},
		{Remote: netip.MustParseAddrPort("192.0.2.4:7000")},
		{Remote: netip.MustParseAddrPort("192.0.2.5:6783")},
		{Remote: netip.MustParseAddrPort("[2001:db8::6]:6783")},
	}
)

// linkCfg is the Machine under test: small limits, so that the fuzzer
// reaches them.
func linkCfg() link.Config {
	return link.Config{Self: handshake.Config{Name: linkSelf, UID: 1, Nickname: "self", Port: 6783, Range: linkRange},
		Rand: rand.New(rand.NewPCG(1, 2)), ConnLimit: 4, MaxPendingInbound: 2, RejectBurst: 3}
}

// linkOps builds FuzzLinkStep inputs.
type linkOps []byte

func (o linkOps) step(from int, msg []byte) linkOps {
	o = append(o, linkOpStep, byte(from))
	o = binary.BigEndian.AppendUint16(o, uint16(len(msg)))
	return append(o, msg...)
}

func (o linkOps) op(op, arg byte) linkOps { return append(o, op, arg) }

func linkHello(t proto.Type, name proto.PeerName, uid uint64, rng netip.Prefix) []byte {
	return proto.AppendHello(nil, t, &proto.Hello{MinVersion: 1, MaxVersion: 1, Name: name, UID: uid, Port: 6783,
		Range: rng, Nickname: "peer"})
}

func linkGossip(src proto.PeerName, hops uint8, chunk *proto.Chunk) []byte {
	b, err := proto.AppendGossip(nil, &proto.Gossip{Channel: proto.ChannelTopology, Src: src, Hops: hops, Chunk: chunk,
		Payload: []byte{1, 0, 0, 0, 2, 1, 2, 3, 4, 5, 6, 7, 8}})
	if err != nil {
		panic(err)
	}
	return b
}

// linkSeeds are histories of peers that dial us, answer our dials, gossip,
// go silent, restart, and are refused.
func linkSeeds() []linkOps {
	a, b, c, d := proto.PeerName(0xaeafa6361837), proto.PeerName(0xe6b190cdda76), proto.PeerName(0x7e214a702f45), proto.PeerName(0x0a0b0c0d0e0f)
	hb := func(name proto.PeerName, uid uint64, est bool) []byte {
		return proto.AppendHeartbeat(nil, proto.Heartbeat{Name: name, UID: uid, Established: est})
	}
	configured := linkHello(proto.TypeHello, b, 22, linkRange)
	configured[2] |= proto.FlagConfigured
	return []linkOps{
		// We dial our target, it accepts, heartbeats and gossips.
		linkOps{}.op(linkOpTick, 0).
			step(0, linkHello(proto.TypeAccept, a, 11, linkRange)).
			step(0, hb(a, 11, true)).
			step(0, linkGossip(a, 0, nil)).
			step(0, linkGossip(b, 2, &proto.Chunk{MsgID: 1, Index: 1, Count: 2})).
			op(linkOpTick, 3),
		// Peers dial us: one proves its address and gossips, one never
		// does, one is a configured dialler, one comes back as a new
		// incarnation.
		linkOps{}.
			step(1, linkHello(proto.TypeHello, b, 22, linkRange)).
			op(linkOpEcho, 1).
			step(1, linkGossip(b, 0, nil)).
			step(2, linkHello(proto.TypeHello, c, 33, netip.Prefix{})).
			step(2, hb(c, 33, true)).
			step(2, linkGossip(c, 0, nil)).
			step(3, configured).
			op(linkOpEcho, 3).
			step(1, linkHello(proto.TypeHello, b, 23, linkRange)).
			op(linkOpEcho, 1).
			op(linkOpTick, 7).op(linkOpTick, 7).op(linkOpTick, 7),
		// Refusals: another range, our own name, no common version, too
		// short, more than the limits allow, a reject for our dial.
		linkOps{}.
			step(1, linkHello(proto.TypeHello, b, 22, netip.MustParsePrefix("10.32.0.0/12"))).
			step(2, linkHello(proto.TypeHello, linkSelf, 2, linkRange)).
			step(3, proto.AppendHello(nil, proto.TypeHello, &proto.Hello{MinVersion: 2, MaxVersion: 3, Name: c, UID: 3})).
			step(4, linkHello(proto.TypeHello, d, 44, linkRange)[:100]).
			step(4, linkHello(proto.TypeHello, d, 44, linkRange)).
			step(5, linkHello(proto.TypeHello, a, 55, linkRange)).
			step(3, linkHello(proto.TypeHello, c, 66, linkRange)).
			op(linkOpTick, 0).
			step(0, proto.AppendReject(nil, &proto.Reject{Code: proto.RejectRange, Name: a, Range: netip.MustParsePrefix("10.32.0.0/12"), Message: "no"})),
		// Both sides dial at once; then targets change.
		linkOps{}.op(linkOpTick, 0).
			step(0, linkHello(proto.TypeHello, a, 11, linkRange)).
			step(0, hb(a, 11, false)).
			op(linkOpConnect, 4).op(linkOpTick, 1).
			step(4, linkHello(proto.TypeAccept, d, 44, linkRange)).
			op(linkOpConnect, 1).op(linkOpConnect, 5).
			step(0, hb(d, 44, true)),
		// Malformed and misplaced datagrams.
		linkOps{}.
			step(1, nil).step(1, []byte{1}).step(1, []byte{1, 1, 0, 0}).step(1, []byte{2, 1, 0, 0}).
			step(1, []byte{1, 9, 0, 0}).step(1, []byte{1, 6, 0, 0, 0, 0, 0, 0, 0, 1}).
			step(2, seedData()).step(2, seedGossip()).
			step(3, proto.AppendInit(nil, &proto.Init{Cookie: proto.Cookie{1}, Handshake: make([]byte, 48)})),
	}
}

// FuzzLinkStep feeds a plaintext link Machine datagrams from a few
// endpoints, ticks, target changes and peers that answer its accepts.
// It never panics, and after every input:
//   - a Step that fails to decode (Malformed counts it) changes nothing;
//   - every datagram sent decodes, and goes to an endpoint it heard from
//     or dials;
//   - no accept or reject is larger than the datagram it answers, and no
//     more rejects go out than RejectBurst and one per tick allow;
//   - inbound connections waiting for their heartbeat stay within
//     MaxPendingInbound, and connections within ConnLimit;
//   - nobody connects under our name, and no peer is connected twice;
//   - an inbound connection is established, and its gossip handed up,
//     only once the dialler brought back our accept's proof;
//   - gossip handed up comes from the peer it names, or was relayed;
//   - Routing lists the established connections, in name order.
func FuzzLinkStep(f *testing.F) {
	for _, o := range linkSeeds() {
		f.Add([]byte(o))
	}
	f.Fuzz(func(t *testing.T, b []byte) { linkRun(t, b) })
}

// linkSeen is what linkRun saw happen.
type linkSeen struct {
	inbound, outbound int // connections established
	gossip, rejects   int
}

// linkRun is FuzzLinkStep's body.
func linkRun(t *testing.T, b []byte) (seen linkSeen) {
	cfg := linkCfg()
	// The proof key is secret in overlayd; here it is drawn anew for
	// every input, so that no input can carry a proof it did not get
	// from an accept (see linkOpEcho).
	if _, err := crand.Read(cfg.ProofKey[:]); err != nil {
		t.Fatal(err)
	}
	m, err := link.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Connect([]string{linkEps[0].Remote.String()}); err != nil {
		t.Fatal(err)
	}
	m.Advance()
	targets := map[netip.AddrPort]bool{linkEps[0].Remote: true}
	var (
		hellos  = map[netip.AddrPort]proto.Hello{} // the last hello or accept each endpoint sent
		proofs  = map[netip.AddrPort]uint64{}      // the proof of the last accept sent to each
		proven  = map[netip.AddrPort]bool{}        // endpoints that brought a proof back
		budget  = cfg.RejectBurst
		routing []link.PeerPath
	)
	known := func(ap netip.AddrPort) bool {
		for _, ep := range linkEps {
			if ep.Remote == ap {
				return true
			}
		}
		return false
	}
	for len(b) >= 2 {
		op, arg := b[0]%linkOpCount, b[1]
		b = b[2:]
		var in []byte // the datagram stepped, if any
		var from link.Endpoint
		switch op {
		case linkOpStep:
			if len(b) < 2 {
				return seen
			}
			n := min(int(binary.BigEndian.Uint16(b)), len(b)-2)
			in, b = b[2:2+n], b[2+n:]
			from = linkEps[int(arg)%len(linkEps)]
		case linkOpEcho:
			from = linkEps[int(arg)%len(linkEps)]
			h, ok := hellos[from.Remote]
			if !ok {
				continue
			}
			in = proto.AppendHeartbeat(nil, proto.Heartbeat{Name: h.Name, UID: h.UID, Established: true, Proof: proofs[from.Remote]})
			if proofs[from.Remote] != 0 {
				proven[from.Remote] = true
			}
		case linkOpTick:
			for range 1 + arg%8 {
				m.Tick()
				budget = min(budget+1, cfg.RejectBurst)
			}
		case linkOpConnect:
			ep := linkEps[int(arg>>1)%len(linkEps)].Remote
			if arg&1 == 0 {
				if err := m.Connect([]string{ep.String()}); err != nil {
					t.Fatalf("Connect(%v): %v", ep, err)
				}
				targets[ep] = true
			} else if err := m.Forget([]string{ep.String()}); err == nil {
				delete(targets, ep)
			}
		}
		if in != nil {
			before, malformed := m.Status(), m.Malformed()
			err := m.Step(from, in)
			if m.Malformed() != malformed {
				if err == nil || m.Malformed() != malformed+1 {
					t.Fatalf("Malformed went from %d to %d, error %v", malformed, m.Malformed(), err)
				}
				rd := m.Ready()
				if !rd.Empty() || !reflect.DeepEqual(m.Status(), before) {
					t.Fatalf("a datagram that did not decode (%v) changed the machine: %+v", err, rd)
				}
			}
			if err == nil && len(in) >= 2 && (in[1] == byte(proto.TypeHello) || in[1] == byte(proto.TypeAccept)) {
				if h, err := proto.ParseHello(in); err == nil {
					hellos[from.Remote] = h
				}
			}
		}

		rd := m.Ready()
		for _, d := range rd.Sends {
			if !known(d.To.Remote) {
				t.Fatalf("sent to %v, which nobody talked to", d.To.Remote)
			}
			hd, err := proto.ParseHeader(d.Msg)
			if err != nil {
				t.Fatalf("sent a datagram without a header: %v: % x", err, d.Msg)
			}
			switch hd.Type {
			case proto.TypeHello, proto.TypeAccept:
				h, err := proto.ParseHello(d.Msg)
				if err != nil || h.Name != linkSelf {
					t.Fatalf("sent a %v that does not decode: %v %+v", hd.Type, err, h)
				}
				if hd.Type == proto.TypeAccept {
					proofs[d.To.Remote] = h.Proof
				}
			case proto.TypeReject:
				if _, err := proto.ParseReject(d.Msg); err != nil {
					t.Fatalf("sent a reject that does not decode: %v", err)
				}
				seen.rejects++
				if budget--; budget < 0 {
					t.Fatalf("more rejects than RejectBurst (%d) and one a tick allow", cfg.RejectBurst)
				}
			case proto.TypeHeartbeat:
				if hb, err := proto.ParseHeartbeat(d.Msg); err != nil || hb.Name != linkSelf {
					t.Fatalf("sent a heartbeat that does not decode: %v %+v", err, hb)
				}
			default:
				t.Fatalf("sent a %v in plaintext mode", hd.Type)
			}
			if in != nil && (hd.Type == proto.TypeAccept || hd.Type == proto.TypeReject) && d.To.Remote == from.Remote && len(d.Msg) > len(in) {
				t.Fatalf("answered a datagram of %d bytes with a %v of %d bytes: %x", len(in), hd.Type, len(d.Msg), in)
			}
		}

		st := m.Status()
		pending, live := 0, 0
		names := map[proto.PeerName]string{}
		conns := map[string]link.ConnStatus{}
		for _, c := range st.Connections {
			if c.State != "pending" && c.State != "established" {
				continue
			}
			live++
			conns[c.Address] = c
			if c.State == "pending" && !c.Outbound {
				pending++
			}
			if c.Name == linkSelf || c.Name == 0 {
				t.Fatalf("connection to %v at %s", c.Name, c.Address)
			}
			if other, dup := names[c.Name]; dup {
				t.Fatalf("%v connected at %s and %s", c.Name, other, c.Address)
			}
			names[c.Name] = c.Address
			ap, err := netip.ParseAddrPort(c.Address)
			if err != nil || !known(ap) {
				t.Fatalf("connection at %q", c.Address)
			}
			if c.State == "established" && !c.Outbound && !proven[ap] {
				t.Fatalf("inbound connection at %s established without the proof", c.Address)
			}
		}
		if pending > cfg.MaxPendingInbound {
			t.Fatalf("%d inbound connections pending, MaxPendingInbound %d", pending, cfg.MaxPendingInbound)
		}
		if live > cfg.ConnLimit || len(st.Connections) > cfg.ConnLimit+len(targets) {
			t.Fatalf("%d connections (%d handshaken) for a limit of %d and %d targets:\n%+v",
				len(st.Connections), live, cfg.ConnLimit, len(targets), st.Connections)
		}
		seen.gossip += len(rd.Gossip)
		for _, g := range rd.Gossip {
			c, ok := conns[g.Via.Remote.String()]
			if !ok || c.Name != g.From {
				t.Fatalf("gossip handed up from %v at %v, not connected there", g.From, g.Via.Remote)
			}
			if !c.Outbound && !proven[g.Via.Remote] {
				t.Fatalf("gossip taken from %v before it proved its address", g.Via.Remote)
			}
			if g.Msg.Hops == 0 && g.Msg.Src != g.From {
				t.Fatalf("gossip of %v handed up as straight from %v", g.Msg.Src, g.From)
			}
		}
		if rd.Routing != nil {
			for _, p := range rd.Routing.Peers {
				if !slices.ContainsFunc(routing, func(q link.PeerPath) bool { return q.Name == p.Name && q.Via == p.Via }) {
					if p.Outbound {
						seen.outbound++
					} else {
						seen.inbound++
					}
				}
			}
			routing = rd.Routing.Peers
		}
		est := 0
		for _, c := range conns {
			if c.State == "established" {
				est++
			}
		}
		if len(routing) != est {
			t.Fatalf("routing lists %d peers, %d connections are established", len(routing), est)
		}
		for i, p := range routing {
			if i > 0 && routing[i-1].Name >= p.Name {
				t.Fatalf("routing out of order: %v, %v", routing[i-1].Name, p.Name)
			}
			if c := conns[p.Via.Remote.String()]; c.State != "established" || c.Name != p.Name {
				t.Fatalf("routing lists %v at %v, which is not established there", p.Name, p.Via.Remote)
			}
		}
		m.Advance()
	}
	return seen
}

// TestLinkSeeds: the seeds of FuzzLinkStep get connections established
// both ways, gossip handed up and refusals sent, so that the fuzzer starts
// from there.
func TestLinkSeeds(t *testing.T) {
	var all linkSeen
	for _, o := range linkSeeds() {
		s := linkRun(t, o)
		all.inbound += s.inbound
		all.outbound += s.outbound
		all.gossip += s.gossip
		all.rejects += s.rejects
	}
	if all.inbound < 2 || all.outbound < 2 || all.gossip < 2 || all.rejects < 3 {
		t.Errorf("the seeds reach too little: %+v", all)
	}
}
