package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// identity is a simulated node's key material, generated before the
// enrollment clock starts: an ECDSA P-256 TLS key and its CSR, a WireGuard
// key and an Ed25519 SSH key, as a real node makes them.
type identity struct {
	name  string
	role  string
	key   *ecdsa.PrivateKey
	csr   []byte
	wgPub string
	ssh   string
}

func newIdentity(name, role string) (*identity, error) {
	key, err := pki.GenerateKey()
	if err != nil {
		return nil, err
	}
	csr, err := pki.NewCSR(key, name)
	if err != nil {
		return nil, err
	}
	wg, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return nil, err
	}
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		return nil, err
	}
	return &identity{name: name, role: role, key: key, csr: csr, wgPub: wg.PublicKey().String(),
		ssh: string(ssh.MarshalAuthorizedKey(sshPub))}, nil
}

// counters count bytes on the wire (TLS records, HTTP headers and bodies).
type counters struct {
	read, written atomic.Int64
}

type countingConn struct {
	net.Conn
	c *counters
}

func (c countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.c.read.Add(int64(n))
	return n, err
}

func (c countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.c.written.Add(int64(n))
	return n, err
}

func countingDialer(c *counters) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		conn, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return countingConn{conn, c}, nil
	}
}

// simNode is an enrolled simulated node: its identity, certificate, and
// the netmap version it knows.
type simNode struct {
	idx      int
	id       *identity
	nodeID   string
	cert     tls.Certificate
	version  uint64
	hc       *http.Client
	affected bool // sees the revoked nodes in its netmap (mesh: all; hub: proxies)
}

// enrollInfo is what a simulated node keeps from its enrollment answer.
type enrollInfo struct {
	NodeID  string
	Cert    string
	Version uint64
}

// enroll runs one real enrollment: its own TLS connection to the pinned
// coordinator, token, CSR, WireGuard and SSH keys. It reads the answer to
// the end (as a real node must) but decodes only what it needs, so that a
// mesh netmap of thousands of peers costs the simulated node little CPU.
func enroll(ctx context.Context, t *target, id *identity, token string, cnt *counters) (enrollInfo, error) {
	tr := &http.Transport{TLSClientConfig: pki.PinnedTLSConfig(t.pin), DisableKeepAlives: true,
		DialContext: countingDialer(cnt), DisableCompression: true}
	defer tr.CloseIdleConnections()
	body, _ := json.Marshal(wire.EnrollRequest{Token: token, Name: id.name, WireGuardKey: id.wgPub,
		CSR: string(id.csr), SSHKey: id.ssh, Role: id.role})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, t.url+wire.PathEnroll, bytes.NewReader(body))
	if err != nil {
		return enrollInfo{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(wire.HeaderProtocol, strconv.Itoa(wire.ProtocolVersion))
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return enrollInfo{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e wire.Error
		b, _ := io.ReadAll(resp.Body)
		json.Unmarshal(b, &e)
		return enrollInfo{}, fmt.Errorf("enroll %s: HTTP %d %s: %s", id.name, resp.StatusCode, e.Code, e.Message)
	}
	info, err := parseEnroll(resp.Body)
	io.Copy(io.Discard, resp.Body)
	if err != nil {
		return enrollInfo{}, fmt.Errorf("enroll %s: %w", id.name, err)
	}
	return info, nil
}

// parseEnroll decodes node.id, certificate and netmap.version from an
// EnrollResponse, and stops reading there (the caller drains the rest).
func parseEnroll(r io.Reader) (enrollInfo, error) {
	var info enrollInfo
	var haveVersion bool
	dec := json.NewDecoder(r)
	done := func() bool { return info.NodeID != "" && info.Cert != "" && haveVersion }
	if err := expectDelim(dec, '{'); err != nil {
		return info, err
	}
	for dec.More() {
		key, err := dec.Token()
		if err != nil {
			return info, err
		}
		switch key {
		case "node":
			var n struct {
				ID string `json:"id"`
			}
			err = dec.Decode(&n)
			info.NodeID = n.ID
		case "certificate":
			err = dec.Decode(&info.Cert)
		case "netmap":
			if err := expectDelim(dec, '{'); err != nil {
				return info, err
			}
			for dec.More() {
				k, err := dec.Token()
				if err != nil {
					return info, err
				}
				if k == "version" {
					if err := dec.Decode(&info.Version); err != nil {
						return info, err
					}
					haveVersion = true
					if done() {
						return info, nil
					}
					continue
				}
				if err := skipValue(dec); err != nil {
					return info, err
				}
			}
			if _, err := dec.Token(); err != nil { // '}'
				return info, err
			}
		default:
			err = skipValue(dec)
		}
		if err != nil {
			return info, err
		}
		if done() {
			return info, nil
		}
	}
	if !done() {
		return info, errors.New("enrollment answer lacks node id, certificate or netmap version")
	}
	return info, nil
}

func expectDelim(dec *json.Decoder, d json.Delim) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if tok != d {
		return fmt.Errorf("want %v, got %v", d, tok)
	}
	return nil
}

