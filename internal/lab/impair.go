package lab

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	nfqueue "github.com/florianl/go-nfqueue/v2"
	"github.com/mdlayher/netlink"
)

// Impairment is what Impair does to the packets a host sends on its eth0,
// like tc netem's options of the same names: Loss and Duplicate are
// fractions (0.1 is 10 %); each packet is held Delay ± Jitter (uniform),
// so that with a jitter larger than the gap between packets they arrive
// reordered, as under netem.
type Impairment struct {
	Loss      float64
	Delay     time.Duration
	Jitter    time.Duration
	Duplicate float64
	Seed      uint64
}

// ImpairStats counts what an impairment did.
type ImpairStats struct{ Seen, Dropped, Duplicated atomic.Uint64 }

// dupMark marks the copies Impair sends itself, which its rule lets pass.
const dupMark = 0x1d0

// Impair applies im to every packet the host sends on eth0, until the
// returned stop is called (or the test ends). It is netem done in user
// space, for kernels without sch_netem (this project's CI machines): an
// iptables rule queues the packets to this process (NFQUEUE), which drops
// some, sends copies of some through a raw socket, and gives each its
// verdict after its delay. Packets queued when it stops are dropped, as a
// link that goes down drops them.
func (h *Host) Impair(im Impairment) (stats *ImpairStats, stop func(), err error) {
	l := h.lab
	ns, err := os.Open("/run/netns/" + h.NS)
	if err != nil {
		return nil, nil, err
	}
	defer ns.Close()
	q := uint16(h.Index)
	nf, err := nfqueue.Open(&nfqueue.Config{
		NetNS:        int(ns.Fd()),
		NfQueue:      q,
		MaxPacketLen: 0xffff,
		MaxQueueLen:  1 << 14,
		Copymode:     nfqueue.NfQnlCopyPacket,
		WriteTimeout: time.Second,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("nfqueue in %s: %w", h.NS, err)
	}
	nf.SetOption(netlink.NoENOBUFS, true)
	var raw int
	if err := h.Do(func() error {
		var err error
		if raw, err = syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_RAW); err != nil {
			return err
		}
		return syscall.SetsockoptInt(raw, syscall.SOL_SOCKET, syscall.SO_MARK, dupMark)
	}); err != nil {
		nf.Close()
		return nil, nil, fmt.Errorf("raw socket in %s: %w", h.NS, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	stats = &ImpairStats{}
	rnd := rand.New(rand.NewPCG(im.Seed, uint64(h.Index)))
	var mu sync.Mutex // rnd, and raw against its closing
	closed := false
	hold := func() time.Duration {
		d := im.Delay
		if im.Jitter > 0 {
			d += time.Duration(rnd.Int64N(int64(2*im.Jitter+1))) - im.Jitter
		}
		return max(d, 0)
	}
	hook := func(a nfqueue.Attribute) int {
		if a.PacketID == nil {
			return 0
		}
		id := *a.PacketID
		stats.Seen.Add(1)
		mu.Lock()
		drop := rnd.Float64() < im.Loss
		dup := !drop && a.Payload != nil && len(*a.Payload) >= 20 && rnd.Float64() < im.Duplicate
		wait, copyWait := hold(), hold()
		mu.Unlock()
		if drop {
			stats.Dropped.Add(1)
			nf.SetVerdict(id, nfqueue.NfDrop)
			return 0
		}
		if dup {
			stats.Duplicated.Add(1)
			pkt := append([]byte(nil), *a.Payload...)
			time.AfterFunc(copyWait, func() {
				mu.Lock()
				defer mu.Unlock()
				if !closed {
					to := &syscall.SockaddrInet4{Addr: [4]byte(pkt[16:20])}
					syscall.Sendto(raw, pkt, 0, to)
				}
			})
		}
		time.AfterFunc(wait, func() { nf.SetVerdict(id, nfqueue.NfAccept) })
		return 0
	}
	if err := nf.RegisterWithErrorFunc(ctx, hook, func(e error) int {
		if ctx.Err() != nil || errors.Is(e, os.ErrClosed) {
			return 1
		}
		return 0 // ENOBUFS and timeouts: go on
	}); err != nil {
		cancel()
		nf.Close()
		syscall.Close(raw)
		return nil, nil, fmt.Errorf("nfqueue in %s: %w", h.NS, err)
	}
	rule := []string{"POSTROUTING", "-o", "eth0", "-m", "mark", "!", "--mark", strconv.Itoa(dupMark),
		"-j", "NFQUEUE", "--queue-num", strconv.Itoa(int(q)), "--queue-bypass"}
	iptables := func(op string) error {
		args := append([]string{"netns", "exec", h.NS, "iptables", "-w", "-t", "mangle", op}, rule...)
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("iptables %s in %s: %v: %s", op, h.NS, err, out)
		}
		return nil
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			iptables("-D")
			cancel()
			nf.Close()
			mu.Lock()
			closed = true
			syscall.Close(raw)
			mu.Unlock()
		})
	}
	l.t.Cleanup(stop)
	if err := iptables("-A"); err != nil {
		stop()
		return nil, nil, err
	}
	return stats, stop, nil
}
