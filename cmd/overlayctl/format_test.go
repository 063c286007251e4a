package main

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"

	"github.com/overlayd/overlayd/internal/api"
)

func TestWriteStatus(t *testing.T) {
	st := &api.Status{
		Version: "1.2.3",
		Router: api.RouterStatus{
			Name: 0x12d2fe7ac1f2, Nickname: "docker1", ProtocolMinVersion: 1, ProtocolMaxVersion: 2,
			Targets: []string{"a:1", "b:1"},
			Connections: []api.Connection{
				{Address: "192.168.48.14:6783", Outbound: true, State: "established", Name: 0x7e214a702f45,
					Nickname: "host2", Overlay: "udp", MTU: 1456},
				{Address: "10.2.2.1:6783", Outbound: true, State: "failed", Info: "no answer to 5 hellos, retry: 2026-01-02 03:04:05"},
			},
			Peers: []api.Peer{
				{Name: 0x12d2fe7ac1f2, Nickname: "docker1", Connections: []api.PeerConnection{
					{Name: 0x7e214a702f45, Nickname: "host2", Address: "192.168.48.14:6783", Outbound: true, Established: true}}},
				{Name: 0x7e214a702f45, Nickname: "host2", Connections: []api.PeerConnection{
					{Name: 0x12d2fe7ac1f2, Nickname: "docker1", Established: false}}},
			},
		},
		IPAM: api.IPAMStatus{Enabled: true, Status: "idle", Range: netip.MustParsePrefix("172.16.16.0/24"),
			DefaultSubnet: netip.MustParsePrefix("172.16.16.0/24")},
	}
	var b bytes.Buffer
	writeStatus(&b, st)
	want := `
        Version: 1.2.3

        Service: router
       Protocol: overlayd 1..2
           Name: 12:d2:fe:7a:c1:f2(docker1)
     Encryption: disabled
  PeerDiscovery: disabled
        Targets: 2
    Connections: 2 (1 established, 1 failed)
          Peers: 2 (with 1 established, 1 pending connections)

        Service: ipam
         Status: idle
          Range: 172.16.16.0/24
  DefaultSubnet: 172.16.16.0/24

`
	if b.String() != want {
		t.Errorf("status:\n%s\nwant:\n%s", b.String(), want)
	}

	b.Reset()
	writeConnections(&b, st.Router.Connections)
	want = "-> 192.168.48.14:6783    established udp    7e:21:4a:70:2f:45(host2) mtu=1456\n" +
		"-> 10.2.2.1:6783         failed      no answer to 5 hellos, retry: 2026-01-02 03:04:05\n"
	if b.String() != want {
		t.Errorf("connections:\n%q\nwant:\n%q", b.String(), want)
	}

	b.Reset()
	writePeers(&b, st.Router.Peers)
	want = "12:d2:fe:7a:c1:f2(docker1)\n" +
		"   -> 192.168.48.14:6783    7e:21:4a:70:2f:45(host2)              established\n" +
		"7e:21:4a:70:2f:45(host2)\n" +
		"   <-                       12:d2:fe:7a:c1:f2(docker1)            pending\n"
	if b.String() != want {
		t.Errorf("peers:\n%q\nwant:\n%q", b.String(), want)
	}
}

func TestSummariesOmitZeroCounts(t *testing.T) {
	if got := connectionSummary(nil); got != "0" {
		t.Errorf("no connections: %q", got)
	}
	if got := peerSummary([]api.Peer{{}}); got != "1" {
		t.Errorf("lone peer: %q", got)
	}
	cs := []api.Connection{{State: "connecting"}, {State: "retrying"}, {State: "pending"}}
	if got := connectionSummary(cs); got != "3 (1 pending, 1 retrying, 1 connecting)" {
		t.Errorf("order: %q", got)
	}
}

