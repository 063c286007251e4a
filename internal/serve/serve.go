// Package serve runs an HTTP server until its context ends, then shuts it
// down quickly: the daemon must exit within 2 s of SIGTERM.
package serve

import (
	"context"
	"errors"
	"net"
	"net/http"
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
