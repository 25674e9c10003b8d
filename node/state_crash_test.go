package node_test

import (
	"bufio"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/wire"
)

// stateWriterEnv makes this test binary a state writer (see
// TestStateWriterChild): its value is the state dir to rewrite.
const stateWriterEnv = "MESHCTL_TEST_STATE_WRITER"

// TestStateWriterChild is not a test: run with stateWriterEnv set (by
// TestStateFilesSurviveSIGKILL), it rewrites the state and netmap files of
// a state dir in a loop, each write one generation newer (the state's
// Enrolled time and the netmap's version are the generation), until it is
// killed. It says "writing" once the first generation is on disk.
func TestStateWriterChild(t *testing.T) {
	dir := os.Getenv(stateWriterEnv)
	if dir == "" {
		return // an ordinary test run: nothing to do
	}
	st, err := node.LoadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	gen := st.Enrolled.Unix()
	for i := 0; ; i++ {
		gen++
		st.Enrolled = time.Unix(gen, 0).UTC()
		if err := st.Save(dir); err != nil {
			t.Fatal(err)
		}
		if err := node.SaveNetmap(dir, &wire.Netmap{Version: uint64(gen)}); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			os.Stdout.WriteString("writing\n")
		}
		if i > 1_000_000 { // bound the loop; the parent kills us long before
			t.Fatal("never killed")
		}
	}
}

// TestStateFilesSurviveSIGKILL kills a process that rewrites node.json and
// netmap.json in a loop, at random moments, again and again: after every
// kill both files parse and validate, hold the generation the writer had
// reached or the one before it (never an older one), and the temp files
// left by writes cut short do not pile up — at most one per file, and none
// once the next write has run.
func TestStateFilesSurviveSIGKILL(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	n := c.AddNode(t, "writer")
	dir := n.Dir
	st, err := node.LoadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	// Generations start at the enrollment time, in seconds.
	last := st.Enrolled.Unix()

	const kills = 30
	midWrite := 0 // kills that left a temp file: the write was cut short
	for k := range kills {
		cmd := exec.Command(os.Args[0], "-test.run=^TestStateWriterChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), stateWriterEnv+"="+dir)
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		ready := make(chan bool, 1)
		go func() {
			line, _ := bufio.NewReader(out).ReadString('\n')
			ready <- strings.HasPrefix(line, "writing")
		}()
		select {
		case ok := <-ready:
			if !ok {
				cmd.Process.Kill()
				cmd.Wait()
				t.Fatalf("kill %d: the writer ended before writing", k)
			}
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("kill %d: the writer did not start writing within 30s", k)
		}
		// A random moment in the write loop (each round of two atomic
		// writes takes a few fsyncs).
		time.Sleep(time.Duration(rand.IntN(20_000)) * time.Microsecond)
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		err = cmd.Wait()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("kill %d: the writer was not killed by SIGKILL: %v", k, err)
		}

		got, err := node.LoadState(dir)
		if err != nil {
			t.Fatalf("kill %d: state unreadable after SIGKILL: %v", k, err)
		}
		gen := got.Enrolled.Unix()
		if gen < last {
			t.Fatalf("kill %d: state went back from generation %d to %d", k, last, gen)
		}
		nm, err := node.LoadNetmap(dir)
		if err != nil {
			t.Fatalf("kill %d: netmap unreadable after SIGKILL: %v", k, err)
		}
		// The netmap is written after the state: it holds the state's
		// generation or the one before.
		if v := int64(nm.Version); v != gen && v != gen-1 {
			t.Fatalf("kill %d: netmap generation %d, state generation %d", k, v, gen)
		}
		last = gen
		temps := tempFiles(t, dir)
		if len(temps) > 0 {
			midWrite++
		}
		if len(temps) > 2 {
			t.Fatalf("kill %d: temp files pile up: %v", k, temps)
		}
	}
	t.Logf("%d SIGKILLs, %d of them mid-write (a temp file left); last generation %d", kills, midWrite, last-st.Enrolled.Unix())

	// The next writes reuse and consume what the killed ones left.
	got, err := node.LoadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := got.Save(dir); err != nil {
		t.Fatal(err)
	}
	if err := node.SaveNetmap(dir, &wire.Netmap{Version: uint64(last)}); err != nil {
		t.Fatal(err)
	}
	if temps := tempFiles(t, dir); len(temps) > 0 {
		t.Fatalf("temp files left after a complete write: %v", temps)
	}
}

// tempFiles lists the files in dir that are neither the state nor the
// netmap nor the ssh dir.
func tempFiles(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		switch e.Name() {
		case node.StateFile, node.NetmapFile, node.SSHDir:
		default:
			fi, _ := e.Info()
			out = append(out, filepath.Join(dir, e.Name())+" ("+strconv.FormatInt(fi.Size(), 10)+" bytes)")
		}
	}
	return out
}
