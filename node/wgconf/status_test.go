package wgconf

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func TestParseGetDevice(t *testing.T) {
	dev := newDevice(t)
	priv := genPriv(t)
	peers := []Peer{
		mkPeer("a", testKey(10), 1, "[2001:db8::1]:51820", 25*time.Second),
		mkPeer("b", testKey(11), 2, "", 0),
	}
	apply(t, dev, FullConfig(priv, 0, peers))
	out, err := dev.IpcGet()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "private_key=") {
		t.Fatalf("IpcGet output lacks private_key:\n%s", out)
	}
	st, err := ParseGet(strings.NewReader(out + "errno=0\n\n"))
	if err != nil {
		t.Fatal(err)
	}
	if st.PublicKey != priv.PublicKey() || st.ListenPort == 0 || len(st.Peers) != 2 {
		t.Fatalf("state %+v; want key %s, a port, 2 peers", st, priv.PublicKey())
	}
	for _, ps := range st.Peers {
		i := slices.IndexFunc(peers, func(p Peer) bool { return p.PublicKey == ps.PublicKey })
		if i < 0 {
			t.Fatalf("unexpected peer %s", ps.PublicKey)
		}
		want := peers[i]
		slices.SortFunc(ps.AllowedIPs, comparePrefix)
		if ps.Endpoint != want.Endpoint || ps.Keepalive != want.Keepalive || !ps.LastHandshake.IsZero() ||
			!slices.Equal(ps.AllowedIPs, want.AllowedIPs()) {
			t.Errorf("peer %s: got %+v, want %+v", want.Name, ps, want)
		}
	}
}

const sampleGet = `private_key=e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a
listen_port=12912
public_key=b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33
preshared_key=188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52
allowed_ip=192.168.4.4/32
endpoint=[abcd:23::33%2]:51820
public_key=58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376
tx_bytes=38333
rx_bytes=2224
allowed_ip=192.168.4.6/32
persistent_keepalive_interval=111
endpoint=182.122.22.19:3233
last_handshake_time_sec=1700000000
last_handshake_time_nsec=500
some_future_key=whatever
errno=0

`

func TestParseGetSample(t *testing.T) {
	st, err := ParseGet(strings.NewReader(sampleGet))
	if err != nil {
		t.Fatal(err)
	}
	priv, _ := parseHexKey("e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a")
	k1, _ := parseHexKey("b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33")
	k2, _ := parseHexKey("58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376")
	want := DeviceState{
		PublicKey:  priv.PublicKey(),
		ListenPort: 12912,
		Peers: []PeerState{
			{PublicKey: k1, Endpoint: netip.MustParseAddrPort("[abcd:23::33%2]:51820"),
				AllowedIPs: []netip.Prefix{netip.MustParsePrefix("192.168.4.4/32")}},
			{PublicKey: k2, Endpoint: netip.MustParseAddrPort("182.122.22.19:3233"),
				AllowedIPs:    []netip.Prefix{netip.MustParsePrefix("192.168.4.6/32")},
				LastHandshake: time.Unix(1700000000, 500), RxBytes: 2224, TxBytes: 38333, Keepalive: 111 * time.Second},
		},
	}
	if !stateEqual(st, want) {
		t.Errorf("ParseGet:\n got %+v\nwant %+v", st, want)
	}
}

func stateEqual(a, b DeviceState) bool {
	return a.PublicKey == b.PublicKey && a.ListenPort == b.ListenPort &&
		slices.EqualFunc(a.Peers, b.Peers, func(x, y PeerState) bool {
			return x.PublicKey == y.PublicKey && x.Endpoint == y.Endpoint && slices.Equal(x.AllowedIPs, y.AllowedIPs) &&
				x.LastHandshake.Equal(y.LastHandshake) && x.RxBytes == y.RxBytes && x.TxBytes == y.TxBytes && x.Keepalive == y.Keepalive
		})
}

func TestParseGetErrors(t *testing.T) {
	key := "public_key=" + hexKey(testKey(1)) + "\n"
	for name, in := range map[string]string{
		"errno":                "listen_port=1\nerrno=1\n\n",
		"errno not number":     "errno=x\n",
		"no equals":            "listen_port=1\ngarbage\n",
		"bad port":             "listen_port=70000\n",
		"bad private key":      "private_key=abcd\n",
		"bad public key":       "public_key=zz\n",
		"bad endpoint":         key + "endpoint=example.com:1\n",
		"bad allowed ip":       key + "allowed_ip=10.0.0.1\n",
		"bad rx":               key + "rx_bytes=-x\n",
		"bad handshake":        key + "last_handshake_time_sec=soon\n",
		"bad keepalive":        key + "persistent_keepalive_interval=65536\n",
		"peer attr before key": "endpoint=192.0.2.1:1\n",
	} {
		if st, err := ParseGet(strings.NewReader(in)); err == nil {
			t.Errorf("%s: ParseGet(%q) = %+v, want error", name, in, st)
		}
	}
}

func TestFormatShow(t *testing.T) {
	var priv wgtypes.Key
	priv[0] = 1
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	st := DeviceState{
		PublicKey:  priv.PublicKey(),
		ListenPort: 51820,
		Peers: []PeerState{
			{PublicKey: testKey(10), Endpoint: netip.MustParseAddrPort("192.0.2.1:51820"),
				AllowedIPs:    []netip.Prefix{netip.MustParsePrefix("100.64.0.2/32"), netip.MustParsePrefix("fd7a::2/128")},
				LastHandshake: now.Add(-(65*time.Second - 300*time.Millisecond)), RxBytes: 1239, TxBytes: 3584, Keepalive: 25 * time.Second},
			{PublicKey: testKey(11)},
			{PublicKey: testKey(12), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("100.64.0.4/32")},
				LastHandshake: now.Add(-(400*24*time.Hour + time.Hour + 60*time.Second)), RxBytes: 5 << 30, TxBytes: 1,
				Keepalive: 61 * time.Second},
			{PublicKey: testKey(13), LastHandshake: now, RxBytes: 3 << 20},
		},
	}
	names := map[wgtypes.Key]string{testKey(10): "laptop", testKey(12): "server"}
	var b strings.Builder
	if err := FormatShow(&b, "mesh0", st, names, now); err != nil {
		t.Fatal(err)
	}
	want := `interface: mesh0
  public key: ` + priv.PublicKey().String() + `
  private key: (hidden)
  listening port: 51820

peer: ` + testKey(10).String() + `
  (laptop)
  endpoint: 192.0.2.1:51820
  allowed ips: 100.64.0.2/32, fd7a::2/128
  latest handshake: 1 minute, 5 seconds ago
  transfer: 1.21 KiB received, 3.50 KiB sent
  persistent keepalive: every 25 seconds

peer: ` + testKey(11).String() + `
  allowed ips: (none)

peer: ` + testKey(12).String() + `
  (server)
  allowed ips: 100.64.0.4/32
  latest handshake: 1 year, 35 days, 1 hour, 1 minute ago
  transfer: 5.00 GiB received, 1 B sent
  persistent keepalive: every 1 minute, 1 second

peer: ` + testKey(13).String() + `
  allowed ips: (none)
  latest handshake: Now
  transfer: 3.00 MiB received, 0 B sent
`
	if got := b.String(); got != want {
		t.Errorf("FormatShow:\n%s\nwant:\n%s", got, want)
	}
}
