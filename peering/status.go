package peering

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/proto"
)

// Status is the router's state as the control API reports it.
type Status struct {
	Name               proto.PeerName `json:"name"`
	Nickname           string         `json:"nickname"`
	UID                uint64         `json:"uid"`
	Port               uint16         `json:"port"`
	ProtocolMinVersion uint8          `json:"protocolMinVersion"`
	ProtocolMaxVersion uint8          `json:"protocolMaxVersion"`
	Encryption         bool           `json:"encryption"`
	PeerDiscovery      bool           `json:"peerDiscovery"`
	MTU                int            `json:"mtu"`
	Targets            []string       `json:"targets"`
	Connections        []ConnStatus   `json:"connections"`
	Peers              []PeerStatus   `json:"peers"`
	Routes             []RouteStatus  `json:"routes"`
	Exposed            []netip.Prefix `json:"exposed"`
	Stats              StatsSnapshot  `json:"stats"`
}

// ConnStatus is one line of `status connections`: a connection, or a target
// without one.
type ConnStatus struct {
	Address  string         `json:"address"`
	Outbound bool           `json:"outbound"`
	State    string         `json:"state"` // connecting, retrying, failed, pending, established
	Info     string         `json:"info"`  // the error of a failed target
	RetryAt  *time.Time     `json:"retryAt,omitempty"`
	Name     proto.PeerName `json:"name,omitempty"`
	Nickname string         `json:"nickname,omitempty"`
	Overlay  string         `json:"overlay,omitempty"` // "udp" for the plain data path
	MTU      int            `json:"mtu,omitempty"`
}

// PeerStatus is a peer we know, with the connections it has.
type PeerStatus struct {
	Name        proto.PeerName   `json:"name"`
	Nickname    string           `json:"nickname"`
	UID         uint64           `json:"uid"`
	Connections []PeerConnStatus `json:"connections"`
}

// PeerConnStatus is one connection of a peer.
type PeerConnStatus struct {
	Name        proto.PeerName `json:"name"`
	Nickname    string         `json:"nickname"`
	Address     string         `json:"address"`
	Outbound    bool           `json:"outbound"`
	Established bool           `json:"established"`
}

// RouteStatus is one entry of the route table.
type RouteStatus struct {
	Prefix netip.Prefix   `json:"prefix"`
	Via    proto.PeerName `json:"via"`
	Local  bool           `json:"local,omitempty"`
}

// StatsSnapshot is a copy of Stats.
type StatsSnapshot struct {
	TunPackets      uint64 `json:"tunPackets"`
	SentPackets     uint64 `json:"sentPackets"`
	SentBytes       uint64 `json:"sentBytes"`
	ReceivedPackets uint64 `json:"receivedPackets"`
	ReceivedBytes   uint64 `json:"receivedBytes"`
	DropUnroutable  uint64 `json:"dropUnroutable"`
	DropSendError   uint64 `json:"dropSendError"`
	DropUnknownPeer uint64 `json:"dropUnknownPeer"`
	DropNotForUs    uint64 `json:"dropNotForUs"`
	DropMalformed   uint64 `json:"dropMalformed"`
	DropCtrlQueue   uint64 `json:"dropCtrlQueue"`
	DropTunWrite    uint64 `json:"dropTunWrite"`
	DropTunRead     uint64 `json:"dropTunRead"`
}

func (s *Stats) snapshot() StatsSnapshot {
	return StatsSnapshot{
		TunPackets: s.TunPackets.Load(), SentPackets: s.SentPackets.Load(), SentBytes: s.SentBytes.Load(),
		ReceivedPackets: s.ReceivedPackets.Load(), ReceivedBytes: s.ReceivedBytes.Load(),
		DropUnroutable: s.DropUnroutable.Load(), DropSendError: s.DropSendError.Load(),
		DropUnknownPeer: s.DropUnknownPeer.Load(), DropNotForUs: s.DropNotForUs.Load(),
		DropMalformed: s.DropMalformed.Load(), DropCtrlQueue: s.DropCtrlQueue.Load(),
		DropTunWrite: s.DropTunWrite.Load(), DropTunRead: s.DropTunRead.Load(),
	}
}

// Status reports the router's state. It waits for the control loop, so it
// fails only when ctx ends first.
func (r *Router) Status(ctx context.Context) (Status, error) {
	var st Status
	err := r.do(ctx, func(c *control) { st = c.status() })
	return st, err
}

