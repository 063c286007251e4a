package serve

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestClaimSocket: a free path, a stale socket (removed), a live one
// (refused), and a file, a directory and a symbolic link (refused, left
// alone); RemoveSocket removes only a socket.
func TestClaimSocket(t *testing.T) {
	dir := t.TempDir()
	if err := ClaimSocket(filepath.Join(dir, "free.sock")); err != nil {
		t.Errorf("a free path: %v", err)
	}

	live := filepath.Join(dir, "live.sock")
	ln, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	if err := ClaimSocket(live); !errors.Is(err, ErrSocketInUse) {
		t.Errorf("a live socket: %v", err)
	}
	// A listener that is gone leaves its socket file behind when told not
	// to unlink it: that is a stale socket.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if err := ClaimSocket(live); err != nil {
		t.Errorf("a stale socket: %v", err)
	}
	if _, err := os.Lstat(live); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the stale socket is still there: %v", err)
	}

	file := filepath.Join(dir, "file")
	os.WriteFile(file, []byte("keep me"), 0o600)
	sub := filepath.Join(dir, "sub")
	os.Mkdir(sub, 0o700)
	link := filepath.Join(dir, "link")
	os.Symlink(file, link)
	for _, p := range []string{file, sub, link} {
		if err := ClaimSocket(p); err == nil || !strings.Contains(err.Error(), "not a socket") {
			t.Errorf("%s: %v", p, err)
		}
		RemoveSocket(p)
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("%s was removed: %v", p, err)
		}
	}
	if b, _ := os.ReadFile(file); string(b) != "keep me" {
		t.Errorf("the file now holds %q", b)
	}

	ln, err = net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	RemoveSocket(live)
	if _, err := os.Lstat(live); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("RemoveSocket left the socket: %v", err)
	}
}
