package wgconf

import (
	"bufio"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// DeviceState is what a UAPI "get=1" reports.
type DeviceState struct {
	// PublicKey is derived from the reported private_key (zero if none);
	// the private key itself is not kept.
	PublicKey  wgtypes.Key
	ListenPort int
	Peers      []PeerState // in the order reported
}

// PeerState is the reported state of one peer.
type PeerState struct {
	PublicKey     wgtypes.Key
	Endpoint      netip.AddrPort // zero if none
	AllowedIPs    []netip.Prefix
	LastHandshake time.Time // zero if never (UAPI reports 0/0)
	RxBytes       int64
	TxBytes       int64
	Keepalive     time.Duration
}

// ParseGet parses the body of a UAPI get=1 answer: key=value lines, ending
// at EOF, at a blank line or at an "errno=" line. A non-zero errno is an
// error, as is a line without "=", a value that does not parse, or a peer
// attribute before the first public_key. Unknown keys are ignored, for
// forward compatibility.
func ParseGet(r io.Reader) (DeviceState, error) {
	var st DeviceState
	var peer *PeerState
	var hsSec, hsNsec int64
	flush := func() {
		if peer == nil {
			return
		}
		if hsSec != 0 || hsNsec != 0 {
			peer.LastHandshake = time.Unix(hsSec, hsNsec)
		}
		st.Peers = append(st.Peers, *peer)
		peer, hsSec, hsNsec = nil, 0, 0
	}

	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if line == "" {
			break
		}
		key, val, ok := strings.Cut(line, "=")
		if !ok {
			return DeviceState{}, fmt.Errorf("wgconf: uapi line %d: no '=' in %q", n, line)
		}
		err := func() error {
			switch key {
			case "errno":
				code, err := strconv.ParseInt(val, 10, 64)
				if err != nil {
					return err
				}
				if code != 0 {
					return fmt.Errorf("device reported errno=%d", code)
				}
				return io.EOF
			case "private_key":
				k, err := parseHexKey(val)
				st.PublicKey = k.PublicKey()
				return err
			case "listen_port":
				port, err := strconv.ParseUint(val, 10, 16)
				st.ListenPort = int(port)
				return err
			case "public_key":
				flush()
				k, err := parseHexKey(val)
				peer = &PeerState{PublicKey: k}
				return err
			case "fwmark":
				_, err := strconv.ParseUint(val, 10, 32)
				return err
			}
			if peer == nil {
				if isPeerKey(key) {
					return errors.New("peer attribute before public_key")
				}
				return nil
			}
			var err error
			switch key {
			case "endpoint":
				peer.Endpoint, err = netip.ParseAddrPort(val)
			case "allowed_ip":
				var p netip.Prefix
				if p, err = netip.ParsePrefix(val); err == nil {
					peer.AllowedIPs = append(peer.AllowedIPs, p)
				}
			case "last_handshake_time_sec":
				hsSec, err = strconv.ParseInt(val, 10, 64)
			case "last_handshake_time_nsec":
				hsNsec, err = strconv.ParseInt(val, 10, 64)
			case "rx_bytes":
				peer.RxBytes, err = strconv.ParseInt(val, 10, 64)
			case "tx_bytes":
				peer.TxBytes, err = strconv.ParseInt(val, 10, 64)
			case "persistent_keepalive_interval":
				var s uint64
				s, err = strconv.ParseUint(val, 10, 16)
				peer.Keepalive = time.Duration(s) * time.Second
			}
			return err
		}()
		if err == io.EOF {
			break
		}
		if err != nil {
			return DeviceState{}, fmt.Errorf("wgconf: uapi line %d %q: %w", n, line, err)
		}
	}
	if err := sc.Err(); err != nil {
		return DeviceState{}, fmt.Errorf("wgconf: reading uapi: %w", err)
	}
	flush()
	return st, nil
}

func isPeerKey(key string) bool {
	switch key {
	case "endpoint", "allowed_ip", "last_handshake_time_sec", "last_handshake_time_nsec",
		"rx_bytes", "tx_bytes", "persistent_keepalive_interval", "preshared_key", "protocol_version":
		return true
	}
	return false
}

