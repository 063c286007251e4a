package proto

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// ChannelIPAM is the gossip channel of the address allocator.
const ChannelIPAM = "ipam"

// Limits of IPAM messages.
const (
	MaxRingEntries = 1 << 17 // tokens in one ring
	MaxRingSeeds   = 4096    // peers the ring was made for
	MaxPaxosNodes  = 4096    // voters in one consensus state
	// MaxRingVersion bounds entry versions, so that bumping past a
	// received version (a transfer adds 100) can never wrap around.
	MaxRingVersion = 1 << 31
)

// IPAMKind is the first byte of an IPAM gossip payload.
type IPAMKind uint8

// IPAM message kinds.
const (
	IPAMRing         IPAMKind = 1 // the whole ring
	IPAMPaxos        IPAMKind = 2 // the consensus state, while no ring exists
	IPAMRingRequest  IPAMKind = 3 // an observer asks for a ring (or an election)
	IPAMSpaceRequest IPAMKind = 4 // give me space in [Start, Last]
	IPAMSpaceDenied  IPAMKind = 5 // nothing free in [Start, Last]
	IPAMDigest       IPAMKind = 6 // the hash of the sender's ring: reply with yours if it differs
	IPAMHoldCheck    IPAMKind = 7 // the hash of who owns [Start, Last]: confirm if yours is the same
	IPAMHoldAck      IPAMKind = 8 // it is the same
)

// RingEntry is one token of the ring: Peer owns the addresses from Token up
// to the next token. Addresses are IPv4 addresses as big-endian integers.
type RingEntry struct {
	Token   uint32
	Peer    PeerName
	Version uint32
	Free    uint32 // addresses the owner reports free in the range
}

// Ring is the allocator's shared state: the range it divides, the peers it
// was first divided among, and its tokens in ascending order.
type Ring struct {
	Range   netip.Prefix
	Seeds   []PeerName
	Entries []RingEntry
}

// PaxosNode identifies one voter: a peer name and process incarnation.
type PaxosNode struct {
	Name PeerName
	UID  uint64
}

// ProposalID orders proposals: by round, then proposer.
type ProposalID struct {
	Round    uint32
	Proposer PaxosNode
}

// PaxosClaims is what one voter has promised and accepted.
type PaxosClaims struct {
	Node     PaxosNode
	Promise  ProposalID
	Accepted ProposalID
	Origin   ProposalID // the proposal that first carried Value
	Value    []PeerName // the peers to divide the range among
}

// IPAMMsg is one IPAM gossip payload; which fields are used depends on
// Kind.
type IPAMMsg struct {
	Kind  IPAMKind
	Ring  Ring          // IPAMRing
	Paxos []PaxosClaims // IPAMPaxos, sorted by node, distinct
	Start uint32        // IPAMSpaceRequest, IPAMSpaceDenied, IPAMHoldCheck, IPAMHoldAck
	Last  uint32        // inclusive, so that the range may end at 2^32
	Hash  uint64        // IPAMDigest, IPAMHoldCheck, IPAMHoldAck
	Echo  bool          // IPAMDigest: answer with your digest even if it is equal
	Reply bool          // IPAMRing: answer with your ring if it holds what this one lacks
	// Partial (IPAMRing): only the entries that changed, to be merged
	// into a ring the receiver has; Seeds are still all of them.
	Partial bool
}

// Flags of an IPAMRing message.
const (
	ringReply   = 0x01
	ringPartial = 0x02
)

const (
	ringEntryLen  = 4 + PeerNameLen + 4 + 4
	paxosNodeLen  = PeerNameLen + 8
	proposalLen   = 4 + paxosNodeLen
	paxosFixedLen = paxosNodeLen + 3*proposalLen + 2
)

