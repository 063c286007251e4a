// Package paxos decides, once, which peers the allocation range is first
// divided among: single-decree Paxos in which every voter plays every role,
// its whole state gossiped (Weave's ipam/paxos). A voter is a peer name and
// process UID, so a restarted process votes afresh; but quorums count
// distinct peer names, so that restarts cannot make one peer count twice.
//
// The state only grows (higher promises, higher accepted proposals), so
// merging gossip in any order is safe, and lost messages only delay the
// decision.
package paxos

import (
	"cmp"
	"slices"

	"github.com/overlayd/overlayd/proto"
)

// compare orders proposals by round, then proposer name, then UID.
func compare(a, b proto.ProposalID) int {
	if c := cmp.Compare(a.Round, b.Round); c != 0 {
		return c
	}
	if c := cmp.Compare(a.Proposer.Name, b.Proposer.Name); c != 0 {
		return c
	}
	return cmp.Compare(a.Proposer.UID, b.Proposer.UID)
}

func valid(p proto.ProposalID) bool { return p.Round > 0 }

// A Node is one voter. It is not safe for concurrent use.
type Node struct {
	id     proto.PaxosNode
	quorum int
	knows  map[proto.PaxosNode]proto.PaxosClaims
}

// New makes a voter that decides once quorum voters agree.
func New(id proto.PaxosNode, quorum int) *Node {
	n := &Node{id: id, quorum: max(quorum, 1), knows: map[proto.PaxosNode]proto.PaxosClaims{}}
	n.knows[id] = proto.PaxosClaims{Node: id}
	return n
}

// Quorum is the number of voters that must agree.
func (n *Node) Quorum() int { return n.quorum }

// Known is the number of voters this one has heard of, itself included.
func (n *Node) Known() int { return len(n.knows) }

// Update merges a received state and reports whether anything was new.
// Entries beyond proto.MaxPaxosNodes voters are ignored.
func (n *Node) Update(from []proto.PaxosClaims) bool {
	changed := false
	for _, c := range from {
		if c.Node.Name == 0 {
			continue
		}
		have, ok := n.knows[c.Node]
		if !ok {
			if len(n.knows) >= proto.MaxPaxosNodes {
				continue
			}
			c.Value = slices.Clone(c.Value)
			n.knows[c.Node] = c
			changed = true
			continue
		}
		if compare(have.Promise, c.Promise) < 0 {
			have.Promise = c.Promise
			changed = true
		}
		if compare(have.Accepted, c.Accepted) < 0 {
			have.Accepted, have.Origin, have.Value = c.Accepted, c.Origin, slices.Clone(c.Value)
			changed = true
		}
		n.knows[c.Node] = have
	}
	return changed
}

// Propose starts a new round, higher than any seen, and promises it.
func (n *Node) Propose() {
	var round uint32
	for _, c := range n.knows {
		round = max(round, c.Promise.Round, c.Accepted.Round)
	}
	our := n.knows[n.id]
	our.Promise = proto.ProposalID{Round: round + 1, Proposer: n.id}
	n.knows[n.id] = our
}

// Think takes the next Paxos steps this voter can take on what it knows:
// promise the highest proposal seen; if that is our own and a quorum
// promised it, accept it with the value of the highest earlier acceptance
// among them or, if none, every voter we know; accept what the proposer of
// our promise accepted. It reports whether our claims changed.
func (n *Node) Think() bool {
	our := n.knows[n.id]
	old := our
	for _, c := range n.knows {
		if compare(our.Promise, c.Promise) < 0 {
			our.Promise = c.Promise
		}
	}
	if valid(our.Promise) && our.Promise.Proposer == n.id && compare(our.Accepted, our.Promise) < 0 {
		promised := map[proto.PeerName]bool{}
		var best proto.PaxosClaims
		for _, c := range n.knows {
			if c.Node != n.id && c.Promise != our.Promise {
				continue
			}
			promised[c.Node.Name] = true
			if valid(c.Accepted) && compare(best.Accepted, c.Accepted) < 0 {
				best = c
			}
		}
		if len(promised) >= n.quorum {
			our.Accepted = our.Promise
			if valid(best.Accepted) {
				our.Origin, our.Value = best.Origin, slices.Clone(best.Value)
			} else {
				our.Origin, our.Value = our.Promise, n.voters()
			}
		}
	}
	for _, c := range n.knows {
		if valid(c.Accepted) && c.Accepted == our.Promise && compare(our.Accepted, c.Accepted) < 0 {
			our.Accepted, our.Origin, our.Value = c.Accepted, c.Origin, slices.Clone(c.Value)
		}
	}
	n.knows[n.id] = our
	return our.Promise != old.Promise || our.Accepted != old.Accepted || our.Origin != old.Origin
}

// voters is the sorted set of peer names we know to vote.
func (n *Node) voters() []proto.PeerName {
	out := make([]proto.PeerName, 0, len(n.knows))
	for id := range n.knows {
		out = append(out, id.Name)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// Consensus returns the decided value, sorted and de-duplicated, once
// voters of a quorum of distinct names accepted one ballot. (Weave counts
// acceptances by the value's origin instead; acceptances of different
// ballots that carry values of one origin can then add up to a decision
// that a later ballot overturns.)
func (n *Node) Consensus() ([]proto.PeerName, bool) {
	voters := map[proto.ProposalID]map[proto.PeerName]bool{}
	for _, id := range n.sorted() {
		c := n.knows[id]
		if !valid(c.Accepted) || len(c.Value) == 0 {
			continue
		}
		if voters[c.Accepted] == nil {
			voters[c.Accepted] = map[proto.PeerName]bool{}
		}
		voters[c.Accepted][c.Node.Name] = true
		if len(voters[c.Accepted]) >= n.quorum {
			v := slices.Clone(c.Value)
			slices.Sort(v)
			return slices.Compact(v), true
		}
	}
	return nil, false
}

func (n *Node) sorted() []proto.PaxosNode {
	ids := make([]proto.PaxosNode, 0, len(n.knows))
	for id := range n.knows {
		ids = append(ids, id)
	}
	slices.SortFunc(ids, func(a, b proto.PaxosNode) int {
		if c := cmp.Compare(a.Name, b.Name); c != 0 {
			return c
		}
		return cmp.Compare(a.UID, b.UID)
	})
	return ids
}

// State returns every voter's claims, sorted by voter, for gossip.
func (n *Node) State() []proto.PaxosClaims {
	out := make([]proto.PaxosClaims, 0, len(n.knows))
	for _, id := range n.sorted() {
		c := n.knows[id]
		c.Value = slices.Clone(c.Value)
		out = append(out, c)
	}
	return out
}
