package daemon

import (
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/overlayd/overlayd/internal/atomicfile"
	"github.com/overlayd/overlayd/peering/secure"
	"github.com/overlayd/overlayd/proto"
)

// peerNameFile holds the peer name, so that it survives restarts.
const peerNameFile = "peer-name"

// prepareStateDir creates dir (mode 0700) if needed and checks that it is a
// writable directory that only we can write: owned by this process's user,
// and writable by neither its group nor others (who could otherwise plant
// or replace the state the daemon trusts).
func prepareStateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("state directory %s: %w", dir, err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("state directory %s: %w", dir, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("state directory %s is not a directory", dir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("state directory %s belongs to user %d, not to this process's user %d: chown it or choose another --state-dir", dir, st.Uid, os.Geteuid())
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("state directory %s has mode %#o: others can write to it; chmod go-w %s (0700 is what overlayd creates)", dir, fi.Mode().Perm(), dir)
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
	ps, err := ParseExposed(b)
	if err != nil {
		return nil, fmt.Errorf("%s is corrupt: %v: restore it, or remove it to expose no address at start", path, err)
	}
	return ps, nil
}

// ParseExposed decodes exposed.json: a JSON list of IPv4 addresses with
// their prefix length, at most proto.MaxPrefixes, each once.
func ParseExposed(b []byte) ([]netip.Prefix, error) {
	var ps []netip.Prefix
	if err := json.Unmarshal(b, &ps); err != nil {
		return nil, err
	}
	if len(ps) > proto.MaxPrefixes {
		return nil, fmt.Errorf("%d addresses, more than the %d a peer may announce", len(ps), proto.MaxPrefixes)
	}
	for i, p := range ps {
		if !p.IsValid() || !p.Addr().Is4() {
			return nil, fmt.Errorf("%v is not an IPv4 CIDR", p)
		}
		if slices.ContainsFunc(ps[:i], func(q netip.Prefix) bool { return q.Addr() == p.Addr() }) {
			return nil, fmt.Errorf("%v is there twice", p.Addr())
		}
	}
	return ps, nil
}

// encodeExposed is ParseExposed's inverse.
func encodeExposed(ps []netip.Prefix) ([]byte, error) {
	if ps == nil {
		ps = []netip.Prefix{}
	}
	b, err := json.Marshal(ps)
	return append(b, '\n'), err
}

// identityFile holds the peer's long-term key pair (its private key, in
// WireGuard's text form), so that it survives restarts.
const identityFile = "identity.key"

// signingKeyFile holds the Ed25519 key that signs our topology entries in
// password mode (its seed, in base64).
const signingKeyFile = "signing.key"

// loadOrCreateIdentity returns the key pair stored in dir, or makes one and
// stores it with mode 0600. A stored key that does not parse, or that
// others may read, is an error, never silently replaced or used.
func loadOrCreateIdentity(dir string) (secure.Identity, bool, error) {
	return loadOrCreateSecret(filepath.Join(dir, identityFile), secure.ParseIdentity, func() (secure.Identity, []byte, error) {
		id, err := secure.NewIdentity(rand.Reader)
		return id, id.MarshalText(), err
	})
}

// loadOrCreateSigningKey returns the Ed25519 key that signs our gossip in
// password mode, kept in the state directory like the identity key.
func loadOrCreateSigningKey(dir string) (secure.SigningKey, bool, error) {
	return loadOrCreateSecret(filepath.Join(dir, signingKeyFile), secure.ParseSigningKey, func() (secure.SigningKey, []byte, error) {
		k, err := secure.NewSigningKey(rand.Reader)
		return k, k.MarshalText(), err
	})
}

// loadOrCreateSecret reads the key at path, which only its owner may read,
// or makes one and saves it (mode 0600); created says which.
func loadOrCreateSecret[K any](path string, parse func([]byte) (K, error), create func() (K, []byte, error)) (k K, created bool, err error) {
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		if err := checkPrivate(path); err != nil {
			return k, false, err
		}
		k, err := parse(b)
		if err != nil {
			return k, false, fmt.Errorf("state file %s is corrupt (%v): restore it, or remove it to make a new key (peers then see a new key for this name)", path, err)
		}
		return k, false, nil
	case !errors.Is(err, os.ErrNotExist):
		return k, false, fmt.Errorf("reading %s: %w", path, err)
	}
	k, text, err := create()
	if err != nil {
		return k, false, err
	}
	// atomicfile writes through os.CreateTemp: mode 0600.
	if err := atomicfile.Write(path, text); err != nil {
		return k, false, err
	}
	return k, true, nil
}

// checkPrivate refuses a secret file that its group or others may read.
func checkPrivate(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if m := fi.Mode().Perm(); m&0o077 != 0 {
		return fmt.Errorf("%s is readable by group or others (mode %04o): it holds a secret; chmod 600 %s", path, m, path)
	}
	return nil
}

// ReadPasswordFile returns the first line of path, which only its owner may
// read.
func ReadPasswordFile(path string) ([]byte, error) {
	if err := checkPrivate(path); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	line = strings.TrimSuffix(line, "\r")
	if line == "" {
		return nil, fmt.Errorf("%s: the first line, the password, is empty", path)
	}
	return []byte(line), nil
}