// AppendIPAMMsg appends the encoded payload of m to b.
func AppendIPAMMsg(b []byte, m *IPAMMsg) ([]byte, error) {
	b = append(b, byte(m.Kind))
	switch m.Kind {
	case IPAMRing:
		r := &m.Ring
		if len(r.Seeds) > MaxRingSeeds || len(r.Entries) > MaxRingEntries {
			return b, fmt.Errorf("%w: ring of %d seeds, %d entries", ErrTooLarge, len(r.Seeds), len(r.Entries))
		}
		var flags byte
		if m.Reply {
			flags |= ringReply
		}
		if m.Partial {
			flags |= ringPartial
		}
		b = append(b, flags)
		b = appendPrefix(b, r.Range)
		b = binary.BigEndian.AppendUint16(b, uint16(len(r.Seeds)))
		for _, s := range r.Seeds {
			b = appendName(b, s)
		}
		b = binary.BigEndian.AppendUint32(b, uint32(len(r.Entries)))
		for _, e := range r.Entries {
			b = binary.BigEndian.AppendUint32(b, e.Token)
			b = appendName(b, e.Peer)
			b = binary.BigEndian.AppendUint32(b, e.Version)
			b = binary.BigEndian.AppendUint32(b, e.Free)
		}
		return b, nil
	case IPAMPaxos:
		if len(m.Paxos) > MaxPaxosNodes {
			return b, fmt.Errorf("%w: consensus state of %d voters", ErrTooLarge, len(m.Paxos))
		}
		b = binary.BigEndian.AppendUint16(b, uint16(len(m.Paxos)))
		for i := range m.Paxos {
			c := &m.Paxos[i]
			if len(c.Value) > MaxRingSeeds {
				return b, fmt.Errorf("%w: consensus value of %d peers", ErrTooLarge, len(c.Value))
			}
			b = appendPaxosNode(b, c.Node)
			b = appendProposal(b, c.Promise)
			b = appendProposal(b, c.Accepted)
			b = appendProposal(b, c.Origin)
			b = binary.BigEndian.AppendUint16(b, uint16(len(c.Value)))
			for _, n := range c.Value {
				b = appendName(b, n)
			}
		}
		return b, nil
	case IPAMRingRequest:
		return b, nil
	case IPAMSpaceRequest, IPAMSpaceDenied:
		if m.Last < m.Start {
			return b, fmt.Errorf("%w: space %d-%d", ErrMalform, m.Start, m.Last)
		}
		b = binary.BigEndian.AppendUint32(b, m.Start)
		return binary.BigEndian.AppendUint32(b, m.Last), nil
	case IPAMDigest:
		b = binary.BigEndian.AppendUint64(b, m.Hash)
		return append(b, boolByte(m.Echo)), nil
	case IPAMHoldCheck, IPAMHoldAck:
		if m.Last < m.Start {
			return b, fmt.Errorf("%w: span %d-%d", ErrMalform, m.Start, m.Last)
		}
		b = binary.BigEndian.AppendUint32(b, m.Start)
		b = binary.BigEndian.AppendUint32(b, m.Last)
		return binary.BigEndian.AppendUint64(b, m.Hash), nil
	}
	return b, fmt.Errorf("%w: IPAM message kind %d", ErrMalform, m.Kind)
}

func boolByte(v bool) byte {
	if v {
		return 1
	}
	return 0
}

func appendPaxosNode(b []byte, n PaxosNode) []byte {
	b = appendName(b, n.Name)
	return binary.BigEndian.AppendUint64(b, n.UID)
}

func appendProposal(b []byte, p ProposalID) []byte {
	b = binary.BigEndian.AppendUint32(b, p.Round)
	return appendPaxosNode(b, p.Proposer)
}

func getPaxosNode(b []byte) PaxosNode {
	return PaxosNode{Name: getName(b), UID: binary.BigEndian.Uint64(b[PeerNameLen:])}
}

func getProposal(b []byte) ProposalID {
	return ProposalID{Round: binary.BigEndian.Uint32(b), Proposer: getPaxosNode(b[4:])}
}