// skipValue skips one JSON value token by token (no copy of it is kept).
func skipValue(dec *json.Decoder) error {
	depth := 0
	for {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		switch tok {
		case json.Delim('{'), json.Delim('['):
			depth++
		case json.Delim('}'), json.Delim(']'):
			depth--
		}
		if depth == 0 {
			return nil
		}
	}
}

// newSimNode turns an enrollment into a node ready to watch: a client
// certificate and one http.Client whose Transport keeps a single
// connection to the coordinator, as node.Client does.
func newSimNode(t *target, idx int, id *identity, info enrollInfo, cnt *counters) (*simNode, error) {
	blk, _ := pem.Decode([]byte(info.Cert))
	if blk == nil {
		return nil, errors.New("enrollment answer: certificate is not PEM")
	}
	leaf, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, err
	}
	n := &simNode{idx: idx, id: id, nodeID: info.NodeID, version: info.Version,
		cert: tls.Certificate{Certificate: [][]byte{blk.Bytes}, PrivateKey: id.key, Leaf: leaf}}
	conf := pki.PinnedTLSConfig(t.pin)
	conf.Certificates = []tls.Certificate{n.cert}
	n.hc = &http.Client{Transport: &http.Transport{
		TLSClientConfig:     conf,
		DialContext:         countingDialer(cnt),
		MaxConnsPerHost:     1,
		MaxIdleConnsPerHost: 1,
		IdleConnTimeout:     10 * time.Minute,
		DisableCompression:  true,
		TLSHandshakeTimeout: time.Minute,
	}}
	return n, nil
}

// lightNetmap is the part of a netmap answer the watchers decode.
type lightNetmap struct {
	Version uint64   `json:"version"`
	Delta   bool     `json:"delta"`
	Base    uint64   `json:"base"`
	Removed []string `json:"removed"`
	Peers   []struct {
		ID string `json:"id"`
	} `json:"peers"`
}

// watchStats are shared by all watchers.
type watchStats struct {
	responses   atomic.Int64 // 200 answers
	full, delta atomic.Int64
	notModified atomic.Int64
	errors      atomic.Int64
	baseErrors  atomic.Int64 // a delta whose base is not the version the watcher had
	bodyBytes   atomic.Int64
	lastAnswer  atomic.Int64 // unix nanos of the latest 200 answer
	inflight    atomic.Int64 // requests written and not yet answered
	revoked     atomic.Int64 // watchers told they were revoked
	lastErr     atomic.Pointer[string]
}

// revocation is one timed revocation the watchers report to.
type revocation struct {
	victim   string // node id
	needle   []byte // `"<id>"`
	start    time.Time
	seen     []atomic.Int64 // per watcher: nanoseconds after start, 0 = not yet
	left     atomic.Int64   // affected watchers that have not seen it
	done     chan struct{}
	doneOnce sync.Once
}

var currentRev atomic.Pointer[revocation]

