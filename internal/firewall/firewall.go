// Package firewall lets the overlay's forwarded traffic through the
// host's iptables FORWARD chain, whose policy Docker sets to DROP. The
// rules live in a chain of their own, jumped to from the top of FORWARD;
// Remove takes out exactly that jump and that chain, no other rule.
//
// It uses the iptables command (github.com/coreos/go-iptables), the same
// front end, nft or legacy, that Docker uses on the host.
package firewall

import (
	"fmt"

	"github.com/coreos/go-iptables/iptables"
)

// ContainerIfaces matches the host ends of the containers' veth pairs.
const ContainerIfaces = "vethwe+"

// Rules is the overlay's set of FORWARD rules for one TUN device.
type Rules struct {
	ipt   *iptables.IPTables
	Chain string // OVERLAYD-<tun>
	tun   string
}

// New finds the iptables command; it changes nothing.
func New(tun string) (*Rules, error) {
	ipt, err := iptables.New(iptables.IPFamily(iptables.ProtocolIPv4), iptables.Timeout(10))
	if err != nil {
		return nil, fmt.Errorf("firewall: %w (install iptables)", err)
	}
	return &Rules{ipt: ipt, Chain: "OVERLAYD-" + tun, tun: tun}, nil
}

// rules are the chain's contents: traffic between the overlay and the
// containers, and between containers, is accepted; replies match the
// same rules.
func (r *Rules) rules() [][]string {
	return [][]string{
		{"-i", r.tun, "-o", ContainerIfaces, "-j", "ACCEPT"},
		{"-i", ContainerIfaces, "-o", r.tun, "-j", "ACCEPT"},
		{"-i", ContainerIfaces, "-o", ContainerIfaces, "-j", "ACCEPT"},
		{"-i", r.tun, "-o", r.tun, "-j", "ACCEPT"}, // relayed between peers (password mode)
	}
}

// Install creates (or refills) the chain and puts the jump to it at the
// top of FORWARD, once. It is idempotent: a restart after a crash finds
// the chain and the jump and leaves one of each.
func (r *Rules) Install() error {
	ok, err := r.ipt.ChainExists("filter", r.Chain)
	if err != nil {
		return fmt.Errorf("firewall: %w", err)
	}
	if ok {
		err = r.ipt.ClearChain("filter", r.Chain)
	} else {
		err = r.ipt.NewChain("filter", r.Chain)
	}
	if err != nil {
		return fmt.Errorf("firewall: chain %s: %w", r.Chain, err)
	}
	for _, rule := range r.rules() {
		if err := r.ipt.Append("filter", r.Chain, rule...); err != nil {
			r.Remove()
			return fmt.Errorf("firewall: %w", err)
		}
	}
	if err := r.ipt.InsertUnique("filter", "FORWARD", 1, "-j", r.Chain); err != nil {
		r.Remove()
		return fmt.Errorf("firewall: jump to %s: %w", r.Chain, err)
	}
	return nil
}

// Remove deletes the jump and the chain; what is already gone is not an
// error.
func (r *Rules) Remove() error {
	if err := r.ipt.DeleteIfExists("filter", "FORWARD", "-j", r.Chain); err != nil {
		return fmt.Errorf("firewall: %w", err)
	}
	ok, err := r.ipt.ChainExists("filter", r.Chain)
	if err != nil || !ok {
		return err
	}
	if err := r.ipt.ClearAndDeleteChain("filter", r.Chain); err != nil {
		return fmt.Errorf("firewall: %w", err)
	}
	return nil
}
