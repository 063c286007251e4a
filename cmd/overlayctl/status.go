package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/buildinfo"
)

// statusCommands are the listings: status and its sections, peers,
// connections, targets, dns, ps and version.
func (c *cli) statusCommands() []*cobra.Command {
	status := c.listing("status [targets|connections|peers|ipam|dns]", "Show the daemon's status",
		func(st *api.Status) any { return st },
		func(w io.Writer, st *api.Status) { writeStatus(w, st) })
	status.Args = cobra.ArbitraryArgs
	status.AddCommand(c.targets(), c.connections(), c.peers(), c.ipamListing(), c.dnsList())
	plain := status.RunE
	status.RunE = func(cmd *cobra.Command, args []string) error {
		if len(args) > 0 {
			return usagef("Invalid 'overlayctl status' sub-command: %s (want targets, connections, peers, ipam or dns)", args[0])
		}
		return plain(cmd, args)
	}
	return []*cobra.Command{status, c.peers(), c.connections(), c.targets(), c.dnsList(), c.ps(), c.version()}
}

// listing makes a command that prints part of the status: print gives
// what --json shows, text writes the table.
func (c *cli) listing(use, short string, print func(*api.Status) any, text func(io.Writer, *api.Status)) *cobra.Command {
	return c.withJSON(&cobra.Command{
		Use: use, Short: short, Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, cancel := c.ctx()
			defer cancel()
			st, err := c.client().Status(ctx)
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(print(&st))
			}
			text(c.out, &st)
			return nil
		},
	})
}

func (c *cli) peers() *cobra.Command {
	return c.listing("peers", "List peers and their connections",
		func(st *api.Status) any { return st.Router.Peers },
		func(w io.Writer, st *api.Status) { writePeers(w, st.Router.Peers) })
}

func (c *cli) connections() *cobra.Command {
	return c.listing("connections", "List connections and targets",
		func(st *api.Status) any { return st.Router.Connections },
		func(w io.Writer, st *api.Status) { writeConnections(w, st.Router.Connections) })
}

func (c *cli) targets() *cobra.Command {
	return c.listing("targets", "List the addresses this peer dials",
		func(st *api.Status) any { return st.Router.Targets },
		func(w io.Writer, st *api.Status) { writeTargets(w, st.Router.Targets) })
}

func (c *cli) ipamListing() *cobra.Command {
	return c.listing("ipam", "Show IP allocation by peer (empty while the ring is idle)",
		func(st *api.Status) any { return st.IPAM },
		func(w io.Writer, st *api.Status) { writeIPAM(w, &st.IPAM) })
}

func (c *cli) dnsList() *cobra.Command {
	return c.withJSON(c.call("dns", "List the live DNS entries of every peer (--json: all entries, tombstones too, with every field)", noArgs,
		func(ctx context.Context, cl *api.Client, _ []string) error {
			st, err := cl.DNS(ctx)
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(st)
			}
			writeDNS(c.out, &st)
			return nil
		}))
}

func (c *cli) ps() *cobra.Command {
	return c.withJSON(c.call("ps", "List this host's exposed addresses and its containers (attached, or on the plugin's Docker networks), as weave ps", noArgs,
		func(ctx context.Context, cl *api.Client, _ []string) error {
			ps, err := cl.Ps(ctx)
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(ps)
			}
			writePs(c.out, &ps)
			return nil
		}))
}

func (c *cli) version() *cobra.Command {
	return c.withJSON(c.call("version", "Print the versions of overlayctl and the daemon", noArgs,
		func(ctx context.Context, cl *api.Client, _ []string) error {
			v, err := cl.Version(ctx)
			if c.json {
				if err != nil {
					return err
				}
				return c.printJSON(map[string]any{"overlayctl": buildinfo.Version, "overlayd": v})
			}
			fmt.Fprintf(c.out, "overlayctl %s\n", buildinfo.Version)
			if err != nil {
				return err
			}
			fmt.Fprintf(c.out, "overlayd %s (protocol %d..%d)\n", v.Version, v.ProtocolMinVersion, v.ProtocolMaxVersion)
			return nil
		}))
}
