// Command overlayctl controls a running overlayd through its control socket:
// tables for people, --json for scripts.
//
// Exit codes: 0 on success, 1 when the daemon cannot be reached or refuses
// the request, 2 for a bad command line. Errors are one line on stderr.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/buildinfo"
)

func main() {
	os.Exit(execute(os.Args[1:], os.Stdout, os.Stderr))
}

// usageError is a bad command line: exit code 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

type cli struct {
	socket string
	json   bool
	out    io.Writer
}

func (c *cli) client() *api.Client { return api.NewClient(c.socket) }

func (c *cli) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 30*time.Second)
}

func (c *cli) printJSON(v any) error {
	enc := json.NewEncoder(c.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// status fetches the daemon's status.
func (c *cli) status() (*api.Status, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	st, err := c.client().Status(ctx)
	return &st, err
}

func execute(args []string, stdout, stderr io.Writer) int {
	c := &cli{out: stdout}
	root := &cobra.Command{
		Use:           "overlayctl",
		Short:         "Control a running overlayd",
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return usagef("a command is required (see overlayctl --help)")
		},
	}
	def := os.Getenv(api.SocketEnv)
	if def == "" {
		def = api.DefaultSocket
	}
	root.PersistentFlags().StringVar(&c.socket, "socket", def, "overlayd's control socket (also $"+api.SocketEnv+")")
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err.Error()} })

	jsonFlag := func(cmd *cobra.Command) *cobra.Command {
		cmd.Flags().BoolVar(&c.json, "json", false, "print JSON for scripts")
		return cmd
	}
	listing := func(use, short string, print func(*api.Status) any, text func(io.Writer, *api.Status)) *cobra.Command {
		return jsonFlag(&cobra.Command{
			Use: use, Short: short, Args: noArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				st, err := c.status()
				if err != nil {
					return err
				}
				if c.json {
					return c.printJSON(print(st))
				}
				text(c.out, st)
				return nil
			},
		})
	}
	peers := func(use string) *cobra.Command {
		return listing(use, "List peers and their connections",
			func(st *api.Status) any { return st.Router.Peers },
			func(w io.Writer, st *api.Status) { writePeers(w, st.Router.Peers) })
	}
	connections := func(use string) *cobra.Command {
		return listing(use, "List connections and targets",
			func(st *api.Status) any { return st.Router.Connections },
			func(w io.Writer, st *api.Status) { writeConnections(w, st.Router.Connections) })
	}
	targets := func(use string) *cobra.Command {
		return listing(use, "List the addresses this peer dials",
			func(st *api.Status) any { return st.Router.Targets },
			func(w io.Writer, st *api.Status) { writeTargets(w, st.Router.Targets) })
	}
	ipam := listing("ipam", "Show IP allocation by peer (empty while the ring is idle)",
		func(st *api.Status) any { return st.IPAM },
		func(w io.Writer, st *api.Status) { writeIPAM(w, &st.IPAM) })

	dnsList := func(use string) *cobra.Command {
		return jsonFlag(&cobra.Command{
			Use: use, Short: "List the live DNS entries of every peer (--json: all entries, tombstones too, with every field)", Args: noArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				ctx, cancel := c.ctx()
				defer cancel()
				st, err := c.client().DNS(ctx)
				if err != nil {
					return err
				}
				if c.json {
					return c.printJSON(st)
				}
				writeDNS(c.out, &st)
				return nil
			},
		})
	}
	status := listing("status [targets|connections|peers|ipam|dns]", "Show the daemon's status",
		func(st *api.Status) any { return st },
		func(w io.Writer, st *api.Status) { writeStatus(w, st) })
	status.Args = cobra.ArbitraryArgs
	status.AddCommand(targets("targets"), connections("connections"), peers("peers"), ipam, dnsList("dns"))
	plain := status.RunE
	status.RunE = func(cmd *cobra.Command, args []string) error {
		if len(args) > 0 {
			return usagef("Invalid 'overlayctl status' sub-command: %s (want targets, connections, peers, ipam or dns)", args[0])
		}
		return plain(cmd, args)
	}

	// action makes a command that hands its arguments to one client call.
	action := func(use, short string, args cobra.PositionalArgs, check func(string) error,
		call func(*api.Client, context.Context, []string) error) *cobra.Command {
		return &cobra.Command{
			Use: use, Short: short, Args: args,
			RunE: func(cmd *cobra.Command, args []string) error {
				for _, a := range args {
					if err := check(a); err != nil {
						return err
					}
				}
				ctx, cancel := c.ctx()
				defer cancel()
				return call(c.client(), ctx, args)
			},
		}
	}
	anything := func(string) error { return nil }
	cidr := func(s string) error {
		if _, err := api.ParseCIDR(s); err != nil {
			return usagef("%s", strings.TrimPrefix(err.Error(), api.ErrBadRequest.Error()+": "))
		}
		return nil
	}
	connect := action("connect ADDR...", "Add peers to dial (HOST or HOST:PORT)",
		minArgs(1, "connect needs at least one peer address (HOST or HOST:PORT)"), anything,
		func(cl *api.Client, ctx context.Context, args []string) error { return cl.Connect(ctx, args) })
	forget := action("forget ADDR...", "Stop dialling peers and drop their connections",
		minArgs(1, "forget needs at least one peer address"), anything,
		func(cl *api.Client, ctx context.Context, args []string) error { return cl.Forget(ctx, args) })
	expose := action("expose [CIDR]", "Give this host an address on the overlay (from IPAM if no CIDR is given) and print it",
		maxArgs(1, "expose takes at most one address, as a CIDR such as 10.32.0.1/12"),
		cidr, func(cl *api.Client, ctx context.Context, args []string) error {
			p, err := cl.Expose(ctx, strings.Join(args, ""))
			if err == nil {
				fmt.Fprintln(c.out, p)
			}
			return err
		})
	// The allocator's requests wait for consensus or space: no timeout
	// but the user's (Ctrl-C), as Weave's.
	alloc := &cobra.Command{
		Use: "alloc ID [SUBNET]", Short: "Allocate an address for ID (the same one again for the same ID) and print it",
		Args: rangeArgs(1, 2, "alloc needs an ID and optionally a SUBNET inside the range"),
		RunE: func(cmd *cobra.Command, args []string) error {
			sub := ""
			if len(args) == 2 {
				if err := cidr(args[1]); err != nil {
					return err
				}
				sub = args[1]
			}
			p, err := c.client().Alloc(cmd.Context(), args[0], sub)
			if err == nil {
				fmt.Fprintln(c.out, p)
			}
			return err
		},
	}
	claim := &cobra.Command{
		Use: "claim ID ADDR/MASK", Short: "Take a given address for ID (outside the range: recorded as manual) and print it",
		Args: exactArgs(2, "claim needs an ID and an address with its mask, such as 10.32.0.5/12"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := cidr(args[1]); err != nil {
				return err
			}
			p, err := c.client().Claim(cmd.Context(), args[0], args[1])
			if err == nil {
				fmt.Fprintln(c.out, p)
			}
			return err
		},
	}
	release := action("release ID [ADDR]", "Free the addresses of ID (or only ADDR)",
		rangeArgs(1, 2, "release needs an ID and optionally one of its addresses"), anything,
		func(cl *api.Client, ctx context.Context, args []string) error {
			addr := ""
			if len(args) == 2 {
				addr = args[1]
			}
			return cl.Release(ctx, args[0], addr)
		})
	rmpeer := action("rmpeer PEER", "Take over the address space of a dead peer",
		exactArgs(1, "rmpeer needs the name of a dead peer, such as 12:d2:fe:7a:c1:f2"), anything,
		func(cl *api.Client, ctx context.Context, args []string) error {
			r, err := cl.RmPeer(ctx, args[0])
			if err == nil {
				fmt.Fprintf(c.out, "%d IPs taken over from %v\n", r.Taken, r.Peer)
			}
			return err
		})
	ringCmd := jsonFlag(&cobra.Command{
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
	hide := action("hide CIDR", "Remove an exposed address from this host",
		exactArgs(1, "hide needs the exposed address, as a CIDR such as 10.32.0.1/12"),
		cidr, func(cl *api.Client, ctx context.Context, args []string) error { return cl.Hide(ctx, args[0]) })
	var container string
	dnsAdd := &cobra.Command{
		Use: "dns-add IP... NAME [--container ID]", Short: "Register NAME (a single label gets the domain) for the addresses",
		Args: minArgs(2, "dns-add needs at least one address and a name, such as: dns-add 10.32.0.5 web1"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ips, name := args[:len(args)-1], args[len(args)-1]
			for _, a := range ips {
				if !isIPv4(a) {
					return usagef("dns-add: %q is not an IPv4 address (addresses come first, the name last)", a)
				}
			}
			ctx, cancel := c.ctx()
			defer cancel()
			_, err := c.client().DNSAdd(ctx, api.DNSRequest{Addresses: ips, Name: name, ContainerID: container})
			return err
		},
	}
	dnsAdd.Flags().StringVar(&container, "container", "", "container ID the name belongs to (default: weave:extern)")
	dnsRemove := &cobra.Command{
		Use: "dns-remove IP... [NAME] [--container ID]", Short: "Remove names registered here: for the addresses, of NAME, of the container",
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var ips []string
			name := ""
			for i, a := range args {
				switch {
				case isIPv4(a):
					ips = append(ips, a)
				case i == len(args)-1:
					name = a
				default:
					return usagef("dns-remove: %q is not an IPv4 address (addresses come first, the name last)", a)
				}
			}
			if len(ips) == 0 && name == "" && container == "" {
				return usagef("dns-remove needs addresses, a name or --container")
			}
			ctx, cancel := c.ctx()
			defer cancel()
			_, err := c.client().DNSRemove(ctx, api.DNSRequest{Addresses: ips, Name: name, ContainerID: container})
			return err
		},
	}
	dnsRemove.Flags().StringVar(&container, "container", "", "only the names of this container ID")
	dnsLookup := action("dns-lookup NAME", "Print the addresses of a name (a single label gets the domain)",
		exactArgs(1, "dns-lookup needs a name, such as web1"), anything,
		func(cl *api.Client, ctx context.Context, args []string) error {
			r, err := cl.DNSLookup(ctx, args[0])
			for _, a := range r.Addresses {
				fmt.Fprintln(c.out, a)
			}
			return err
		})
	dnsArgsCmd := action("dns-args", "Print the docker run flags that give a container our DNS server (nothing when DNS is off)",
		noArgs, anything,
		func(cl *api.Client, ctx context.Context, args []string) error {
			st, err := cl.DNS(ctx)
			if err != nil {
				return err
			}
			a, err := dnsArgs(&st)
			fmt.Fprint(c.out, a)
			return err
		})
	var attachName string
	attachCmd := &cobra.Command{
		Use:   "attach TARGET [CIDR...] [--name NAME]",
		Short: "Plumb a container (a network namespace's name or path, a PID, or a Docker container) into the overlay: ethwe0 with an address from IPAM, or the CIDRs given",
		Args:  minArgs(1, "attach needs a target: a network namespace name (as in ip netns) or path, a PID, or a Docker container"),
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, a := range args[1:] {
				if err := cidr(a); err != nil {
					return err
				}
			}
			a, err := c.client().Attach(cmd.Context(), api.AttachRequest{Target: args[0], CIDRs: args[1:], Name: attachName})
			for _, p := range a.Addresses {
				fmt.Fprintln(c.out, p)
			}
			return err
		},
	}
	attachCmd.Flags().StringVar(&attachName, "name", "", "register this name in DNS for the container's addresses (a single label gets the domain)")
	detachCmd := action("detach TARGET [CIDR...]", "Take a container out of the overlay (or only the CIDRs given), releasing its addresses and names",
		minArgs(1, "detach needs a target: a network namespace name or path, a PID, or a Docker container"), anything,
		func(cl *api.Client, ctx context.Context, args []string) error {
			for _, a := range args[1:] {
				if err := cidr(a); err != nil {
					return err
				}
			}
			return cl.Detach(ctx, api.AttachRequest{Target: args[0], CIDRs: args[1:]})
		})
	psCmd := jsonFlag(&cobra.Command{
		Use: "ps", Short: "List this host's exposed addresses and its containers (attached, or on the plugin's Docker networks), as weave ps", Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, cancel := c.ctx()
			defer cancel()
			ps, err := c.client().Ps(ctx)
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(ps)
			}
			writePs(c.out, &ps)
			return nil
		},
	})
	version := jsonFlag(&cobra.Command{
		Use: "version", Short: "Print the versions of overlayctl and the daemon", Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, cancel := c.ctx()
			defer cancel()
			v, err := c.client().Version(ctx)
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
		},
	})
	root.AddCommand(status, peers("peers"), connections("connections"), targets("targets"),
		connect, forget, expose, hide, alloc, claim, release, rmpeer, ringCmd,
		dnsList("dns"), dnsAdd, dnsRemove, dnsLookup, dnsArgsCmd, attachCmd, detachCmd, psCmd, version)
	root.CompletionOptions.DisableDefaultCmd = true
	root.SetArgs(args)

	err := root.Execute()
	if err == nil {
		return 0
	}
	msg := strings.ReplaceAll(err.Error(), "\n", "; ")
	var ue usageError
	code := 1
	if errors.As(err, &ue) || isCobraUsage(msg) {
		code = 2
	}
	fmt.Fprintf(stderr, "overlayctl: %s\n", msg)
	return code
}

