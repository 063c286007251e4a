package main

import (
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

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
	if err := writeFileAtomic(path, []byte(n.String()+"\n")); err != nil {
		return 0, false, err
	}
	return n, true, nil
}

// writeFileAtomic writes data to path through a synced temporary file and a
// rename, so that a crash leaves either the old or the new content.
func writeFileAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
