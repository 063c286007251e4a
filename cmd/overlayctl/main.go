// Command overlayctl controls a running overlayd through its control socket:
// tables for people, --json for scripts.
//
// Exit codes: 0 on success, 1 when the daemon cannot be reached or refuses
// the request, 2 for a bad command line. Errors are one line on stderr.
//
// The commands are grouped by what they act on, one file each: status.go
// (status and listings), peers.go (targets), ipam.go (addresses), dns.go
// (names) and attach.go (containers); format.go prints Weave's layouts.
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
)

func main() {
	os.Exit(execute(os.Args[1:], os.Stdout, os.Stderr))
}

// usageError is a bad command line: exit code 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

// cli is what every command shares: the socket, --json, and stdout.
type cli struct {
	socket string
	json   bool
	out    io.Writer
}

func (c *cli) client() *api.Client { return api.NewClient(c.socket) }

// ctx bounds a call that does not wait for the allocator.
func (c *cli) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 30*time.Second)
}

func (c *cli) printJSON(v any) error {
	enc := json.NewEncoder(c.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// withJSON gives cmd the --json flag.
func (c *cli) withJSON(cmd *cobra.Command) *cobra.Command {
	cmd.Flags().BoolVar(&c.json, "json", false, "print JSON for scripts")
	return cmd
}

// call makes a command that checks its arguments and hands them to one
// client call, bounded by ctx.
func (c *cli) call(use, short string, args cobra.PositionalArgs, do func(context.Context, *api.Client, []string) error) *cobra.Command {
	return &cobra.Command{
		Use: use, Short: short, Args: args,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, cancel := c.ctx()
			defer cancel()
			return do(ctx, c.client(), args)
		},
	}
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
	for _, group := range [][]*cobra.Command{c.statusCommands(), c.peerCommands(), c.ipamCommands(), c.dnsCommands(), c.attachCommands()} {
		root.AddCommand(group...)
	}
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

// parseCIDR parses a command-line CIDR; a bad one is a usage error.
func parseCIDR(s string) (netip.Prefix, error) {
	p, err := api.ParseCIDR(s)
	if err != nil {
		return p, usageError{err.Error()}
	}
	return p, nil
}

// parseCIDRs parses every argument as a CIDR.
func parseCIDRs(args []string) ([]netip.Prefix, error) {
	var ps []netip.Prefix
	for _, a := range args {
		p, err := parseCIDR(a)
		if err != nil {
			return nil, err
		}
		ps = append(ps, p)
	}
	return ps, nil
}

func parseIPv4(s string) (netip.Addr, bool) {
	a, err := netip.ParseAddr(s)
	return a, err == nil && a.Is4()
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

func minArgs(n int, msg string) cobra.PositionalArgs { return rangeArgs(n, 1<<30, msg) }

func maxArgs(n int, msg string) cobra.PositionalArgs { return rangeArgs(0, n, msg) }

func exactArgs(n int, msg string) cobra.PositionalArgs { return rangeArgs(n, n, msg) }

func rangeArgs(lo, hi int, msg string) cobra.PositionalArgs {
	return func(_ *cobra.Command, args []string) error {
		if len(args) < lo || len(args) > hi {
			return usageError{msg}
		}
		return nil
	}
}
