package main

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/overlayd/overlayd/internal/api"
)

// attachCommands plumb containers in and out: attach and detach (ps is a
// listing).
func (c *cli) attachCommands() []*cobra.Command {
	var name string
	attach := &cobra.Command{
		Use:   "attach TARGET [CIDR...] [--name NAME]",
		Short: "Plumb a container (a network namespace's name or path, a PID, or a Docker container) into the overlay: ethwe0 with an address from IPAM, or the CIDRs given",
		Args:  minArgs(1, "attach needs a target: a network namespace name (as in ip netns) or path, a PID, or a Docker container"),
		RunE: func(cmd *cobra.Command, args []string) error {
			cidrs, err := parseCIDRs(args[1:])
			if err != nil {
				return err
			}
			// Waits for IPAM like alloc: no timeout but the user's.
			a, err := c.client().Attach(cmd.Context(), api.AttachRequest{Target: args[0], CIDRs: cidrs, Name: name})
			for _, p := range a.Addresses {
				fmt.Fprintln(c.out, p)
			}
			return err
		},
	}
	attach.Flags().StringVar(&name, "name", "", "register this name in DNS for the container's addresses (a single label gets the domain)")
	detach := c.call("detach TARGET [CIDR...]", "Take a container out of the overlay (or only the CIDRs given), releasing its addresses and names",
		minArgs(1, "detach needs a target: a network namespace name or path, a PID, or a Docker container"),
		func(ctx context.Context, cl *api.Client, args []string) error {
			cidrs, err := parseCIDRs(args[1:])
			if err != nil {
				return err
			}
			return cl.Detach(ctx, api.AttachRequest{Target: args[0], CIDRs: cidrs})
		})
	return []*cobra.Command{attach, detach}
}
