package link

import (
	"cmp"
	"slices"

	"github.com/overlayd/overlayd/proto"
)

// Status is the link state as people see it.
type Status struct {
	Targets     []string
	Connections []ConnStatus
	Peers       []PeerStatus // ourselves first, then the peers we are connected to
}

// ConnStatus is one line of `status connections`: a connection, or a target
// without one.
type ConnStatus struct {
	Address  string
	Outbound bool
	State    string // connecting, retrying, failed, pending, established
	Err      error  // why a target failed or is being retried
	// RetryTicks is how long until a failed target is retried; never if
	// RetryNever.
	RetryTicks int
	RetryNever bool
	Name       proto.PeerName // zero until the handshake
	Nickname   string
	// Plaintext: an established connection in password mode whose data
	// goes in clear (each side trusts the other's address).
	Plaintext bool
}

// PeerStatus is a peer with the connections it has.
type PeerStatus struct {
	Name        proto.PeerName
	Nickname    string
	UID         uint64
	Connections []PeerConn
}

// PeerConn is one connection of a peer.
type PeerConn struct {
	Name        proto.PeerName
	Nickname    string
	Address     string
	Outbound    bool
	Established bool
}

// Status reports the state; it shares no memory with the Machine.
func (m *Machine) Status() Status {
	self := m.cfg.Self
	st := Status{}
	for _, key := range m.order {
		if !m.targets[key].discovered {
			st.Targets = append(st.Targets, key)
		}
	}
	me := PeerStatus{Name: self.Name, Nickname: self.Nickname, UID: self.UID}
	var others []PeerStatus
	for _, cn := range m.sorted() {
		cs := ConnStatus{Address: cn.ep.Remote.String(), Outbound: cn.outbound, State: cn.state.String(),
			Name: cn.remote.Name, Nickname: cn.remote.Nickname, Plaintext: cn.plaintext(&m.cfg)}
		if cn.state == stateConnecting && cn.target != nil && cn.target.lastErr != nil {
			cs.State, cs.Err = "retrying", cn.target.lastErr
		}
		st.Connections = append(st.Connections, cs)
		if cn.state == stateConnecting {
			continue
		}
		me.Connections = append(me.Connections, PeerConn{Name: cn.remote.Name, Nickname: cn.remote.Nickname,
			Address: cn.ep.Remote.String(), Outbound: cn.outbound, Established: cn.state == stateEstablished})
		// What the peer itself reports of its connection to us, from its
		// heartbeats.
		others = append(others, PeerStatus{Name: cn.remote.Name, Nickname: cn.remote.Nickname, UID: cn.remote.UID,
			Connections: []PeerConn{{Name: self.Name, Nickname: self.Nickname, Outbound: !cn.outbound,
				Established: cn.remoteEstablished}}})
	}
	for _, key := range m.order {
		t := m.targets[key]
		if t.conn != nil || t.discovered && t.lastErr == nil {
			continue
		}
		cs := ConnStatus{Address: t.addr, Outbound: true, Err: t.lastErr}
		switch {
		case t.state == targetFailed:
			cs.State = "failed"
			cs.RetryNever = t.never
			cs.RetryTicks = int(max(0, t.retryAt-m.now))
		case t.lastErr != nil:
			cs.State = "retrying"
		default:
			cs.State = "connecting"
		}
		st.Connections = append(st.Connections, cs)
	}
	slices.SortFunc(others, func(a, b PeerStatus) int { return cmp.Compare(a.Name, b.Name) })
	st.Peers = append([]PeerStatus{me}, others...)
	return st
}
