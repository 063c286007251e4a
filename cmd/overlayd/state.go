package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/atomicfile"
	"github.com/overlayd/overlayd/proto"
)

// peerNameFile holds the peer name, so that it survives restarts.
const peerNameFile = "peer-name"

// prepareStateDir creates dir (mode 0700) if needed and checks that it is a
// writable directory.
func prepareStateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("state directory %s: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, ".probe-*")
	if err != nil {
		return fmt.Errorf("state directory %s is not writable: %w", dir, err)
	}
	name := f.Name()
	f.Close()
	os.Remove(name)
	if _, err := os.ReadDir(dir); err != nil {
		return fmt.Errorf("state directory %s is not readable: %w", dir, err)
	}
	return nil
}

// loadOrCreatePeerName returns the name stored in dir, or makes a random one
// and stores it. A stored name that does not parse is an error, never
// silently replaced.
func loadOrCreatePeerName(dir string) (proto.PeerName, bool, error) {
	path := filepath.Join(dir, peerNameFile)
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		n, err := proto.ParsePeerName(strings.TrimSpace(string(b)))
		if err != nil {
			return 0, false, fmt.Errorf("state file %s is corrupt (%v): fix it, or remove it to get a new peer name", path, err)
		}
		return n, false, nil
	case !errors.Is(err, os.ErrNotExist):
		return 0, false, fmt.Errorf("reading %s: %w", path, err)
	}
	var raw [6]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return 0, false, err
	}
	n := proto.PeerNameFromBytes(raw)
	if err := atomicfile.Write(path, []byte(n.String()+"\n")); err != nil {
		return 0, false, err
	}
	return n, true, nil
}

// exposedFile keeps the exposed addresses across restarts: the TUN device
// and its addresses go with the process, the addresses' IPAM allocations
// and the containers' resolv.conf pointing at them do not.
const exposedFile = "exposed.json"

// loadExposed reads the addresses exposed before a restart.
func loadExposed(dir string) ([]netip.Prefix, error) {
	path := filepath.Join(dir, exposedFile)
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil, nil
	case err != nil:
		return nil, err
	}
	var ps []netip.Prefix
	if err := json.Unmarshal(b, &ps); err != nil {
		return nil, fmt.Errorf("%s is corrupt: %v: restore it, or remove it to expose no address at start", path, err)
	}
	for _, p := range ps {
		if !p.IsValid() || !p.Addr().Is4() {
			return nil, fmt.Errorf("%s is corrupt: %v is not an IPv4 CIDR: restore it, or remove it to expose no address at start", path, p)
		}
	}
	return ps, nil
}

// saveExposedLocked writes the exposed addresses, with those not yet
// exposed again since the restart. d.mu must be held.
func (d *daemon) saveExposedLocked() error {
	ps := append(slices.Clone(d.exposed), d.restoring...)
	if ps == nil {
		ps = []netip.Prefix{}
	}
	b, err := json.Marshal(ps)
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(d.cfg.StateDir, exposedFile), append(b, '\n'))
}

// restoreExposed exposes again the addresses exposed before a restart,
// one at a time: an address of the range is claimed again (at once if
// the saved ring says it is still ours; after consensus or a donation
// otherwise). One that cannot be (IPAM gave it to another meanwhile) is
// dropped, loudly.
func (d *daemon) restoreExposed(ctx context.Context) {
	d.mu.Lock()
	todo := slices.Clone(d.restoring)
	d.mu.Unlock()
	for _, p := range todo {
		d.mu.Lock()
		pending := slices.Contains(d.restoring, p)
		d.mu.Unlock()
		if !pending {
			continue // hidden meanwhile
		}
		if _, err := d.Expose(ctx, p); err != nil {
			if ctx.Err() != nil {
				return
			}
			d.log.Error("could not expose again an address exposed before the restart", zap.Stringer("addr", p), zap.Error(err))
			d.mu.Lock()
			d.restoring = slices.DeleteFunc(d.restoring, func(r netip.Prefix) bool { return r == p })
			if err := d.saveExposedLocked(); err != nil {
				d.log.Warn("saving the exposed addresses", zap.Error(err))
			}
			d.mu.Unlock()
			continue
		}
		d.log.Info("exposed again after the restart", zap.Stringer("addr", p))
	}
}
