package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/overlayd/overlayd/internal/api"
)

// Daemon is one overlayd process running in a host.
type Daemon struct {
	Host     *Host
	Socket   string
	StateDir string
	LogPath  string
	Args     []string

	cmd     *exec.Cmd
	done    chan struct{}
	waitErr error
	mu      sync.Mutex
}

// StateDir is the state directory the host's daemons use unless a test
// passes its own --state-dir: it survives restarts within the lab.
func (h *Host) StateDir() string {
	return filepath.Join(h.lab.dir, fmt.Sprintf("h%d-state", h.Index))
}

// Socket is the control socket of the host's daemon.
func (h *Host) Socket() string {
	return filepath.Join(h.lab.dir, fmt.Sprintf("h%d.sock", h.Index))
}

// Start runs overlayd in the host with args plus the lab's socket, state
// directory, nickname, an empty resolv.conf and debug logging (each unless
// args set it), and
// waits until its control socket answers. The test fails if it does not
// come up within 10 s; the process is killed at cleanup.
func (h *Host) Start(args ...string) *Daemon {
	h.lab.t.Helper()
	d := h.Spawn(args...)
	if err := d.WaitReady(10 * time.Second); err != nil {
		h.lab.t.Fatalf("overlayd in %s did not start: %v\n%s", h.NS, err, d.Log())
	}
	return d
}

// Spawn starts overlayd like Start but does not wait for it.
func (h *Host) Spawn(args ...string) *Daemon {
	l := h.lab
	l.t.Helper()
	d := &Daemon{Host: h, Socket: h.Socket(), StateDir: h.StateDir(), done: make(chan struct{})}
	has := func(flag string) bool {
		for _, a := range args {
			if a == flag || strings.HasPrefix(a, flag+"=") {
				return true
			}
		}
		return false
	}
	full := append([]string(nil), args...)
	if !has("--socket") {
		full = append(full, "--socket", d.Socket)
	}
	if !has("--state-dir") {
		full = append(full, "--state-dir", d.StateDir)
	}
	if !has("--nickname") {
		full = append(full, "--nickname", fmt.Sprintf("h%d", h.Index))
	}
	if !has("--resolv-conf") {
		// Queries the overlay does not answer go nowhere, unless a test
		// says where: never out of the lab.
		none := filepath.Join(l.dir, "resolv-none.conf")
		if err := os.WriteFile(none, nil, 0o644); err != nil {
			l.t.Fatal(err)
		}
		full = append(full, "--resolv-conf", none)
	}
	if !has("--log-level") {
		full = append(full, "--log-level", "debug")
	}
	d.Args = full
	for i := 0; ; i++ {
		d.LogPath = filepath.Join(l.dir, fmt.Sprintf("h%d-%d.log", h.Index, i))
		if _, err := os.Stat(d.LogPath); errors.Is(err, os.ErrNotExist) {
			break
		}
	}
	logf, err := os.Create(d.LogPath)
	if err != nil {
		l.t.Fatal(err)
	}
	d.cmd = exec.Command("ip", append([]string{"netns", "exec", h.NS, l.Bin.Overlayd}, full...)...)
	d.cmd.Env = append(os.Environ(), h.Env...)
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	if err := d.cmd.Start(); err != nil {
		logf.Close()
		l.t.Fatalf("starting overlayd: %v", err)
	}
	go func() {
		d.waitErr = d.cmd.Wait()
		logf.Close()
		close(d.done)
	}()
	l.t.Cleanup(func() {
		if aliasNS(h.NS) {
			// On the machine itself: a clean stop takes the
			// daemon's firewall rules and plugin socket with it.
			d.Stop(5 * time.Second)
		}
		d.Kill()
		if l.t.Failed() {
			l.t.Logf("---- overlayd log of %s (%s)\n%s", h.NS, strings.Join(full, " "), d.Log())
		}
	})
	return d
}

// WaitReady waits until the daemon answers on its control socket.
func (d *Daemon) WaitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		select {
		case <-d.done:
			return fmt.Errorf("overlayd exited: %v", d.waitErr)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := api.NewClient(d.Socket).Version(ctx)
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Log is everything the daemon has logged so far.
func (d *Daemon) Log() string {
	b, _ := os.ReadFile(d.LogPath)
	return string(b)
}

// Running reports whether the process is still alive.
func (d *Daemon) Running() bool {
	select {
	case <-d.done:
		return false
	default:
		return true
	}
}

// Signal sends sig to the overlayd process (the child of ip netns exec,
// which execs it, so the pid is overlayd's).
func (d *Daemon) Signal(sig syscall.Signal) error {
	return d.cmd.Process.Signal(sig)
}

// Stop sends SIGTERM and waits up to timeout for the exit; it returns the
// exit code and how long the exit took.
func (d *Daemon) Stop(timeout time.Duration) (code int, took time.Duration, err error) {
	start := time.Now()
	if err := d.Signal(syscall.SIGTERM); err != nil && d.Running() {
		return -1, 0, err
	}
	select {
	case <-d.done:
	case <-time.After(timeout):
		return -1, time.Since(start), fmt.Errorf("overlayd did not exit within %v of SIGTERM", timeout)
	}
	return d.cmd.ProcessState.ExitCode(), time.Since(start), nil
}

// Wait waits for the process to exit on its own and returns its exit code.
func (d *Daemon) Wait(timeout time.Duration) (int, error) {
	select {
	case <-d.done:
		return d.cmd.ProcessState.ExitCode(), nil
	case <-time.After(timeout):
		return -1, fmt.Errorf("overlayd still running after %v", timeout)
	}
}

// Kill SIGKILLs the process (if running) and waits for it.
func (d *Daemon) Kill() {
	if d.Running() {
		d.cmd.Process.Kill()
		<-d.done
	}
}

// Ctl runs overlayctl against this daemon's socket, in its namespace.
func (d *Daemon) Ctl(args ...string) (stdout, stderr string, code int) {
	return d.Host.Ctl(append([]string{"--socket", d.Socket}, args...)...)
}

// MustCtl runs overlayctl and fails the test unless it succeeds.
func (d *Daemon) MustCtl(args ...string) string {
	d.Host.lab.t.Helper()
	out, errOut, code := d.Ctl(args...)
	if code != 0 {
		d.Host.lab.t.Fatalf("overlayctl %s: exit %d: %s", strings.Join(args, " "), code, errOut)
	}
	return out
}

// Status is `overlayctl status --json`, decoded.
func (d *Daemon) Status() (api.Status, error) {
	out, errOut, code := d.Ctl("status", "--json")
	var st api.Status
	if code != 0 {
		return st, fmt.Errorf("overlayctl status: exit %d: %s", code, errOut)
	}
	err := json.Unmarshal([]byte(out), &st)
	return st, err
}

// Ctl runs overlayctl with args in the host's namespace.
func (h *Host) Ctl(args ...string) (stdout, stderr string, code int) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.NS, h.lab.Bin.Overlayctl}, args...)...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	code = 0
	if err != nil {
		code = -1
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		}
	}
	return o.String(), e.String(), code
}

// Pid is the overlayd process's ID (ip netns exec execs it).
func (d *Daemon) Pid() int { return d.cmd.Process.Pid }
