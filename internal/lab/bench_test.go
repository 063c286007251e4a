package lab_test

import (
	"context"
	"fmt"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/overlayd/overlayd/internal/api"
	"github.com/overlayd/overlayd/internal/lab"
)

// BenchmarkIPAMAlloc measures allocations through the control API of a
// real overlayd once its ring is ready: each one a new ID, answered after
// the state is on disk (fsync). It reports the latency percentiles and the
// rate of one client allocating back to back.
//
//	go test ./internal/lab -run '^$' -bench IPAMAlloc -benchtime 5000x
func BenchmarkIPAMAlloc(b *testing.B) {
	l := lab.New(b, bin, 1)
	args := []string{"--range", "10.32.0.0/12", "--log-level", "info"}
	if dir := os.Getenv("BENCH_STATE_DIR"); dir != "" {
		args = append(args, "--state-dir", dir) // e.g. a tmpfs, to see the cost of the disk
	}
	d := l.Host(1).Start(args...)
	c := api.NewClient(d.Socket)
	defer c.Close()
	ctx := context.Background()
	if _, err := c.Alloc(ctx, "prime", ""); err != nil {
		b.Fatal(err)
	}
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	start := time.Now()
	for i := range b.N {
		t0 := time.Now()
		if _, err := c.Alloc(ctx, fmt.Sprintf("bench-%d", i), ""); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	total := time.Since(start)
	b.StopTimer()
	slices.Sort(lat)
	pct := func(p float64) float64 {
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))].Microseconds()) / 1000
	}
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	b.ReportMetric(float64(b.N)/total.Seconds(), "allocs/s")
}

// BenchmarkAPIStatus is the control API's round trip without the
// allocator: the floor under BenchmarkIPAMAlloc.
func BenchmarkAPIStatus(b *testing.B) {
	l := lab.New(b, bin, 1)
	d := l.Host(1).Start("--range", "10.32.0.0/12", "--log-level", "info")
	c := api.NewClient(d.Socket)
	b.ResetTimer()
	for range b.N {
		if _, err := c.Version(context.Background()); err != nil {
			b.Fatal(err)
		}
	}
}
