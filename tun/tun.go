// Package tun opens overlayd's TUN device: a Linux TUN with virtio-net
// offloads (TSO/GSO on read, GRO on write), read and written in batches
// through wireguard-go's tun package.
package tun

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

// Device is a TUN device with batched I/O: Read(bufs, sizes, offset) and
// Write(bufs, offset) move up to BatchSize() packets per call, each packet
// starting offset bytes into its buffer. Write needs offset to be at least
// VirtioHeaderLen: it writes the offload header in front of each packet.
type Device = wgtun.Device

// VirtioHeaderLen is the headroom Write needs in front of each packet.
const VirtioHeaderLen = 10

// MaxNameLen is the longest interface name Linux accepts (IFNAMSIZ - 1).
const MaxNameLen = unix.IFNAMSIZ - 1

// CloneDevice is the path of the TUN clone device.
const CloneDevice = "/dev/net/tun"

// Check reports whether a TUN device can be created here: the clone device
// exists and opens for writing (which needs root or CAP_NET_ADMIN later on).
func Check() error {
	f, err := os.OpenFile(CloneDevice, os.O_RDWR, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("tun: %s does not exist: load the tun module (modprobe tun)", CloneDevice)
		}
		return fmt.Errorf("tun: cannot open %s: %w (overlayd needs root or CAP_NET_ADMIN)", CloneDevice, err)
	}
	return f.Close()
}

// Create makes (or takes over) the TUN device name with the given MTU; its
// reads go on past the first packet while more wait (see readOn). The
// device is created down; the caller brings it up with its addresses. The
// caller must drain Events() until it is closed and Close the device.
func Create(name string, mtu int) (Device, error) {
	if name == "" || len(name) > MaxNameLen {
		return nil, fmt.Errorf("tun: interface name %q must be 1 to %d bytes", name, MaxNameLen)
	}
	dev, err := wgtun.CreateTUN(name, mtu)
	if err != nil {
		return nil, fmt.Errorf("tun: creating %s: %w", name, err)
	}
	r, err := newReadOn(dev)
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("tun: creating %s: %w", name, err)
	}
	return r, nil
}

// readOn is a TUN device whose reads go on past the first packet: after
// a Read that waited for one, it reads again, without waiting, while the
// device holds more packets and more than half the buffers are left. A UDP
// datagram that no application sent with GSO comes up one per read of the
// device, so without this each would go to the socket, or to WireGuard,
// alone: two system calls per datagram, and the device's queue overflows
// at 2 Gbit/s. (A burst that the offload code would cut into more packets
// than are left is an error and lost, as it is on a first read; with half
// of the buffers left, a 64 KB burst of segments of 1 KB or more fits.)
// Like the device's own Read, not for concurrent use.
type readOn struct {
	Device
	rc    syscall.RawConn
	ready bool             // what the last poll found
	poll  func(fd uintptr) // made once, so that polling allocates nothing
	pfd   [1]unix.PollFd   // poll's argument
}

// newReadOn wraps dev, which must be a file.
func newReadOn(dev Device) (*readOn, error) {
	f := dev.File()
	if f == nil {
		return nil, errors.New("tun: the device is not a file")
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	r := &readOn{Device: dev, rc: rc}
	r.poll = func(fd uintptr) {
		r.pfd[0] = unix.PollFd{Fd: int32(fd), Events: unix.POLLIN}
		n, err := unix.Poll(r.pfd[:], 0)
		r.ready = err == nil && n == 1 && r.pfd[0].Revents&unix.POLLIN != 0
	}
	return r, nil
}

// Read reads packets into bufs as Device.Read does, waiting for the first.
// On an error, the n packets before it are good.
func (r *readOn) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	n, err := r.Device.Read(bufs, sizes, offset)
	for err == nil && n > 0 && len(bufs)-n > len(bufs)/2 && r.pending() {
		var m int
		m, err = r.Device.Read(bufs[n:], sizes[n:], offset)
		n += m
	}
	return n, err
}

// pending reports whether the device has a packet to read now.
func (r *readOn) pending() bool {
	r.ready = false
	if r.rc.Control(r.poll) != nil {
		return false
	}
	return r.ready
}