// isCobraUsage recognises cobra's own command-line errors.
func isCobraUsage(msg string) bool {
	return strings.HasPrefix(msg, "unknown command") || strings.HasPrefix(msg, "unknown flag") ||
		strings.HasPrefix(msg, "unknown shorthand flag")
}

func isIPv4(s string) bool {
	a, err := netip.ParseAddr(s)
	return err == nil && a.Is4()
}

func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		if cmd.HasSubCommands() {
			return usagef("unknown command %q for %q", args[0], cmd.CommandPath())
		}
		return usagef("%s takes no arguments, got %q", cmd.CommandPath(), strings.Join(args, " "))
	}
	return nil
}

func minArgs(n int, msg string) cobra.PositionalArgs {
	return func(_ *cobra.Command, args []string) error {
		if len(args) < n {
			return usageError{msg}
		}
		return nil
	}
}

func maxArgs(n int, msg string) cobra.PositionalArgs { return rangeArgs(0, n, msg) }

func rangeArgs(lo, hi int, msg string) cobra.PositionalArgs {
	return func(_ *cobra.Command, args []string) error {
		if len(args) < lo || len(args) > hi {
			return usageError{msg}
		}
		return nil
	}
}

func exactArgs(n int, msg string) cobra.PositionalArgs {
	return func(_ *cobra.Command, args []string) error {
		if len(args) != n {
			return usageError{msg}
		}
		return nil
	}
}
