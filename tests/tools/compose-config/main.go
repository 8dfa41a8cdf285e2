// compose-config: loads a Compose file the way Docker Compose does (compose-spec's
// compose-go: interpolation, extends and YAML merge keys, profiles, defaults, relative
// paths made absolute) and prints the normalized project as JSON. The rehearsal
// (tests/support/compose_rehearsal.py) starts what this prints.
//
// Usage: compose-config FILE [PROFILE...]
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: compose-config FILE [PROFILE...]")
		os.Exit(2)
	}
	options, err := cli.NewProjectOptions(
		[]string{os.Args[1]},
		cli.WithOsEnv,
		cli.WithDotEnv,
		cli.WithProfiles(os.Args[2:]),
	)
	if err != nil {
		fmt.Fprintln(os.Stderr, "compose-config:", err)
		os.Exit(1)
	}
	project, err := options.LoadProject(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, "compose-config:", err)
		os.Exit(1)
	}
	out, err := json.MarshalIndent(project, "", "  ")
	if err != nil {
		fmt.Fprintln(os.Stderr, "compose-config:", err)
		os.Exit(1)
	}
	fmt.Println(string(out))
}
