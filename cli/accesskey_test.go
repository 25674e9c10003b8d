package cli

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/wire"
)

func TestAccessCommandsFlagsFirst(t *testing.T) {
	isolateEnv(t)
	d := meshtest.ShortTempDir(t) // no server: the usage check must come first
	for _, args := range [][]string{
		{"access-key", "revoke", "0123456789ab", "--data-dir", d},
		{"access-key", "list", "extra", "--json"},
		{"access-key", "create", "extra", "--node", "pi"},
		{"nodes", "set-public", "pi", "web", "--data-dir", d},
		{"nodes", "set-private", "pi", "--data-dir", d, "web"},
	} {
		o := run(args...)
		if o.code != ExitUsage || !strings.Contains(o.stderr, "flags go first") {
			t.Errorf("meshctl %s: want exit %d and \"flags go first\", got %s", strings.Join(args, " "), ExitUsage, o)
		}
	}
	if o := run("nodes", "set-public", "--data-dir", d, "pi"); o.code != ExitUsage || !strings.Contains(o.stderr, "meshctl nodes set-public [flags] NODE SERVICE") {
		t.Errorf("set-public with one argument: %s", o)
	}
	for _, ttl := range []string{"0s", "-1h", "8761h"} {
		if o := run("access-key", "create", "--data-dir", d, "--ttl", ttl); o.code != ExitUsage || !strings.Contains(o.stderr, "--ttl must be positive") {
			t.Errorf("access-key create --ttl %s: %s", ttl, o)
		}
	}
}

func TestAccessCommandsHelp(t *testing.T) {
	for _, args := range [][]string{
		{"access-key", "--help"},
		{"access-key", "create", "--help"},
		{"nodes", "set-public", "--help"},
		{"nodes", "set-private", "--help"},
	} {
		o := mustRun(t, args...)
		if !strings.Contains(o.stdout, "access key") && !strings.Contains(o.stdout, "sign") {
			t.Errorf("meshctl %s does not explain access keys or sign-in:\n%s", strings.Join(args, " "), o.stdout)
		}
	}
	o := mustRun(t, "access-key", "create", "--help")
	for _, want := range []string{"--node", "--service", "--ttl", "MESHCTL_NODE", "MESHCTL_SERVICE", "paste the key on the sign-in page"} {
		if !strings.Contains(o.stdout, want) {
			t.Errorf("access-key create --help lacks %q:\n%s", want, o.stdout)
		}
	}
}

func TestAccessKeyCommandsInProcess(t *testing.T) {
	isolateEnv(t)
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.Now = nil })
	dir := c.Dir
	c.AddNode(t, "pi")

	var all wire.AccessKeyCreateResponse
	if err := json.Unmarshal([]byte(mustRun(t, "access-key", "create", "--data-dir", dir, "--json").stdout), &all); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(all.Key, "meshctl-access-"+all.ID) || all.Node != "" || all.Service != "" {
		t.Errorf("access-key create --json = %+v", all)
	}
	if d := time.Until(all.Expires); d < 23*time.Hour || d > 25*time.Hour {
		t.Errorf("default expiry in %s, want about 24h", d)
	}

	o := mustRun(t, "access-key", "create", "--data-dir", dir, "--node", "pi", "--service", "web", "--ttl", "2h")
	for _, want := range []string{"meshctl-access-", `private service "web" of node pi`, "(pi.DOMAIN, through the proxy)", "paste the key on the sign-in page", "meshctl access-key revoke"} {
		if !strings.Contains(o.stdout, want) {
			t.Errorf("access-key create output lacks %q:\n%s", want, o)
		}
	}

	// The environment sets flags too.
	t.Setenv("MESHCTL_NODE", "pi")
	var scoped wire.AccessKeyCreateResponse
	if err := json.Unmarshal([]byte(mustRun(t, "access-key", "create", "--data-dir", dir, "--json").stdout), &scoped); err != nil || scoped.Node != "pi" {
		t.Errorf("MESHCTL_NODE=pi: %+v, %v", scoped, err)
	}
	t.Setenv("MESHCTL_NODE", "")

	if o := run("access-key", "create", "--data-dir", dir, "--node", "nosuch"); o.code == 0 || !strings.Contains(o.stderr, `no active node "nosuch"`) {
		t.Errorf("access key for an unknown node: %s", o)
	}

	var ks []wire.AccessKey
	if err := json.Unmarshal([]byte(mustRun(t, "access-key", "list", "--data-dir", dir, "--json").stdout), &ks); err != nil {
		t.Fatal(err)
	}
	if len(ks) != 3 || ks[0].ID != all.ID || ks[1].Node != "pi" || ks[1].Service != "web" {
		t.Errorf("access-key list --json = %+v", ks)
	}
	o = mustRun(t, "access-key", "revoke", "--data-dir", dir, all.ID)
	if !strings.Contains(o.stdout, all.ID+" revoked") {
		t.Errorf("revoke output:\n%s", o)
	}
	o = mustRun(t, "access-key", "list", "--data-dir", dir)
	if !strings.Contains(o.stdout, "revoked") || !strings.Contains(o.stdout, "(any)") || strings.Contains(o.stdout, "meshctl-access-") {
		t.Errorf("access-key list table:\n%s", o)
	}
	if o := run("access-key", "revoke", "--data-dir", dir, "0123456789ab"); o.code == 0 || !strings.Contains(o.stderr, `no access key with id "0123456789ab"`) {
		t.Errorf("revoke of an unknown key: %s", o)
	}
}

func TestSetPublicPrivateInProcess(t *testing.T) {
	isolateEnv(t)
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.Now = nil })
	pi := c.AddNode(t, "pi")

	o := mustRun(t, "nodes", "set-public", "--data-dir", c.Dir, "pi", "web")
	if !strings.Contains(o.stdout, "web of node pi is now public") || !strings.Contains(o.stdout, "does not publish") {
		t.Errorf("set-public of an unpublished service:\n%s", o)
	}
	svcs := []wire.Service{{Name: "web", Port: 80}}
	if err := pi.Client.Update(context.Background(), wire.UpdateRequest{Services: &svcs}); err != nil {
		t.Fatal(err)
	}
	public := func() bool {
		for _, n := range c.Nodes(t) {
			if n.Name == "pi" {
				for _, s := range n.Services {
					if s.Name == "web" {
						return s.Public
					}
				}
			}
		}
		t.Fatal("pi's web service not listed")
		return false
	}
	if !public() {
		t.Error("web not public after set-public")
	}
	o = mustRun(t, "nodes", "set-private", "--data-dir", c.Dir, "pi", "web")
	if !strings.Contains(o.stdout, "now private") || strings.Contains(o.stdout, "does not publish") {
		t.Errorf("set-private output:\n%s", o)
	}
	if public() {
		t.Error("web still public after set-private")
	}
	if o := run("nodes", "set-public", "--data-dir", c.Dir, "nosuch", "web"); o.code == 0 || !strings.Contains(o.stderr, `no active node named "nosuch"`) {
		t.Errorf("set-public on an unknown node: %s", o)
	}
	if o := run("nodes", "set-public", "--data-dir", c.Dir, "pi", "Web"); o.code == 0 || !strings.Contains(o.stderr, "upper-case") {
		t.Errorf("set-public with a bad service name: %s", o)
	}
}
