package atomicfile

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestWriteMode: the file has exactly the mode asked for, whatever the
// umask, and replaces the old content whole; Write's files are 0600.
func TestWriteMode(t *testing.T) {
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	for _, c := range []struct {
		write func() error
		mode  os.FileMode
		body  string
	}{
		{func() error { return Write(p, []byte("one")) }, 0o600, "one"},
		{func() error { return WriteMode(p, []byte("two"), 0o644) }, 0o644, "two"},
	} {
		if err := c.write(); err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(p); fi.Mode().Perm() != c.mode || string(b) != c.body {
			t.Errorf("mode %v and %q, want %v and %q", fi.Mode().Perm(), b, c.mode, c.body)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".*")); len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}
}
