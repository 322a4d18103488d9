// Command h2spec: a small command line for the h2spec conformance library in
// ../shared/tools/h2spec, whose own cmd/ package is not part of that copy.
// scripts/setup.sh builds it offline into .venv/bin/h2spec (see the h2spec step there).
//
// Usage: h2spec [-h HOST] [-p PORT] [-P PATH] [-o SECONDS] [-j JUNIT.xml] [-S] [-v] [SECTION...]
// Exit status 0 when every selected case passed, 1 when one failed, 2 on a usage or run error.
package main

import (
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/summerwind/h2spec"
	"github.com/summerwind/h2spec/config"
)

func main() {
	host := flag.String("h", "127.0.0.1", "target host")
	port := flag.Int("p", 80, "target port")
	path := flag.String("P", "/", "path to request in the test cases")
	timeout := flag.Int("o", 2, "seconds to wait for each answer")
	junit := flag.String("j", "", "write a JUnit XML report to this file")
	strict := flag.Bool("S", false, "also run the strict-mode cases")
	verbose := flag.Bool("v", false, "log every frame")
	maxHeaderLen := flag.Int("max-header-length", 4000, "length of each dummy header value")
	flag.Parse()

	c := &config.Config{
		Host:         *host,
		Port:         *port,
		Path:         *path,
		Timeout:      time.Duration(*timeout) * time.Second,
		MaxHeaderLen: *maxHeaderLen,
		JUnitReport:  *junit,
		Strict:       *strict,
		Verbose:      *verbose,
		Sections:     flag.Args(),
	}
	ok, err := h2spec.Run(c)
	if err != nil {
		fmt.Fprintln(os.Stderr, "h2spec:", err)
		os.Exit(2)
	}
	if !ok {
		os.Exit(1)
	}
}
