package fuzz

import (
	"reflect"
	"testing"

	"github.com/overlayd/overlayd/internal/pluginstate"
)

// FuzzPluginState feeds the Docker plugin's state file (docker-plugin.json)
// damaged bytes: Decode never panics, keeps only entries with an ID and an
// IPv4 address, and what it keeps is written and read back the same.
func FuzzPluginState(f *testing.F) {
	for _, s := range []string{
		`{"networks":[{"id":"6ee7bc17","pool":"10.47.0.0/24"}],"endpoints":[{"id":"dafbd09a","networkID":"6ee7bc17","address":"10.47.0.1/24",` +
			`"hostIface":"vethwe362aa86a7","inner":"vethwg362aa86a7","mac":"3a:d1:c7:9d:f6:4d","sandbox":"/var/run/docker/netns/6a6dab9c4246",` +
			`"container":"7df37dbbbc2c"}]}`,
		`{"networks":[null],"endpoints":[null,{"id":""},{"id":"x","address":"::1/128"}]}`,
		`{"endpoints":[{"id":"e","address":"10.47.0.70/26","left":true,"claimed":true}]}`,
		`{"networks":[{"id":"n","pool":"10.47.0.0/33"}]}`, `{"networks":[{"id":"n","pool":"10.47.0.0/26","dockerIPAM":true}]}`,
		`{}`, `null`, `[]`, `{"networks":{}}`, ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		st, _, err := pluginstate.Decode(b)
		if err != nil {
			return
		}
		for id, n := range st.Networks {
			if id == "" || id != n.ID || !n.Pool.Addr().Is4() {
				t.Fatalf("kept network %q: %+v", id, n)
			}
		}
		for id, e := range st.Endpoints {
			if id == "" || id != e.ID || !e.Address.Addr().Is4() {
				t.Fatalf("kept endpoint %q: %+v", id, e)
			}
		}
		out, err := st.Encode()
		if err != nil {
			t.Fatalf("encoding what was decoded: %v", err)
		}
		again, dropped, err := pluginstate.Decode(out)
		if err != nil || dropped != 0 {
			t.Fatalf("reading back %s: %d dropped, %v", out, dropped, err)
		}
		if !reflect.DeepEqual(st, again) {
			t.Fatalf("read back differs:\n%+v\n%+v", st, again)
		}
	})
}
