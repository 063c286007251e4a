package peering

import (
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	var got []time.Duration
	d := time.Duration(0)
	for range 12 {
		d = nextBackoff(d, 2*time.Second, 60*time.Second)
		got = append(got, d)
	}
	want := []time.Duration{2 * time.Second, 3 * time.Second, 4500 * time.Millisecond, 6750 * time.Millisecond}
	for i, w := range want {
		if got[i] != w {
			t.Errorf("step %d: %v, want %v", i, got[i], w)
		}
	}
	if got[len(got)-1] != 60*time.Second {
		t.Errorf("not capped: %v", got)
	}
	if j := jitter(10*time.Second, 0); j != 5*time.Second {
		t.Errorf("jitter low end %v", j)
	}
	if j := jitter(10*time.Second, 0.999); j < 14*time.Second || j >= 15*time.Second {
		t.Errorf("jitter high end %v", j)
	}
}
