package lab_test

import (
	"cmp"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
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
	if _, err := c.Alloc(ctx, "prime", netip.Prefix{}); err != nil {
		b.Fatal(err)
	}
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	start := time.Now()
	for i := range b.N {
		t0 := time.Now()
		if _, err := c.Alloc(ctx, fmt.Sprintf("bench-%d", i), netip.Prefix{}); err != nil {
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

// BenchmarkDNSPerf runs dnsperf (Debian's) against overlayd's DNS server
// in a namespace: overlayd pinned to CPU 0 with GOMAXPROCS=1, dnsperf to
// CPU 1, each query for one of 100 registered names, for 10 s. It reports
// the answers per second, the p99 latency and the queries that got no
// NOERROR answer (lost or failed). b.N is ignored: use -benchtime 1x.
// BENCH_DNS_QPS=N asks dnsperf for a steady N queries a second;
// BENCH_DNS_CLIENTS and BENCH_DNS_OUTSTANDING change its 8 clients and 64
// queries outstanding. The namespace's UDP counters before and after say
// whether a lost query was dropped by a socket buffer.
//
//	go test ./internal/lab -run '^$' -bench DNSPerf -benchtime 1x
func BenchmarkDNSPerf(b *testing.B) {
	if err := exec.Command("taskset", "-V").Run(); err != nil {
		b.Fatal("taskset (util-linux) is needed")
	}
	l := lab.New(b, bin, 1)
	h := l.Host(1)
	b.Setenv("GOMAXPROCS", "1")
	// dnsperf asks from one address, far beyond the default rate limit of
	// one client: this measures the server, without it.
	d := h.Start("--log-level", "warn", "--no-discovery", "--dns-rate-limit", "0")
	if out, err := exec.Command("taskset", "-a", "-p", "-c", "0", strconv.Itoa(d.Pid())).CombinedOutput(); err != nil {
		b.Fatalf("taskset: %v\n%s", err, out)
	}
	var queries strings.Builder
	for i := range 100 {
		d.MustCtl("dns-add", fmt.Sprintf("10.32.%d.%d", i/200, i%200+1), fmt.Sprintf("web%d", i))
		fmt.Fprintf(&queries, "web%d.weave.local A\n", i)
	}
	data := filepath.Join(l.Dir(), "queries.txt")
	if err := os.WriteFile(data, []byte(queries.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	args := []string{"-c", "1", "dnsperf", "-s", "127.0.0.1", "-d", data, "-l", "10",
		"-c", cmp.Or(os.Getenv("BENCH_DNS_CLIENTS"), "8"), "-q", cmp.Or(os.Getenv("BENCH_DNS_OUTSTANDING"), "64"), "-v"}
	if qps := os.Getenv("BENCH_DNS_QPS"); qps != "" {
		args = append(args, "-Q", qps) // a steady rate instead of as fast as it goes
	}
	udp := func() string {
		snmp, _ := h.Exec(ctx, "cat", "/proc/net/snmp")
		var lines []string
		for line := range strings.Lines(snmp) {
			if strings.HasPrefix(line, "Udp:") {
				lines = append(lines, strings.TrimSpace(line))
			}
		}
		return strings.Join(lines, "\n")
	}
	before := udp()
	out, err := h.Exec(ctx, "taskset", args...)
	b.StopTimer()
	b.Logf("UDP counters in the namespace, before and after:\n%s\n%s", before, udp())
	if err != nil {
		b.Fatalf("dnsperf: %v\n%s", err, tail(out, 2000))
	}
	var lat []float64
	bad := 0
	for _, line := range strings.Split(out, "\n") {
		// "> NOERROR web7.weave.local A 0.000104"
		f := strings.Fields(line)
		if len(f) < 5 || f[0] != ">" {
			continue
		}
		if f[1] != "NOERROR" {
			bad++
			continue
		}
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			lat = append(lat, v)
		}
	}
	if len(lat) == 0 {
		b.Fatalf("no answers in dnsperf's output:\n%s", tail(out, 2000))
	}
	slices.Sort(lat)
	qps := regexp.MustCompile(`Queries per second:\s+([0-9.]+)`).FindStringSubmatch(out)
	if qps == nil {
		b.Fatalf("no rate in dnsperf's output:\n%s", tail(out, 2000))
	}
	rate, _ := strconv.ParseFloat(qps[1], 64)
	b.ReportMetric(rate, "answers/s")
	b.ReportMetric(lat[len(lat)*99/100]*1000, "p99-ms")
	b.ReportMetric(lat[len(lat)/2]*1000, "p50-ms")
	b.ReportMetric(float64(bad), "not-noerror")
	if i := strings.Index(out, "Statistics:"); i >= 0 {
		b.Logf("dnsperf:\n%s", out[i:])
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
