// Package buildinfo holds the version both binaries report.
package buildinfo

// Version is overlayd's release version; `make build` may override it with
// -ldflags "-X github.com/overlayd/overlayd/internal/buildinfo.Version=...".
var Version = "0.1.0-dev"
