package daemon

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/overlayd/overlayd/peering/secure"
)

func TestPeerNamePersists(t *testing.T) {
	dir := t.TempDir()
	n1, created, err := loadOrCreatePeerName(dir)
	if err != nil || !created || n1 == 0 {
		t.Fatalf("%v %v %v", n1, created, err)
	}
	n2, created, err := loadOrCreatePeerName(dir)
	if err != nil || created || n2 != n1 {
		t.Fatalf("second load: %v %v %v, first %v", n2, created, err, n1)
	}
	os.WriteFile(filepath.Join(dir, peerNameFile), []byte("garbage"), 0o600)
	if _, _, err := loadOrCreatePeerName(dir); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Errorf("corrupt file: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, peerNameFile)); string(b) != "garbage" {
		t.Errorf("corrupt file overwritten with %q", b)
	}
}

func TestExposedFile(t *testing.T) {
	dir := t.TempDir()
	if ps, err := loadExposed(dir); err != nil || ps != nil {
		t.Fatalf("no file: %v %v", ps, err)
	}
	want := []netip.Prefix{netip.MustParsePrefix("172.16.16.201/24"), netip.MustParsePrefix("10.99.0.5/24")}
	b, err := encodeExposed(want)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, exposedFile), b, 0o600)
	if ps, err := loadExposed(dir); err != nil || len(ps) != 2 || ps[0] != want[0] || ps[1] != want[1] {
		t.Fatalf("read back: %v %v", ps, err)
	}
	if b, _ := encodeExposed(nil); string(b) != "[]\n" {
		t.Errorf("none: %q", b)
	}
	for _, bad := range []string{`{`, `["10.0.0.1"]`, `["fd00::1/64"]`, `[""]`, `["10.0.0.1/24", "10.0.0.1/16"]`, `[null]`, `{}`} {
		os.WriteFile(filepath.Join(dir, exposedFile), []byte(bad), 0o600)
		if _, err := loadExposed(dir); err == nil || !strings.Contains(err.Error(), "is corrupt") {
			t.Errorf("%q: %v", bad, err)
		}
	}
}

func TestIdentityPersists(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, identityFile)
	id1, created, err := loadOrCreateIdentity(dir)
	if err != nil || !created || id1.Public == (secure.Key{}) {
		t.Fatalf("%v %v %v", id1.Public, created, err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("identity file: %v, %v", fi.Mode(), err)
	}
	id2, created, err := loadOrCreateIdentity(dir)
	if err != nil || created || id2 != id1 {
		t.Fatalf("second load: %v %v", created, err)
	}
	os.Chmod(path, 0o644)
	if _, _, err := loadOrCreateIdentity(dir); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("a key others may read: %v", err)
	}
	os.WriteFile(path, []byte("garbage"), 0o600)
	os.Chmod(path, 0o600)
	if _, _, err := loadOrCreateIdentity(dir); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Errorf("corrupt file: %v", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "garbage" {
		t.Errorf("corrupt file overwritten with %q", b)
	}
}

// TestStateDirChecked: a state directory others can write to is refused
// (and left as it was), one only we can write to is taken, and a missing
// one is made with mode 0700.
func TestStateDirChecked(t *testing.T) {
	base := t.TempDir()
	for _, c := range []struct {
		mode os.FileMode
		ok   bool
	}{{0o700, true}, {0o755, true}, {0o775, false}, {0o777, false}, {0o1777, false}} {
		dir := filepath.Join(base, fmt.Sprintf("m%o", c.mode))
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, c.mode); err != nil {
			t.Fatal(err)
		}
		err := prepareStateDir(dir)
		if c.ok != (err == nil) {
			t.Errorf("mode %#o: %v", c.mode, err)
		}
		if err != nil && !strings.Contains(err.Error(), "chmod go-w") {
			t.Errorf("mode %#o: the error does not say what to do: %v", c.mode, err)
		}
		if fi, _ := os.Stat(dir); fi.Mode().Perm() != c.mode.Perm() {
			t.Errorf("mode %#o changed to %v", c.mode, fi.Mode())
		}
	}
	fresh := filepath.Join(base, "new", "state")
	if err := prepareStateDir(fresh); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(fresh); fi.Mode().Perm() != 0o700 {
		t.Errorf("a new state directory has mode %v", fi.Mode().Perm())
	}
	file := filepath.Join(base, "file")
	os.WriteFile(file, nil, 0o600)
	if err := prepareStateDir(file); err == nil {
		t.Error("a file was taken as the state directory")
	}
}
