// Command overlayd is the overlay router: it puts the containers of many
// hosts on one flat private network, carrying their IP packets to peer hosts
// over UDP.
//
//	sudo overlayd --range 172.16.16.0/24 --peer 10.10.10.101
//
// Exit codes: 0 after SIGTERM or SIGINT, 2 when a flag is invalid or the
// daemon cannot start (nothing is left set up), 1 when it fails while
// running.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/overlayd/overlayd/internal/buildinfo"
	"github.com/overlayd/overlayd/internal/daemon"
	"github.com/overlayd/overlayd/internal/dockerplugin"
	"github.com/overlayd/overlayd/internal/logx"
	"github.com/overlayd/overlayd/names"
	"github.com/overlayd/overlayd/peering"
	"github.com/overlayd/overlayd/proto"
)

func main() {
	os.Exit(execute(os.Args[1:]))
}

// flagAliases are Weave's flag names, accepted for ours.
var flagAliases = map[string]string{
	"ipalloc-range":          "range",
	"ipalloc-default-subnet": "default-subnet",
	"dns-listen-address":     "dns-listen",
}

func execute(args []string) int {
	var o options
	var showVersion bool
	cmd := &cobra.Command{
		Use:   "overlayd [flags] [PEER...]",
		Short: "Overlay network router: one flat private network for the containers of many hosts",
		Long: `overlayd creates a TUN device, routes the allocation range to it, and carries
the IP packets it reads to the peers that serve their destinations, over one
UDP port. Peers are given as PEER arguments or --peer, as HOST or HOST:PORT.

Weave's flag names --ipalloc-range and --ipalloc-default-subnet are accepted
for --range and --default-subnet.`,
		Example:       "  sudo overlayd --range 172.16.16.0/24 --peer 10.10.10.101",
		Args:          cobra.ArbitraryArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			if showVersion {
				fmt.Printf("overlayd %s (protocol %d..%d)\n", buildinfo.Version, proto.MinVersion, proto.MaxVersion)
				return nil
			}
			cfg, err := o.validate(args)
			if err != nil {
				return err
			}
			log := newLogger(cfg.LogLevel)
			defer log.Sync()
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			d, err := daemon.New(*cfg, log)
			if err != nil {
				return err
			}
			return d.Run(ctx)
		},
	}
	addFlags(cmd.Flags(), &o, &showVersion)
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	cmd.SetArgs(args)

	err := cmd.Execute()
	if err == nil {
		return 0
	}
	fmt.Fprintf(os.Stderr, "overlayd: %s\n", oneLine(err))
	var ue usageError
	var se *daemon.StartError
	if errors.As(err, &ue) || errors.As(err, &se) {
		return 2
	}
	return 1
}

func oneLine(err error) string {
	return strings.ReplaceAll(err.Error(), "\n", "; ")
}

// newLogger logs to stderr in a console format at level, one line per
// entry, sampled per message (internal/logx).
func newLogger(level zapcore.Level) *zap.Logger { return logx.New(os.Stderr, level) }

