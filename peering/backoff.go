package peering

import "time"

// nextBackoff is the wait after one more failure: initial at first, then
// half as long again each time, up to max (Weave's policy, with a lower cap:
// a UDP hello costs little).
func nextBackoff(prev, initial, max time.Duration) time.Duration {
	if prev <= 0 {
		return initial
	}
	return min(prev+prev/2, max)
}

// jitter spreads d over [d/2, 3d/2) with u drawn uniformly from [0, 1), so
// that peers that failed together do not retry together.
func jitter(d time.Duration, u float64) time.Duration {
	return d/2 + time.Duration(float64(d)*u)
}
