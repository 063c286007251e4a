package main

import (
	"context"
	"fmt"
	"net/netip"

	"github.com/spf13/cobra"

	"github.com/overlayd/overlayd/internal/api"
)

// dnsCommands manage names: dns-add, dns-remove, dns-lookup and dns-args
// (dns itself is a listing).
func (c *cli) dnsCommands() []*cobra.Command {
	var container string
	dnsAdd := c.call("dns-add IP... NAME [--container ID]", "Register NAME (a single label gets the domain) for the addresses",
		minArgs(2, "dns-add needs at least one address and a name, such as: dns-add 10.32.0.5 web1"),
		func(ctx context.Context, cl *api.Client, args []string) error {
			var ips []netip.Addr
			for _, s := range args[:len(args)-1] {
				a, ok := parseIPv4(s)
				if !ok {
					return usagef("dns-add: %q is not an IPv4 address (addresses come first, the name last)", s)
				}
				ips = append(ips, a)
			}
			_, err := cl.DNSAdd(ctx, api.DNSRequest{Addresses: ips, Name: args[len(args)-1], ContainerID: container})
			return err
		})
	dnsAdd.Flags().StringVar(&container, "container", "", "container ID the name belongs to (default: weave:extern)")
	var only string
	dnsRemove := c.call("dns-remove IP... [NAME] [--container ID]", "Remove names registered here: for the addresses, of NAME, of the container",
		cobra.ArbitraryArgs,
		func(ctx context.Context, cl *api.Client, args []string) error {
			var ips []netip.Addr
			name := ""
			for i, s := range args {
				a, ok := parseIPv4(s)
				switch {
				case ok:
					ips = append(ips, a)
				case i == len(args)-1:
					name = s
				default:
					return usagef("dns-remove: %q is not an IPv4 address (addresses come first, the name last)", s)
				}
			}
			if len(ips) == 0 && name == "" && only == "" {
				return usagef("dns-remove needs addresses, a name or --container")
			}
			_, err := cl.DNSRemove(ctx, api.DNSRequest{Addresses: ips, Name: name, ContainerID: only})
			return err
		})
	dnsRemove.Flags().StringVar(&only, "container", "", "only the names of this container ID")
	dnsLookup := c.call("dns-lookup NAME", "Print the addresses of a name (a single label gets the domain)",
		exactArgs(1, "dns-lookup needs a name, such as web1"),
		func(ctx context.Context, cl *api.Client, args []string) error {
			r, err := cl.DNSLookup(ctx, args[0])
			for _, a := range r.Addresses {
				fmt.Fprintln(c.out, a)
			}
			return err
		})
	dnsArgsCmd := c.call("dns-args", "Print the docker run flags that give a container our DNS server (nothing when DNS is off)",
		noArgs,
		func(ctx context.Context, cl *api.Client, _ []string) error {
			st, err := cl.DNS(ctx)
			if err != nil {
				return err
			}
			a, err := dnsArgs(&st)
			fmt.Fprint(c.out, a)
			return err
		})
	return []*cobra.Command{dnsAdd, dnsRemove, dnsLookup, dnsArgsCmd}
}
