package main

import (
	"context"
	"fmt"
	"net/netip"
	"strings"

	"github.com/spf13/cobra"

	"github.com/overlayd/overlayd/internal/api"
)

// ipamCommands manage addresses: expose, hide, alloc, claim, release,
// rmpeer and ring.
func (c *cli) ipamCommands() []*cobra.Command {
	expose := c.call("expose [CIDR]", "Give this host an address on the overlay (from IPAM if no CIDR is given) and print it",
		maxArgs(1, "expose takes at most one address, as a CIDR such as 10.32.0.1/12"),
		func(ctx context.Context, cl *api.Client, args []string) error {
			var p netip.Prefix
			if len(args) == 1 {
				var err error
				if p, err = parseCIDR(args[0]); err != nil {
					return err
				}
			}
			return c.printAddr(cl.Expose(ctx, p))
		})
	hide := c.call("hide CIDR", "Remove an exposed address from this host",
		exactArgs(1, "hide needs the exposed address, as a CIDR such as 10.32.0.1/12"),
		func(ctx context.Context, cl *api.Client, args []string) error {
			p, err := parseCIDR(args[0])
			if err != nil {
				return err
			}
			return cl.Hide(ctx, p)
		})
	// The allocator's requests wait for consensus or space: no timeout
	// but the user's (Ctrl-C), as Weave's.
	alloc := &cobra.Command{
		Use: "alloc ID [SUBNET]", Short: "Allocate an address for ID (the same one again for the same ID) and print it",
		Args: rangeArgs(1, 2, "alloc needs an ID and optionally a SUBNET inside the range"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var sub netip.Prefix
			if len(args) == 2 {
				var err error
				if sub, err = parseCIDR(args[1]); err != nil {
					return err
				}
			}
			return c.printAddr(c.client().Alloc(cmd.Context(), args[0], sub))
		},
	}
	claim := &cobra.Command{
		Use: "claim ID ADDR/MASK", Short: "Take a given address for ID (outside the range: recorded as manual) and print it",
		Args: exactArgs(2, "claim needs an ID and an address with its mask, such as 10.32.0.5/12"),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := parseCIDR(args[1])
			if err != nil {
				return err
			}
			return c.printAddr(c.client().Claim(cmd.Context(), args[0], p))
		},
	}
	release := c.call("release ID [ADDR]", "Free the addresses of ID (or only ADDR)",
		rangeArgs(1, 2, "release needs an ID and optionally one of its addresses"),
		func(ctx context.Context, cl *api.Client, args []string) error {
			var a netip.Addr
			if len(args) == 2 {
				s, _, _ := strings.Cut(args[1], "/") // an address with its mask will do
				var ok bool
				if a, ok = parseIPv4(s); !ok {
					return usagef("release: %q is not an IPv4 address", args[1])
				}
			}
			return cl.Release(ctx, args[0], a)
		})
	rmpeer := c.call("rmpeer PEER", "Take over the address space of a dead peer",
		exactArgs(1, "rmpeer needs the name of a dead peer, such as 12:d2:fe:7a:c1:f2"),
		func(ctx context.Context, cl *api.Client, args []string) error {
			r, err := cl.RmPeer(ctx, args[0])
			if err == nil {
				fmt.Fprintf(c.out, "%d IPs taken over from %v\n", r.Taken, r.Peer)
			}
			return err
		})
	ring := c.withJSON(&cobra.Command{
		Use: "ring", Short: "Show the allocation ring, starting consensus if it does not exist yet (Weave's prime)", Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := c.client().Ring(cmd.Context())
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(st)
			}
			writeRing(c.out, &st)
			return nil
		},
	})
	return []*cobra.Command{expose, hide, alloc, claim, release, rmpeer, ring}
}

// printAddr prints the address a call gave, if it gave one.
func (c *cli) printAddr(p netip.Prefix, err error) error {
	if err == nil {
		fmt.Fprintln(c.out, p)
	}
	return err
}