func (c *control) status() Status {
	cfg := &c.r.cfg
	st := Status{
		Name: cfg.Name, Nickname: cfg.Nickname, UID: cfg.UID, Port: c.r.hs.Port,
		ProtocolMinVersion: proto.MinVersion, ProtocolMaxVersion: proto.MaxVersion,
		MTU: cfg.MTU, Targets: slices.Clone(c.order), Exposed: slices.Clone(c.local),
		Stats: c.r.stats.snapshot(),
	}
	if st.Targets == nil {
		st.Targets = []string{}
	}
	self := PeerStatus{Name: cfg.Name, Nickname: cfg.Nickname, UID: cfg.UID, Connections: []PeerConnStatus{}}
	var others []PeerStatus
	for _, cn := range c.sortedConns() {
		cs := ConnStatus{Address: cn.ep.String(), Outbound: cn.outbound, State: cn.state.String()}
		if cn.state == stateConnecting && cn.target != nil && cn.target.lastErr != nil {
			cs.State, cs.Info = "retrying", cn.target.lastErr.Error()
		}
		if cn.remote.Name != 0 {
			cs.Name, cs.Nickname, cs.Overlay, cs.MTU = cn.remote.Name, cn.remote.Nickname, "udp", cfg.MTU
		}
		st.Connections = append(st.Connections, cs)
		if cn.state == stateConnecting {
			continue
		}
		self.Connections = append(self.Connections, PeerConnStatus{Name: cn.remote.Name,
			Nickname: cn.remote.Nickname, Address: cn.ep.String(), Outbound: cn.outbound,
			Established: cn.state == stateEstablished})
		// What the peer itself reports of its connection to us, from its
		// heartbeats.
		others = append(others, PeerStatus{Name: cn.remote.Name, Nickname: cn.remote.Nickname,
			UID: cn.remote.UID, Connections: []PeerConnStatus{{Name: cfg.Name, Nickname: cfg.Nickname,
				Outbound: !cn.outbound, Established: cn.remoteEstablished}}})
	}
	for _, addr := range c.order {
		t := c.targets[addr]
		if t.conn != nil {
			continue
		}
		cs := ConnStatus{Address: t.addr, Outbound: true}
		switch {
		case t.state == targetFailed:
			cs.State = "failed"
			if t.never {
				cs.Info = fmt.Sprintf("%v, retry: never", t.lastErr)
			} else {
				at := t.retryAt
				cs.RetryAt = &at
				cs.Info = fmt.Sprintf("%v, retry: %s", t.lastErr, at.Format("2006-01-02 15:04:05"))
			}
		case t.lastErr != nil:
			cs.State, cs.Info = "retrying", t.lastErr.Error()
		default:
			cs.State = "connecting"
		}
		st.Connections = append(st.Connections, cs)
	}
	if st.Connections == nil {
		st.Connections = []ConnStatus{}
	}
	slices.SortFunc(others, func(a, b PeerStatus) int { return cmpName(a.Name, b.Name) })
	st.Peers = append([]PeerStatus{self}, others...)
	for _, rt := range c.r.snap.Load().routes.Routes() {
		st.Routes = append(st.Routes, RouteStatus{Prefix: rt.Prefix, Via: rt.Via.name, Local: rt.Via.local})
	}
	if st.Routes == nil {
		st.Routes = []RouteStatus{}
	}
	if st.Exposed == nil {
		st.Exposed = []netip.Prefix{}
	}
	return st
}

// Connect adds targets (HOST[:PORT]) and dials them at once. A target we
// already have has its back-off reset. Nothing is added if any address is
// malformed.
func (r *Router) Connect(ctx context.Context, addrs []string) error {
	type parsed struct {
		host string
		port uint16
	}
	var ps []parsed
	var errs []error
	for _, a := range addrs {
		h, p, err := ParseTarget(a)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		ps = append(ps, parsed{h, p})
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	return r.do(ctx, func(c *control) {
		for _, p := range ps {
			addr := joinTarget(p.host, p.port)
			if t := c.targets[addr]; t != nil {
				t.backoff, t.retryAt, t.never = 0, time.Time{}, false
				continue
			}
			c.targets[addr] = &target{addr: addr, host: p.host, port: p.port}
			c.order = append(c.order, addr)
			c.log.Info("target added", zap.String("endpoint", addr))
		}
	})
}

// ErrUnknownTarget is returned by Forget for an address that is not a target.
var ErrUnknownTarget = errors.New("peering: not a target")

// Forget removes targets and closes their connections. It fails, changing
// nothing, if an address is malformed or not a target.
func (r *Router) Forget(ctx context.Context, addrs []string) error {
	var keys []string
	for _, a := range addrs {
		h, p, err := ParseTarget(a)
		if err != nil {
			return err
		}
		keys = append(keys, joinTarget(h, p))
	}
	var err error
	doErr := r.do(ctx, func(c *control) {
		for i, k := range keys {
			if c.targets[k] == nil {
				err = fmt.Errorf("%w: %s", ErrUnknownTarget, addrs[i])
				return
			}
		}
		for _, k := range keys {
			t := c.targets[k]
			if t == nil {
				continue // listed twice
			}
			delete(c.targets, k)
			c.order = slices.DeleteFunc(c.order, func(s string) bool { return s == k })
			t.gen++
			if cn := t.conn; cn != nil {
				t.conn = nil
				if cn.target == t {
					cn.target = nil
				}
				if !c.servesTarget(cn) {
					c.drop(cn, errors.New("target forgotten"), time.Now())
				}
			}
			c.log.Info("target forgotten", zap.String("endpoint", k))
		}
	})
	if doErr != nil {
		return doErr
	}
	return err
}

// servesTarget reports whether any target still uses cn.
func (c *control) servesTarget(cn *connection) bool {
	for _, t := range c.targets {
		if t.conn == cn {
			return true
		}
	}
	return false
}

// SetLocal replaces the prefixes this host serves (its exposed addresses)
// and announces them to every peer.
func (r *Router) SetLocal(ctx context.Context, prefixes []netip.Prefix) error {
	ps := slices.Clone(prefixes)
	for _, p := range ps {
		if !p.IsValid() || !p.Addr().Is4() {
			return fmt.Errorf("peering: cannot serve %v: only IPv4 prefixes", p)
		}
	}
	slices.SortFunc(ps, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return r.do(ctx, func(c *control) {
		c.local = ps
		c.localVersion++
		c.publish()
		for _, cn := range c.sortedConns() {
			if cn.state == stateEstablished {
				c.sendAnnounce(cn)
			}
		}
	})
}
