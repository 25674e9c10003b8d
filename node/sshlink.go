package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
)

// sshLink is the agent's one SSH connection to the proxy (a newer session
// of a node replaces its older one on the proxy, so there is only ever
// one). The relay opens its channel on it, and the SSH fallback its
// remote forwards. It connects on demand and reconnects on the next
// demand after it dropped.
type sshLink struct {
	a      *Agent
	dialMu sync.Mutex // one dial at a time
	mu     sync.Mutex
	client *ssh.Client
}

// get returns the connected client, dialing the proxy if needed.
func (l *sshLink) get(ctx context.Context) (*ssh.Client, error) {
	if c := l.current(); c != nil {
		return c, nil
	}
	l.dialMu.Lock()
	defer l.dialMu.Unlock()
	if c := l.current(); c != nil {
		return c, nil
	}
	cl, err := l.dial(ctx)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.client = cl
	l.mu.Unlock()
	go func() {
		err := cl.Wait()
		l.mu.Lock()
		if l.client == cl {
			l.client = nil
		}
		l.mu.Unlock()
		if l.a.ctx.Err() == nil {
			l.a.log.Info("SSH connection to the proxy closed", "err", err)
		}
	}()
	return cl, nil
}

// current is the connected client, nil if none.
func (l *sshLink) current() *ssh.Client {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.client
}

// close ends the connection (if any).
func (l *sshLink) close() {
	l.mu.Lock()
	c := l.client
	l.client = nil
	l.mu.Unlock()
	if c != nil {
		c.Close()
	}
}

// dial connects to the proxy's SSH endpoint from the netmap with the
// node's certificate; the proxy's host key must be certified by the SSH CA.
func (l *sshLink) dial(ctx context.Context) (*ssh.Client, error) {
	a := l.a
	cur := a.applied.Load()
	if cur == nil || cur.nm.ProxySSH == "" {
		return nil, errors.New("no proxy SSH endpoint in the netmap")
	}
	addr := cur.nm.ProxySSH
	st := a.client.State()
	if st.SSHKey == "" || st.SSHCertificate == "" {
		return nil, errors.New("this identity has no SSH certificate (enrolled before the SSH fallback existed): enroll again")
	}
	key, err := ssh.ParsePrivateKey([]byte(st.SSHKey))
	if err != nil {
		return nil, err
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(st.SSHCertificate))
	if err != nil {
		return nil, err
	}
	cert, ok := pub.(*ssh.Certificate)
	if !ok {
		return nil, errors.New("ssh_certificate is not a certificate")
	}
	signer, err := ssh.NewCertSigner(cert, key)
	if err != nil {
		return nil, err
	}
	ca, _, _, _, err := ssh.ParseAuthorizedKey([]byte(st.SSHCA))
	if err != nil {
		return nil, fmt.Errorf("ssh_ca: %w", err)
	}
	checker := &ssh.CertChecker{IsHostAuthority: func(k ssh.PublicKey, _ string) bool { return string(k.Marshal()) == string(ca.Marshal()) }}
	cfg := &ssh.ClientConfig{
		User: st.Name, Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: checker.CheckHostKey, Timeout: 10 * time.Second,
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("ssh %s: %w", addr, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	} else {
		conn.SetDeadline(time.Now().Add(cfg.Timeout))
	}
	c, chans, reqs, err := ssh.NewClientConn(conn, addr, cfg)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("ssh %s: %w", addr, err)
	}
	conn.SetDeadline(time.Time{})
	a.log.Info("SSH connection to the proxy up", "proxy", addr)
	return ssh.NewClient(c, chans, reqs), nil
}
