// Package wgplane is overlayd's encrypted data plane in password mode: a
// WireGuard device (wireguard-go, embedded) reading and writing the TUN
// device, with its own UDP port, whose peers and allowed IPs the router
// programs from its table (peering.DataPlane). Its private key is the
// peer's identity key, so the key a peer proved in the control handshake is
// the key its data is encrypted to; every peer also carries a preshared key
// derived from the password.
//
// The device answers WireGuard's configuration protocol on
// /var/run/wireguard/IFACE.sock, so `wg show IFACE` works. That directory
// is shared by every network namespace of the machine: Open refuses an
// interface name whose socket another live process holds.
package wgplane

import (
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/overlayd/overlayd/peering"
	"github.com/overlayd/overlayd/peering/secure"
)

// DefaultPort is the data plane's UDP port when none is given (Weave's
// data port).
const DefaultPort = 6784

// Overhead is what WireGuard adds to each packet on an IPv6 underlay (40 IP,
// 8 UDP, 32 WireGuard); the TUN device's MTU is the underlay's minus this,
// as wg-quick sets it.
const Overhead = 80

// Config configures a Plane.
type Config struct {
	Iface    string // the TUN device's name; names the configuration socket
	Port     uint16
	Identity secure.Identity
	PSK      [32]byte // every peer's preshared key
	Log      *zap.Logger
}

// A Plane is a running WireGuard device. Make one with Open; Close stops it
// and closes the TUN device.
type Plane struct {
	cfg  Config
	dev  *device.Device
	uapi net.Listener
	done chan struct{} // closed when the socket's accept loop ends

	mu    sync.Mutex
	peers map[secure.Key]peering.DataPeer // what the device holds, by key; guarded by mu
	// dirty says a Program failed part way: the device's peers are not
	// known, and the next Program replaces them all. Guarded by mu.
	dirty bool
}

var _ peering.DataPlane = (*Plane)(nil)

// ErrSocketInUse refuses an interface name whose configuration socket a
// live process holds.
var ErrSocketInUse = errors.New("wgplane: socket in use")

// SocketPath is where the configuration socket of iface lives.
func SocketPath(iface string) string { return "/var/run/wireguard/" + iface + ".sock" }

// Open takes the configuration socket, then starts a WireGuard device on
// tdev listening on cfg.Port. On failure nothing is left open but tdev,
// which the caller still owns; on success the Plane owns it.
func Open(cfg Config, tdev tun.Device) (*Plane, error) {
	f, err := ipc.UAPIOpen(cfg.Iface)
	if err != nil {
		if err.Error() == "unix socket in use" {
			return nil, fmt.Errorf("%w: %s belongs to another WireGuard device on this machine (the directory is shared by every network namespace): give each encrypted overlayd its own --iface", ErrSocketInUse, SocketPath(cfg.Iface))
		}
		return nil, fmt.Errorf("wgplane: opening %s: %w", SocketPath(cfg.Iface), err)
	}
	uapi, err := ipc.UAPIListen(cfg.Iface, f)
	f.Close() // the listener holds its own descriptor
	if err != nil {
		os.Remove(SocketPath(cfg.Iface))
		return nil, fmt.Errorf("wgplane: listening on %s: %w", SocketPath(cfg.Iface), err)
	}
	log := cfg.Log.WithOptions(zap.AddCallerSkip(1)).Sugar()
	dev := device.NewDevice(tdev, newBind(), &device.Logger{
		Verbosef: func(format string, args ...any) { log.Debugf("wireguard: "+format, args...) },
		Errorf:   func(format string, args ...any) { log.Warnf("wireguard: "+format, args...) },
	})
	p := &Plane{cfg: cfg, dev: dev, uapi: uapi, done: make(chan struct{}), peers: map[secure.Key]peering.DataPeer{}}
	conf := fmt.Sprintf("private_key=%s\nlisten_port=%d\n", hex.EncodeToString(cfg.Identity.Private[:]), cfg.Port)
	if err = dev.IpcSet(conf); err == nil {
		err = dev.Up()
	}
	if err != nil {
		uapi.Close()
		// The device closes tdev too; the caller's Close of it then
		// fails harmlessly.
		dev.Close()
		return nil, fmt.Errorf("wgplane: starting WireGuard on UDP port %d: %w (choose another with --wg-port)", cfg.Port, err)
	}
	go p.serve()
	return p, nil
}