// ParseIPAMMsg decodes an IPAM gossip payload. It checks the encoding and
// the counts; what the values mean (ring invariants, consensus) is checked
// by the allocator.
func ParseIPAMMsg(b []byte) (IPAMMsg, error) {
	var m IPAMMsg
	if len(b) < 1 {
		return m, fmt.Errorf("%w: empty IPAM message", ErrShort)
	}
	m.Kind, b = IPAMKind(b[0]), b[1:]
	switch m.Kind {
	case IPAMRing:
		if len(b) < 1+5+2 {
			return m, fmt.Errorf("%w: ring of %d bytes", ErrShort, len(b))
		}
		if b[0]&^(ringReply|ringPartial) != 0 {
			return m, fmt.Errorf("%w: ring flags %#x", ErrMalform, b[0])
		}
		m.Reply, m.Partial, b = b[0]&ringReply != 0, b[0]&ringPartial != 0, b[1:]
		r, err := getPrefix(b)
		if err != nil {
			return m, err
		}
		m.Ring.Range = r
		n := int(binary.BigEndian.Uint16(b[5:]))
		b = b[7:]
		if n > MaxRingSeeds || len(b) < n*PeerNameLen+4 {
			return m, fmt.Errorf("%w: ring with %d seeds in %d bytes", ErrShort, n, len(b))
		}
		m.Ring.Seeds = make([]PeerName, n)
		for i := range n {
			m.Ring.Seeds[i] = getName(b[i*PeerNameLen:])
		}
		b = b[n*PeerNameLen:]
		k := binary.BigEndian.Uint32(b)
		b = b[4:]
		if k > MaxRingEntries || uint64(len(b)) != uint64(k)*ringEntryLen {
			return m, fmt.Errorf("%w: ring of %d entries in %d bytes", ErrMalform, k, len(b))
		}
		m.Ring.Entries = make([]RingEntry, k)
		for i := range m.Ring.Entries {
			q := b[i*ringEntryLen:]
			m.Ring.Entries[i] = RingEntry{Token: binary.BigEndian.Uint32(q), Peer: getName(q[4:]),
				Version: binary.BigEndian.Uint32(q[10:]), Free: binary.BigEndian.Uint32(q[14:])}
		}
		return m, nil
	case IPAMPaxos:
		if len(b) < 2 {
			return m, fmt.Errorf("%w: consensus state of %d bytes", ErrShort, len(b))
		}
		n := int(binary.BigEndian.Uint16(b))
		b = b[2:]
		if n > MaxPaxosNodes || len(b) < n*paxosFixedLen {
			return m, fmt.Errorf("%w: consensus state of %d voters in %d bytes", ErrShort, n, len(b))
		}
		m.Paxos = make([]PaxosClaims, n)
		for i := range m.Paxos {
			if len(b) < paxosFixedLen {
				return m, fmt.Errorf("%w: consensus state cut short", ErrShort)
			}
			c := &m.Paxos[i]
			c.Node = getPaxosNode(b)
			c.Promise = getProposal(b[paxosNodeLen:])
			c.Accepted = getProposal(b[paxosNodeLen+proposalLen:])
			c.Origin = getProposal(b[paxosNodeLen+2*proposalLen:])
			k := int(binary.BigEndian.Uint16(b[paxosFixedLen-2:]))
			b = b[paxosFixedLen:]
			if k > MaxRingSeeds || len(b) < k*PeerNameLen {
				return m, fmt.Errorf("%w: consensus value of %d peers in %d bytes", ErrShort, k, len(b))
			}
			if k > 0 {
				c.Value = make([]PeerName, k)
				for j := range k {
					c.Value[j] = getName(b[j*PeerNameLen:])
				}
			}
			b = b[k*PeerNameLen:]
		}
		if len(b) != 0 {
			return m, fmt.Errorf("%w: %d bytes after the consensus state", ErrMalform, len(b))
		}
		return m, nil
	case IPAMRingRequest:
		if len(b) != 0 {
			return m, fmt.Errorf("%w: ring request of %d bytes", ErrMalform, len(b))
		}
		return m, nil
	case IPAMSpaceRequest, IPAMSpaceDenied:
		if len(b) != 8 {
			return m, fmt.Errorf("%w: space message of %d bytes", ErrMalform, len(b))
		}
		m.Start, m.Last = binary.BigEndian.Uint32(b), binary.BigEndian.Uint32(b[4:])
		if m.Last < m.Start {
			return m, fmt.Errorf("%w: space %d-%d", ErrMalform, m.Start, m.Last)
		}
		return m, nil
	case IPAMDigest:
		if len(b) != 9 || b[8] > 1 {
			return m, fmt.Errorf("%w: digest of %d bytes", ErrMalform, len(b))
		}
		m.Hash, m.Echo = binary.BigEndian.Uint64(b), b[8] == 1
		return m, nil
	case IPAMHoldCheck, IPAMHoldAck:
		if len(b) != 16 {
			return m, fmt.Errorf("%w: hold message of %d bytes", ErrMalform, len(b))
		}
		m.Start, m.Last, m.Hash = binary.BigEndian.Uint32(b), binary.BigEndian.Uint32(b[4:]), binary.BigEndian.Uint64(b[8:])
		if m.Last < m.Start {
			return m, fmt.Errorf("%w: span %d-%d", ErrMalform, m.Start, m.Last)
		}
		return m, nil
	}
	return m, fmt.Errorf("%w: IPAM message kind %d", ErrMalform, m.Kind)
}
