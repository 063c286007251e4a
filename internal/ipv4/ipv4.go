// Package ipv4 converts IPv4 addresses to and from their 32-bit values, the
// form in which the allocation ring and the route table do arithmetic.
//
// The package is pure: no I/O, clocks or globals.
package ipv4

import "net/netip"

// Value is a's 32-bit value; a must be IPv4.
func Value(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

// Addr is the IPv4 address of value v.
func Addr(v uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// Bounds returns the value of p's first address and the end of p
// (exclusive: one past its last address, which may be 1<<32).
func Bounds(p netip.Prefix) (first uint32, end uint64) {
	first = Value(p.Masked().Addr())
	return first, uint64(first) + 1<<(32-p.Bits())
}

// Last is the highest address of p (its broadcast address).
func Last(p netip.Prefix) netip.Addr {
	_, end := Bounds(p)
	return Addr(uint32(end - 1))
}
