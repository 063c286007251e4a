package lab

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// RequireDocker fails (CI=true) or skips the test unless the machine's
// Docker engine answers and Debian's busybox-static is installed (the
// image's only program).
func RequireDocker(t testing.TB) {
	t.Helper()
	Require(t)
	var missing []string
	if out, err := exec.Command("docker", "info", "--format", "{{.ServerVersion}}").CombinedOutput(); err != nil {
		missing = append(missing, fmt.Sprintf("a running Docker engine (docker info: %v: %s)", err, strings.TrimSpace(string(out))))
	}
	if _, err := os.Stat(busybox); err != nil {
		missing = append(missing, busybox+" (Debian's busybox-static)")
	}
	if len(missing) == 0 {
		return
	}
	msg := "Docker tests need " + strings.Join(missing, " and ")
	if os.Getenv("CI") == "true" {
		t.Fatal(msg + " (CI=true: failing instead of skipping)")
	}
	t.Skip(msg)
}

// busybox is busybox-static's binary: one static program, the whole image.
const busybox = "/bin/busybox"

// BusyboxImage builds a Docker image holding only busybox and its
// applets (docker import of a root file system made here: there is no
// registry to pull from), tagged for this lab; it is removed with the
// lab.
func (l *Lab) BusyboxImage() string {
	l.t.Helper()
	root := filepath.Join(l.dir, "rootfs")
	for _, d := range []string{"bin", "etc", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			l.t.Fatal(err)
		}
	}
	b, err := os.ReadFile(busybox)
	if err != nil {
		l.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin/busybox"), b, 0o755); err != nil {
		l.t.Fatal(err)
	}
	for _, a := range []string{"sh", "ping", "ip", "nc", "sleep", "cat", "nslookup", "sha256sum", "head", "wc", "hostname", "ls"} {
		if err := os.Symlink("busybox", filepath.Join(root, "bin", a)); err != nil {
			l.t.Fatal(err)
		}
	}
	tag := "overlayd-test/busybox:" + strings.TrimPrefix(l.id, namePrefix)
	tar := exec.Command("tar", "-C", root, "-c", ".")
	imp := exec.Command("docker", "import", "-", tag)
	var err2 error
	if imp.Stdin, err2 = tar.StdoutPipe(); err2 != nil {
		l.t.Fatal(err2)
	}
	if err := tar.Start(); err != nil {
		l.t.Fatal(err)
	}
	if out, err := imp.CombinedOutput(); err != nil {
		l.t.Fatalf("docker import: %v: %s", err, out)
	}
	if err := tar.Wait(); err != nil {
		l.t.Fatalf("tar of the image's root: %v", err)
	}
	l.t.Cleanup(func() { exec.Command("docker", "rmi", "-f", tag).Run() })
	return tag
}

// Docker runs the docker command and returns its output (trimmed), or
// fails the test.
func (l *Lab) Docker(args ...string) string {
	l.t.Helper()
	out, err := l.TryDocker(args...)
	if err != nil {
		l.t.Fatalf("docker %s: %v", strings.Join(args, " "), err)
	}
	return out
}

// TryDocker runs the docker command; the error carries its output.
func (l *Lab) TryDocker(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "docker", args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%v: %s", err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)), nil
}

// Name is a name unique to this lab, for Docker containers and networks:
// prefix-ovtPID-K.
func (l *Lab) Name(prefix string) string { return prefix + "-" + l.id }

// RunContainer starts a Docker container that is removed with the lab.
func (l *Lab) RunContainer(args ...string) string {
	l.t.Helper()
	id := l.Docker(append([]string{"run", "-d"}, args...)...)
	l.t.Cleanup(func() { exec.Command("docker", "rm", "-f", id).Run() })
	return id
}
