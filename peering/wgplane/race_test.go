//go:build race

package wgplane

// raceEnabled: the race detector drops a quarter of what goes back into a
// sync.Pool, so pooled buffers are allocated again under it.
const raceEnabled = true
