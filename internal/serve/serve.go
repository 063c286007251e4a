// Package serve runs an HTTP server until its context ends, then shuts it
// down quickly: the daemon must exit within 2 s of SIGTERM.
package serve

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"time"
)

// ShutdownGrace is how long requests in flight may take to finish once the
// context ends; then every connection is closed.
const ShutdownGrace = 300 * time.Millisecond

// Run serves srv on ln until ctx ends. Requests see ctx through their own
// contexts, so handlers waiting on the daemon give up at shutdown.
func Run(ctx context.Context, srv *http.Server, ln net.Listener) error {
	srv.BaseContext = func(net.Listener) context.Context { return ctx }
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	var err error
	select {
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), ShutdownGrace)
		defer cancel()
		if srv.Shutdown(sctx) != nil {
			srv.Close()
		}
		err = <-errc
	case err = <-errc:
	}
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// ErrSocketInUse says another process answers on a socket's path.
var ErrSocketInUse = errors.New("in use by a live process")

// ClaimSocket makes path free for a new Unix socket. Nothing there is
// fine; a socket that answers is ErrSocketInUse; a socket that does not (a
// process that died left it) is removed. Anything else at path, a file, a
// directory or a symbolic link, is refused and left alone: a mistyped
// --socket must not delete a file.
func ClaimSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket (%s): refusing to replace it", path, fi.Mode().Type())
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("%s: %w", path, ErrSocketInUse)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("removing the stale socket %s: %w", path, err)
	}
	return nil
}

// RemoveSocket removes path if it is a socket (a file put there since is
// left alone).
func RemoveSocket(path string) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode().Type() == fs.ModeSocket {
		os.Remove(path)
	}
}