func parseHexKey(s string) (wgtypes.Key, error) {
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != wgtypes.KeyLen {
		return wgtypes.Key{}, errors.New("not a hex key of 32 bytes")
	}
	return wgtypes.Key(b), nil
}

// FormatShow writes st in the layout of `wg show`, without colours:
//
//	interface: wg0
//	  public key: …
//	  private key: (hidden)
//	  listening port: 51820
//
//	peer: …
//	  (laptop)
//	  endpoint: 192.0.2.1:51820
//	  allowed ips: 100.64.0.2/32, fd7a::2/128
//	  latest handshake: 1 minute, 5 seconds ago
//	  transfer: 1.21 KiB received, 3.50 KiB sent
//	  persistent keepalive: every 25 seconds
//
// Peers come in the order of st. The "(name)" line appears when names knows
// the key; endpoint, latest handshake, transfer and persistent keepalive
// lines only when there is something to show, as in wg. now is the time
// relative handshake ages are computed against.
func FormatShow(w io.Writer, ifname string, st DeviceState, names map[wgtypes.Key]string, now time.Time) error {
	bw := bufio.NewWriter(w)
	fmt.Fprintf(bw, "interface: %s\n", ifname)
	if !isZero(st.PublicKey) {
		fmt.Fprintf(bw, "  public key: %s\n  private key: (hidden)\n", st.PublicKey)
	}
	if st.ListenPort != 0 {
		fmt.Fprintf(bw, "  listening port: %d\n", st.ListenPort)
	}
	for _, p := range st.Peers {
		fmt.Fprintf(bw, "\npeer: %s\n", p.PublicKey)
		if name, ok := names[p.PublicKey]; ok && name != "" {
			fmt.Fprintf(bw, "  (%s)\n", name)
		}
		if p.Endpoint.IsValid() {
			fmt.Fprintf(bw, "  endpoint: %s\n", p.Endpoint)
		}
		ips := "(none)"
		if len(p.AllowedIPs) > 0 {
			s := make([]string, len(p.AllowedIPs))
			for i, pfx := range p.AllowedIPs {
				s[i] = pfx.String()
			}
			ips = strings.Join(s, ", ")
		}
		fmt.Fprintf(bw, "  allowed ips: %s\n", ips)
		if !p.LastHandshake.IsZero() {
			fmt.Fprintf(bw, "  latest handshake: %s\n", ago(p.LastHandshake, now))
		}
		if p.RxBytes != 0 || p.TxBytes != 0 {
			fmt.Fprintf(bw, "  transfer: %s received, %s sent\n", byteCount(p.RxBytes), byteCount(p.TxBytes))
		}
		if s := int64(p.Keepalive / time.Second); s > 0 {
			fmt.Fprintf(bw, "  persistent keepalive: every %s\n", prettyTime(s))
		}
	}
	return bw.Flush()
}

// ago renders t relative to now as wg does ("Now", "… ago").
func ago(t, now time.Time) string {
	d := now.Unix() - t.Unix()
	switch {
	case d == 0:
		return "Now"
	case d < 0:
		return "(System clock wound backward; connection problems may ensue.)"
	}
	return prettyTime(d) + " ago"
}

// prettyTime renders seconds as "1 year, 2 days, 3 hours, 1 minute, 5 seconds",
// leaving out zero units.
func prettyTime(secs int64) string {
	units := []struct {
		name string
		size int64
	}{{"year", 365 * 24 * 3600}, {"day", 24 * 3600}, {"hour", 3600}, {"minute", 60}, {"second", 1}}
	var parts []string
	for _, u := range units {
		n := secs / u.size
		secs %= u.size
		if n == 0 {
			continue
		}
		s := fmt.Sprintf("%d %s", n, u.name)
		if n != 1 {
			s += "s"
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, ", ")
}

// byteCount renders b as wg does: "512 B", "1.21 KiB", "3.50 MiB", ….
func byteCount(b int64) string {
	if b < 1024 {
		return fmt.Sprintf("%d B", b)
	}
	f := float64(b) / 1024
	for _, unit := range []string{"KiB", "MiB", "GiB"} {
		if f < 1024 {
			return fmt.Sprintf("%.2f %s", f, unit)
		}
		f /= 1024
	}
	return fmt.Sprintf("%.2f TiB", f)
}
