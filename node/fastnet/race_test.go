//go:build race

package fastnet

const raceEnabled = true