func TestUsageErrorsNeedNoDaemon(t *testing.T) {
	for _, args := range [][]string{{"bogus"}, {"status", "bogus"}, {"connect"}, {"expose", "x"}, {"expose", "a", "b"},
		{"alloc"}, {"alloc", "id", "x"}, {"alloc", "a", "10.0.0.0/24", "c"}, {"claim", "id"}, {"claim", "id", "1.1.1.1"},
		{"release"}, {"rmpeer"}, {"ring", "x"}, {"--bogus"}, {}} {
		var out, errOut bytes.Buffer
		if code := execute(append([]string{"--socket", "/nonexistent/sock"}, args...), &out, &errOut); code != 2 {
			t.Errorf("%v: exit %d, stderr %q", args, code, errOut.String())
		}
		if out.Len() != 0 || bytes.Count(errOut.Bytes(), []byte("\n")) != 1 {
			t.Errorf("%v: stdout %q, stderr %q", args, out.String(), errOut.String())
		}
	}
	var out, errOut bytes.Buffer
	if code := execute([]string{"--socket", "/nonexistent/sock", "status"}, &out, &errOut); code != 1 {
		t.Errorf("unreachable daemon: exit %d, %q", code, errOut.String())
	}
}

// TestNicknamesAndUpstreams: a peer whose nickname is not known is printed as
// its name alone, never NAME(); the DNS upstream drops port 53 only.
func TestNicknamesAndUpstreams(t *testing.T) {
	st := &api.IPAMStatus{RangeNumIPs: 256, ActiveIPs: 1, Owners: []api.IPAMOwner{
		{Peer: 1, Nickname: "host1", Size: 192, Reachable: true, Self: true},
		{Peer: 3, Nickname: "host3", Size: 32},
		{Peer: 4, Size: 32},
	}}
	var b bytes.Buffer
	writeIPAM(&b, st)
	want := "00:00:00:00:00:01(host1)                   192 IPs (75.0% of total) (1 active)\n" +
		"00:00:00:00:00:03(host3)                    32 IPs (12.5% of total) - unreachable!\n" +
		"00:00:00:00:00:04                           32 IPs (12.5% of total) - unreachable!\n"
	if b.String() != want {
		t.Errorf("status ipam:\n%q\nwant:\n%q", b.String(), want)
	}
	for in, want := range map[string]string{
		"":                                      "",
		"10.250.0.9:53":                         "10.250.0.9",
		"10.250.0.9:5353":                       "10.250.0.9:5353",
		"10.0.0.1:53 [fd00::1]:53 [fd00::2]:54": "10.0.0.1, fd00::1, [fd00::2]:54",
	} {
		var in2 []string
		if in != "" {
			in2 = strings.Fields(in)
		}
		if got := upstreams(in2); got != want {
			t.Errorf("upstreams(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestLostShown: addresses given up after a partition are listed by
// status ipam and marked lost: in ps.
func TestLostShown(t *testing.T) {
	st := &api.IPAMStatus{RangeNumIPs: 256, Lost: []api.IPAMLost{
		{Address: netip.MustParsePrefix("10.44.0.7/16"), ID: "c1", Owner: 3, Nickname: "h3", AllocatedThere: true},
		{Address: netip.MustParsePrefix("10.44.0.8/16"), ID: "c2", Owner: 4},
	}}
	var b bytes.Buffer
	writeIPAM(&b, st)
	want := "lost 10.44.0.7/16 of c1 after a partition: owned by 00:00:00:00:00:03(h3), which allocated it too\n" +
		"lost 10.44.0.8/16 of c2 after a partition: owned by 00:00:00:00:00:04, which did not answer\n"
	if b.String() != want {
		t.Errorf("status ipam:\n%q\nwant:\n%q", b.String(), want)
	}
	b.Reset()
	writePs(&b, &api.PsResponse{Peer: 1, Containers: []api.Attachment{{ID: "c1", MAC: "aa:bb:cc:dd:ee:ff",
		Addresses: []netip.Prefix{netip.MustParsePrefix("10.44.0.9/16")}, Lost: []netip.Prefix{netip.MustParsePrefix("10.44.0.7/16")}}}})
	if want := "weave:expose 00:00:00:00:00:01\nc1 aa:bb:cc:dd:ee:ff 10.44.0.9/16 lost:10.44.0.7/16\n"; b.String() != want {
		t.Errorf("ps:\n%q\nwant:\n%q", b.String(), want)
	}
}
