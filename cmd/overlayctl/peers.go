package main

import (
	"context"

	"github.com/spf13/cobra"

	"github.com/overlayd/overlayd/internal/api"
)

// peerCommands change the targets: connect and forget.
func (c *cli) peerCommands() []*cobra.Command {
	connect := c.call("connect ADDR...", "Add peers to dial (HOST or HOST:PORT)",
		minArgs(1, "connect needs at least one peer address (HOST or HOST:PORT)"),
		func(ctx context.Context, cl *api.Client, args []string) error { return cl.Connect(ctx, args) })
	forget := c.call("forget ADDR...", "Stop dialling peers and drop their connections",
		minArgs(1, "forget needs at least one peer address"),
		func(ctx context.Context, cl *api.Client, args []string) error { return cl.Forget(ctx, args) })
	return []*cobra.Command{connect, forget}
}
