//go:build !race

package fastnet

const raceEnabled = false
