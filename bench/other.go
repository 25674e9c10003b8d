//go:build !linux

package main

import (
	"fmt"
	"os"
)

// The bench reads /proc and starts TUN devices: it runs on Linux only.
func main() {
	fmt.Fprintln(os.Stderr, "bench: runs on Linux only")
	os.Exit(1)
}