// serve answers `wg` on the configuration socket until it is closed.
func (p *Plane) serve() {
	defer close(p.done)
	for {
		c, err := p.uapi.Accept()
		if err != nil {
			return
		}
		go p.dev.IpcHandle(c)
	}
}

// Program makes the device's peers those given: peers gone are removed,
// new or changed ones set, the others left alone (their sessions live on).
func (p *Plane) Program(peers []peering.DataPeer) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	var b strings.Builder
	want := make(map[secure.Key]peering.DataPeer, len(peers))
	for _, dp := range peers {
		want[dp.Key] = dp
	}
	if p.dirty {
		b.WriteString("replace_peers=true\n")
		clear(p.peers)
	}
	for k := range p.peers {
		if _, ok := want[k]; !ok {
			fmt.Fprintf(&b, "public_key=%s\nremove=true\n", hex.EncodeToString(k[:]))
		}
	}
	for _, dp := range peers {
		if old, ok := p.peers[dp.Key]; ok && old.Endpoint == dp.Endpoint && slices.Equal(old.Prefixes, dp.Prefixes) {
			continue
		}
		fmt.Fprintf(&b, "public_key=%s\npreshared_key=%s\nendpoint=%s\nreplace_allowed_ips=true\n",
			hex.EncodeToString(dp.Key[:]), hex.EncodeToString(p.cfg.PSK[:]), dp.Endpoint)
		for _, pfx := range dp.Prefixes {
			fmt.Fprintf(&b, "allowed_ip=%s\n", pfx)
		}
	}
	if b.Len() == 0 {
		return nil
	}
	if err := p.dev.IpcSet(b.String()); err != nil {
		p.dirty = true
		return fmt.Errorf("wgplane: %w", err)
	}
	p.peers, p.dirty = want, false
	return nil
}

// Close stops the device, closes the TUN device and removes the socket.
func (p *Plane) Close() {
	p.uapi.Close()
	<-p.done
	p.dev.Close()
}

// PeerStats is what the device reports of one peer.
type PeerStats struct {
	Key              secure.Key
	LastHandshake    time.Time // zero: none yet
	RxBytes, TxBytes uint64
}

// Stats reads the device's peers, in no particular order.
func (p *Plane) Stats() ([]PeerStats, error) {
	conf, err := p.dev.IpcGet()
	if err != nil {
		return nil, fmt.Errorf("wgplane: %w", err)
	}
	return parseStats(conf)
}

// parseStats reads the peers' counters out of a UAPI "get" answer.
func parseStats(conf string) ([]PeerStats, error) {
	var out []PeerStats
	var sec int64
	for line := range strings.Lines(conf) {
		k, v, ok := strings.Cut(strings.TrimSpace(line), "=")
		if !ok {
			continue
		}
		if k == "public_key" {
			raw, err := hex.DecodeString(v)
			if err != nil || len(raw) != len(secure.Key{}) {
				return nil, fmt.Errorf("wgplane: bad public_key %q from the device", v)
			}
			out = append(out, PeerStats{Key: secure.Key(raw)})
			continue
		}
		if len(out) == 0 {
			continue // a device line
		}
		ps := &out[len(out)-1]
		n, err := strconv.ParseUint(v, 10, 64)
		switch k {
		case "rx_bytes":
			ps.RxBytes = n
		case "tx_bytes":
			ps.TxBytes = n
		case "last_handshake_time_sec":
			sec = int64(n)
		case "last_handshake_time_nsec":
			if sec != 0 {
				ps.LastHandshake = time.Unix(sec, int64(n))
			}
			sec = 0
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("wgplane: bad %s %q from the device", k, v)
		}
	}
	return out, nil
}
