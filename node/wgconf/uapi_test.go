package wgconf

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/tuntest"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// newDevice starts a real wireguard-go device on a channel TUN.
func newDevice(t *testing.T) *device.Device {
	t.Helper()
	dev := device.NewDevice(tuntest.NewChannelTUN().TUN(), conn.NewDefaultBind(), device.NewLogger(device.LogLevelSilent, ""))
	t.Cleanup(dev.Close)
	// Bring it up now rather than when the TUN's up event is processed, so
	// that listen_port binds a socket (and reports its port) deterministically.
	if err := dev.Up(); err != nil {
		t.Fatal(err)
	}
	return dev
}

func genPriv(t *testing.T) wgtypes.Key {
	t.Helper()
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func apply(t *testing.T, dev *device.Device, uapi string) {
	t.Helper()
	if err := dev.IpcSet(uapi); err != nil {
		t.Fatalf("IpcSet: %v\n%s", err, uapi)
	}
}

// deviceState reads the device's state through ParseGet, with peers and
// their allowed IPs sorted so it can be compared.
func deviceState(t *testing.T, dev *device.Device) DeviceState {
	t.Helper()
	out, err := dev.IpcGet()
	if err != nil {
		t.Fatal(err)
	}
	st, err := ParseGet(strings.NewReader(out))
	if err != nil {
		t.Fatalf("ParseGet: %v\n%s", err, out)
	}
	for i := range st.Peers {
		slices.SortFunc(st.Peers[i].AllowedIPs, comparePrefix)
	}
	slices.SortFunc(st.Peers, func(a, b PeerState) int { return bytes.Compare(a.PublicKey[:], b.PublicKey[:]) })
	return st
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

// checkDevice fails the test unless compareDevice finds no difference.
func checkDevice(t *testing.T, dev *device.Device, want []Peer, checkEP func(Peer) bool) {
	t.Helper()
	if err := compareDevice(t, dev, want, checkEP); err != nil {
		t.Fatal(err)
	}
}

// compareDevice reports how the device's peers differ from want: keys,
// allowed IPs and keepalive; endpoints where checkEP says so for that peer.
func compareDevice(t *testing.T, dev *device.Device, want []Peer, checkEP func(Peer) bool) error {
	t.Helper()
	st := deviceState(t, dev)
	want = slices.Clone(want)
	slices.SortFunc(want, func(a, b Peer) int { return bytes.Compare(a.PublicKey[:], b.PublicKey[:]) })
	if len(st.Peers) != len(want) {
		return fmt.Errorf("device has %d peers, want %d:\n%+v", len(st.Peers), len(want), st.Peers)
	}
	for i, w := range want {
		g := st.Peers[i]
		wantIPs := slices.SortedFunc(slices.Values(w.AllowedIPs()), comparePrefix)
		switch {
		case g.PublicKey != w.PublicKey:
			return fmt.Errorf("peer %d: key %s, want %s", i, g.PublicKey, w.PublicKey)
		case !slices.Equal(g.AllowedIPs, wantIPs):
			return fmt.Errorf("peer %s: allowed ips %v, want %v", w.Name, g.AllowedIPs, wantIPs)
		case g.Keepalive != roundKeepalive(w.Keepalive):
			return fmt.Errorf("peer %s: keepalive %v, want %v", w.Name, g.Keepalive, w.Keepalive)
		case checkEP != nil && checkEP(w) && g.Endpoint != w.Endpoint:
			return fmt.Errorf("peer %s: endpoint %v, want %v", w.Name, g.Endpoint, w.Endpoint)
		}
	}
	return nil
}

func allEndpoints(Peer) bool { return true }

func mkPeer(name string, k wgtypes.Key, n byte, ep string, ka time.Duration) Peer {
	p := Peer{
		Name: name, PublicKey: k, Keepalive: ka,
		IPv4: netip.AddrFrom4([4]byte{100, 64, 0, n}),
		IPv6: netip.AddrFrom16([16]byte{0: 0xfd, 1: 0x7a, 15: n}),
	}
	if ep != "" {
		p.Endpoint = netip.MustParseAddrPort(ep)
	}
	return p
}

func TestFullConfigAndDiffOnDevice(t *testing.T) {
	dev := newDevice(t)
	priv := genPriv(t)
	ka, kb, kc, kd := testKey(10), testKey(11), testKey(12), testKey(13)

	old := []Peer{
		mkPeer("a", ka, 1, "192.0.2.1:51820", 0),
		mkPeer("b", kb, 2, "", 25*time.Second),
		mkPeer("c", kc, 3, "[2001:db8::3]:51820", 0),
	}
	// A stale peer that replace_peers must drop.
	apply(t, dev, FullConfig(priv, 0, []Peer{mkPeer("stale", kd, 9, "", 0)}))
	apply(t, dev, FullConfig(priv, 0, old))
	checkDevice(t, dev, old, allEndpoints)
	st := deviceState(t, dev)
	if st.PublicKey != priv.PublicKey() || st.ListenPort == 0 {
		t.Fatalf("device public key %s port %d; want %s and a port", st.PublicKey, st.ListenPort, priv.PublicKey())
	}

	// Simulate roaming: the device learnt another endpoint for a.
	roamed := netip.MustParseAddrPort("198.51.100.77:4242")
	apply(t, dev, fmt.Sprintf("public_key=%s\nendpoint=%s\n", hexKey(ka), roamed))

	newPeers := []Peer{
		mkPeer("a", ka, 1, "192.0.2.1:51820", 0),           // unchanged
		mkPeer("b", kb, 4, "", 25*time.Second),             // new addresses
		mkPeer("d", kd, 5, "192.0.2.5:51820", time.Second), // added
	} // c removed
	uapi, sum := Diff(old, newPeers)
	if strings.Contains(uapi, hexKey(ka)) {
		t.Errorf("diff touches unchanged peer a:\n%s", uapi)
	}
	wantSum := Summary{Added: []string{"d"}, Removed: []string{"c"}, Updated: []string{"b"}}
	if fmt.Sprint(sum) != fmt.Sprint(wantSum) {
		t.Errorf("summary %v, want %v", sum, wantSum)
	}
	apply(t, dev, uapi)
	checkDevice(t, dev, newPeers, func(p Peer) bool { return p.PublicKey != ka })
	if got := deviceState(t, dev).Peers[0]; got.PublicKey != ka || got.Endpoint != roamed {
		t.Errorf("peer a: endpoint %v, want the roamed %v", got.Endpoint, roamed)
	}

	// A changed desired endpoint is set even over a roamed one.
	newer := slices.Clone(newPeers)
	newer[0].Endpoint = netip.MustParseAddrPort("192.0.2.100:1")
	uapi, _ = Diff(newPeers, newer)
	apply(t, dev, uapi)
	checkDevice(t, dev, newer, allEndpoints)

	for _, set := range [][]Peer{nil, old, newPeers} {
		if d, s := Diff(set, set); d != "" || !s.Empty() {
			t.Errorf("Diff(x, x) = %q, %v; want empty", d, s)
		}
	}
}

func TestDiffText(t *testing.T) {
	ka, kb, kc := testKey(10), testKey(11), testKey(12)
	old := []Peer{
		mkPeer("a", ka, 1, "192.0.2.1:1", 0),
		mkPeer("b", kb, 2, "192.0.2.2:2", 0),
	}
	newPeers := []Peer{
		mkPeer("c", kc, 3, "", 0),
		mkPeer("b", kb, 2, "[2001:db8::2]:2", 10*time.Second),
	}
	got, sum := Diff(old, newPeers)
	want := "public_key=" + hexKey(ka) + "\nremove=true\n" +
		"public_key=" + hexKey(kb) + "\nupdate_only=true\nendpoint=[2001:db8::2]:2\npersistent_keepalive_interval=10\n" +
		"public_key=" + hexKey(kc) + "\nreplace_allowed_ips=true\nallowed_ip=100.64.0.3/32\nallowed_ip=fd7a::3/128\npersistent_keepalive_interval=0\n"
	if got != want {
		t.Errorf("Diff:\n%s\nwant:\n%s", got, want)
	}
	if s := sum.String(); s != "added [c] removed [a] updated [b]" {
		t.Errorf("summary %q", s)
	}

	// An endpoint that became unknown cannot be unset: nothing to do.
	gone := slices.Clone(old)
	gone[0].Endpoint = netip.AddrPort{}
	gone[1].Name = "renamed"
	if d, s := Diff(old, gone); d != "" || !s.Empty() {
		t.Errorf("Diff(endpoint dropped, renamed) = %q, %v; want empty", d, s)
	}
}

func TestFullConfigText(t *testing.T) {
	var priv wgtypes.Key
	priv[0] = 0xab
	got := FullConfig(priv, 51820, []Peer{mkPeer("a", testKey(10), 1, "192.0.2.1:1", 1500*time.Millisecond)})
	want := "private_key=ab" + strings.Repeat("00", 31) + "\nlisten_port=51820\nreplace_peers=true\n" +
		"public_key=" + hexKey(testKey(10)) + "\nreplace_allowed_ips=true\nallowed_ip=100.64.0.1/32\nallowed_ip=fd7a::1/128\n" +
		"endpoint=192.0.2.1:1\npersistent_keepalive_interval=2\n"
	if got != want {
		t.Errorf("FullConfig:\n%s\nwant:\n%s", got, want)
	}
}

// TestDiffProperty applies random sequences of desired peer sets through
// Diff and checks that the device always ends up exactly as desired.
func TestDiffProperty(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 0x6d657368))

	keys := make([]wgtypes.Key, 6)
	for i := range keys {
		keys[i] = testKey(byte(20 + i))
	}
	endpoints := []string{"", "192.0.2.1:1", "192.0.2.2:2", "[2001:db8::1]:3"}
	keepalives := []time.Duration{0, time.Second, 25 * time.Second}

	dev := newDevice(t)
	var cur []Peer
	apply(t, dev, FullConfig(genPriv(t), 0, cur))
	for step := range 150 {
		v4, v6 := rng.Perm(10), rng.Perm(10) // unique address suffixes for this step
		var next []Peer
		for i, k := range keys {
			if rng.IntN(3) == 0 {
				continue
			}
			p := mkPeer(fmt.Sprintf("k%d", i), k, byte(1+v4[i]), endpoints[rng.IntN(len(endpoints))], keepalives[rng.IntN(len(keepalives))])
			p.IPv6 = netip.AddrFrom16([16]byte{0: 0xfd, 1: 0x7a, 15: byte(1 + v6[i])})
			next = append(next, p)
		}
		rng.Shuffle(len(next), func(i, j int) { next[i], next[j] = next[j], next[i] })
		uapi, _ := Diff(cur, next)
		if err := dev.IpcSet(uapi); err != nil {
			t.Fatalf("step %d: IpcSet: %v\n%s", step, err, uapi)
		}
		// Without roaming, a known desired endpoint is what the device has.
		if err := compareDevice(t, dev, next, func(p Peer) bool { return p.Endpoint.IsValid() }); err != nil {
			t.Fatalf("step %d: %v\ndiff was:\n%s", step, err, uapi)
		}
		cur = next
	}
}
