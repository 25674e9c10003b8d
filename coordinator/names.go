package coordinator

import (
	"fmt"
	"strings"

	"github.com/meshctl/meshctl/wire"
)

// reservedNames cannot be node names: they are, or may become, the
// proxy's or the coordinator's own host names under the mesh domain.
var reservedNames = map[string]bool{
	"admin": true, "api": true, "coordinator": true, "proxy": true, "relay": true,
	"www": true, "localhost": true, "meshctl": true, "ssh": true, "login": true,
	"auth": true, "metrics": true, "status": true, "_acme-challenge": true,
}

// ValidateName checks a node or service name: a lower-case DNS label of at
// most 63 characters, letters, digits and single hyphens, not starting or
// ending with a hyphen, with no "--" anywhere (so "<service>--<node>" host
// names stay unambiguous, which also rules out "xn--").
// Node names must also not be reserved. The error says what is wrong;
// names are never rewritten.
func ValidateName(kind, name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%s name is empty", kind)
	case len(name) > 63:
		return fmt.Errorf("%s name %q is %d characters long; the limit is 63", kind, name, len(name))
	case strings.ToLower(name) != name:
		return fmt.Errorf("%s name %q has upper-case letters; names are lower-case DNS labels (try %q)", kind, name, strings.ToLower(name))
	case name[0] == '-' || name[len(name)-1] == '-':
		return fmt.Errorf("%s name %q starts or ends with a hyphen", kind, name)
	case strings.Contains(name, "--"):
		return fmt.Errorf("%s name %q contains \"--\", which separates service and node in host names", kind, name)
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Errorf("%s name %q contains %q; use only a-z, 0-9 and '-'", kind, name, c)
		}
	}
	if kind == "node" && reservedNames[name] { // only node names become host names on their own
		return fmt.Errorf("%s name %q is reserved; choose another", kind, name)
	}
	return nil
}

// validateMemberName checks a node name at enrollment. Proxies are never
// routed by name, so they may take reserved names such as "proxy".
func validateMemberName(name, role string) error {
	err := ValidateName("node", name)
	if err != nil && role == wire.RoleProxy && reservedNames[name] {
		return nil
	}
	return err
}
