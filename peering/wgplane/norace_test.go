//go:build !race

package wgplane

const raceEnabled = false
