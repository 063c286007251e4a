// Package fuzz holds a fuzz target for every decoder of untrusted input:
// datagrams from the network, names and addresses from the command line and
// the control API, and state files. `go test ./fuzz` replays the seed
// corpora; `go test ./fuzz -fuzz FuzzProtoHello` (one target at a time)
// explores further.
//
// Every target checks more than "no panic": what a decoder accepts must
// survive a round trip through its encoder.
package fuzz