// addFlags defines overlayd's flags on f, into o (and showVersion).
func addFlags(f *pflag.FlagSet, o *options, showVersion *bool) {
	f.SortFlags = false
	f.StringVar(&o.rangeCIDR, "range", defaultRange, "IP allocation range shared by all peers (CIDR; \"\" turns IPAM off); alias --ipalloc-range")
	f.StringVar(&o.defaultSubnet, "default-subnet", "", "subnet of the range addresses come from by default (default: the whole range); alias --ipalloc-default-subnet")
	f.IntVar(&o.initPeerCount, "init-peer-count", 0, "number of peers that first divide the range; the quorum is a majority of them (default: the --peer targets + 1)")
	f.StringVar(&o.ipallocInit, "ipalloc-init", "", "how the range is first divided: consensus[=N] (default), seed=NAME,... or observer")
	f.StringArrayVar(&o.peers, "peer", nil, "peer to connect to, HOST[:PORT] (repeatable; positional arguments work too)")
	f.StringVar(&o.name, "name", "", "peer name, like 12:d2:fe:7a:c1:f2 (default: generated once and kept in --state-dir)")
	f.StringVar(&o.nickname, "nickname", "", "nickname shown next to the peer name (default: the host name)")
	f.IntVar(&o.port, "port", peering.DefaultPort, "UDP port for control (and data, without a password)")
	f.StringVar(&o.password, "password", "", "password every peer must share: peers are authenticated, control traffic is sealed and data goes by WireGuard (visible in ps: prefer --password-file or $"+passwordEnv+")")
	f.StringVar(&o.passwordFile, "password-file", "", "file whose first line is the password; only its owner may read it")
	f.StringVar(&o.trusted, "trusted-subnets", "", "with a password: underlay subnets, CIDR,..., whose peers may exchange data with us in clear, when they trust our address too (control traffic stays sealed)")
	f.IntVar(&o.wgPort, "wg-port", daemon.DefaultWGPort, "UDP port of the WireGuard data plane (with a password)")
	f.IntVar(&o.connLimit, "conn-limit", 200, "connections to other peers at most (0: the most there may be, 4096)")
	f.BoolVar(&o.noDiscovery, "no-discovery", false, "do not dial the peers other peers tell of (only --peer and connect)")
	f.BoolVar(&o.noDNS, "no-dns", false, "do not run the DNS server nor gossip names")
	f.StringVar(&o.dnsAllow, "dns-allow", "", "more client subnets, CIDR,..., the DNS server answers (it answers loopback, the range, this host's addresses and its bridges' subnets; 0.0.0.0/0 makes it an open resolver)")
	f.StringVar(&o.dnsListen, "dns-listen", "", "DNS server address, IP:PORT (default: the docker0 bridge's address, port 53, if it exists; else 0.0.0.0:53); alias --dns-listen-address")
	f.StringVar(&o.dnsDomain, "dns-domain", names.DefaultDomain, "domain of the container names (a trailing dot is added)")
	f.IntVar(&o.dnsTTL, "dns-ttl", 1, "TTL of DNS answers for container names, in seconds")
	f.DurationVar(&o.dnsTombstones, "dns-tombstone-lifetime", 30*time.Minute, "how long a deleted name is remembered, so that an old copy of it elsewhere cannot bring it back; the names store grows with the names deleted in that time (Weave: 30m)")
	f.IntVar(&o.dnsRateLimit, "dns-rate-limit", 1000, "DNS answers over UDP a second to one client address (twice that at once); beyond it, every second query gets an empty truncated answer (the client retries over TCP, not limited) and the others none; 0: no limit")
	f.StringVar(&o.resolvConf, "resolv-conf", "/etc/resolv.conf", "file listing the upstream DNS servers for other names (read again when it changes)")
	f.DurationVar(&o.releaseGrace, "release-grace", 30*time.Second, "how long the addresses and names of an attached container that went away stay reserved for it")
	f.BoolVar(&o.dockerPlugin, "docker-plugin", false, "serve Docker's network and IPAM drivers (--docker-plugin-name) and create the network --docker-network")
	f.StringVar(&o.pluginName, "docker-plugin-name", "weavemesh", "name of the Docker network and IPAM drivers: the socket is DIR/NAME.sock")
	f.StringVar(&o.pluginDir, "docker-plugin-dir", dockerplugin.Dir, "directory where Docker finds plugin sockets")
	f.StringVar(&o.dockerNetwork, "docker-network", "weave", "Docker network created at start with --docker-plugin (\"\": none)")
	f.StringVar(&o.dockerAPI, "docker-api", dockerAPIDefault(), "Docker engine API, for container targets, names and liveness (\"\": none; default $DOCKER_HOST)")
	f.BoolVar(&o.noFirewall, "no-firewall", false, "do not add the iptables FORWARD rules that let containers' traffic through (Docker sets FORWARD to DROP)")
	f.StringVar(&o.iface, "iface", defaultIface, "name of the TUN device to create")
	f.IntVar(&o.mtu, "mtu", 0, "MTU of the TUN device (default: smallest underlay MTU minus 44 bytes of overhead)")
	f.StringVar(&o.socket, "socket", socketDefault(), "control API unix socket (also $OVERLAY_SOCKET)")
	f.StringVar(&o.stateDir, "state-dir", defaultStateDir, "directory for state kept across restarts")
	f.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	f.StringVar(&o.metricsAddr, "metrics-addr", "", "serve Prometheus metrics on HOST:PORT at /metrics (default: off)")
	f.BoolVar(showVersion, "version", false, "print the version and exit")
	f.SetNormalizeFunc(func(_ *pflag.FlagSet, name string) pflag.NormalizedName {
		if to, ok := flagAliases[name]; ok {
			name = to
		}
		return pflag.NormalizedName(name)
	})
}