// watch long-polls like node.Client.Netmap (since=version, delta=1 for
// netmap deltas) until ctx ends or the node is revoked. Only the first
// request of each watcher waits for sem (so that connection set-up does
// not flood the listener); it is released once the connection is up.
func (n *simNode) watch(ctx context.Context, t *target, st *watchStats, sem chan struct{}, connected *sync.WaitGroup) {
	first := true
	release := func() {
		if first {
			first = false
			<-sem
			connected.Done()
		}
	}
	defer release()
	buf := make([]byte, 32<<10)
	sem <- struct{}{}
	for ctx.Err() == nil {
		url := t.url + wire.PathNetmap + "?since=" + strconv.FormatUint(n.version, 10) + "&delta=1"
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		req.Header.Set(wire.HeaderProtocol, strconv.Itoa(wire.ProtocolVersion))
		if first {
			req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
				WroteRequest: func(httptrace.WroteRequestInfo) { release() },
			}))
		}
		st.inflight.Add(1)
		resp, err := n.hc.Do(req)
		st.inflight.Add(-1)
		if err != nil {
			release()
			if ctx.Err() != nil {
				return
			}
			st.errors.Add(1)
			s := err.Error()
			st.lastErr.Store(&s)
			time.Sleep(time.Second)
			continue
		}
		switch resp.StatusCode {
		case http.StatusOK:
			err = n.readNetmap(resp.Body, buf, st)
		case http.StatusNotModified:
			st.notModified.Add(1)
		default:
			var e wire.Error
			b, _ := io.ReadAll(resp.Body)
			json.Unmarshal(b, &e)
			if e.Code == wire.CodeRevoked {
				st.revoked.Add(1)
				resp.Body.Close()
				return
			}
			err = fmt.Errorf("HTTP %d %s: %s", resp.StatusCode, e.Code, e.Message)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil {
			st.errors.Add(1)
			s := err.Error()
			st.lastErr.Store(&s)
			time.Sleep(time.Second)
		}
	}
}

// readNetmap reads one netmap answer. Small answers (deltas, hub netmaps)
// are decoded; large full netmaps are scanned as they stream in, for the
// version (the first "version" key) and the revoked node's id, so that a
// watcher never holds a whole multi-megabyte netmap.
func (n *simNode) readNetmap(body io.Reader, buf []byte, st *watchStats) error {
	rev := currentRev.Load()
	var total int
	k, err := io.ReadFull(body, buf)
	total += k
	var lacks bool
	switch {
	case err == io.EOF || err == io.ErrUnexpectedEOF: // it fit: decode it
		var nm lightNetmap
		if err := json.Unmarshal(buf[:k], &nm); err != nil {
			return fmt.Errorf("decode netmap: %w", err)
		}
		if nm.Delta {
			st.delta.Add(1)
			if nm.Base != n.version {
				st.baseErrors.Add(1)
			}
		} else {
			st.full.Add(1)
		}
		n.version = nm.Version
		if rev != nil {
			if nm.Delta {
				for _, id := range nm.Removed {
					lacks = lacks || id == rev.victim
				}
			} else {
				lacks = true
				for _, p := range nm.Peers {
					lacks = lacks && p.ID != rev.victim
				}
			}
		}
	case err != nil:
		return err
	default: // a large (full) netmap: stream it
		st.full.Add(1)
		v, ok := scanVersion(buf[:k])
		if !ok {
			return errors.New("large netmap without a version near its start")
		}
		n.version = v
		found := rev != nil && bytes.Contains(buf[:k], rev.needle)
		keep := 0
		if rev != nil {
			keep = len(rev.needle) - 1
		}
		for {
			// Keep the last len(needle)-1 bytes so that a match across
			// reads is seen.
			carry := min(keep, k)
			copy(buf, buf[k-carry:k])
			m, err := body.Read(buf[carry:])
			total += m
			k = carry + m
			if rev != nil && !found && bytes.Contains(buf[:k], rev.needle) {
				found = true
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				return err
			}
		}
		lacks = rev != nil && !found
	}
	st.responses.Add(1)
	st.bodyBytes.Add(int64(total))
	st.lastAnswer.Store(time.Now().UnixNano())
	if rev != nil && lacks && n.affected {
		if rev.seen[n.idx].CompareAndSwap(0, max(1, int64(time.Since(rev.start)))) {
			if rev.left.Add(-1) == 0 {
				rev.doneOnce.Do(func() { close(rev.done) })
			}
		}
	}
	return nil
}

// scanVersion finds the first "version": number in b.
func scanVersion(b []byte) (uint64, bool) {
	i := bytes.Index(b, []byte(`"version":`))
	if i < 0 {
		return 0, false
	}
	b = bytes.TrimLeft(b[i+len(`"version":`):], " \n\t")
	j := 0
	for j < len(b) && b[j] >= '0' && b[j] <= '9' {
		j++
	}
	v, err := strconv.ParseUint(string(b[:j]), 10, 64)
	return v, err == nil
}
