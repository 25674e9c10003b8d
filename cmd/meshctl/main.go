// Command meshctl reaches a fleet of devices behind NAT over a WireGuard
// mesh. See the README and `meshctl --help`.
package main

import "github.com/meshctl/meshctl/cli"

func main() { cli.Main() }
