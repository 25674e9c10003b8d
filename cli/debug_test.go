package cli

import (
	"strings"
	"testing"
)

func TestPprofOnlyOnLoopback(t *testing.T) {
	for _, bad := range []string{"0.0.0.0:6060", "[::]:6060", "192.0.2.1:6060", "localhost:6060", "6060"} {
		t.Setenv(pprofEnv, bad)
		if err := startPprof(); err == nil || !strings.Contains(err.Error(), "loopback") {
			t.Errorf("%s=%s: err %v, want a refusal naming loopback", pprofEnv, bad, err)
		}
	}
	t.Setenv(pprofEnv, "127.0.0.1:0")
	if err := startPprof(); err != nil {
		t.Errorf("loopback refused: %v", err)
	}
}
