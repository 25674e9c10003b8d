# meshctl tasks. `just` is optional: every recipe is a plain command you can
# copy from here or from the README.

data := "./data"

# Start the coordinator on the embedded SQLite store in ./data.
server *ARGS:
    go run ./cmd/meshctl server --data-dir {{data}} {{ARGS}}

# The test suite, as the README and CI run it.
test:
    go test -race ./...

# Quick tests only (skips the slow cases).
test-short:
    go test -short ./...

# Everything CI checks: gofmt, vet, tests with -race, Pi cross-builds.
check:
    bash .ci/run

# Build meshctl for this machine into ./bin.
build:
    CGO_ENABLED=0 go build -o bin/meshctl ./cmd/meshctl

# Cross-build for Linux amd64 and the Raspberry Pis (arm64, armv7, armv6) into ./bin.
cross:
    GOOS=linux GOARCH=amd64       CGO_ENABLED=0 go build -o bin/meshctl-linux-amd64 ./cmd/meshctl
    GOOS=linux GOARCH=arm64       CGO_ENABLED=0 go build -o bin/meshctl-linux-arm64 ./cmd/meshctl
    GOOS=linux GOARCH=arm GOARM=7 CGO_ENABLED=0 go build -o bin/meshctl-linux-armv7 ./cmd/meshctl
    GOOS=linux GOARCH=arm GOARM=6 CGO_ENABLED=0 go build -o bin/meshctl-linux-armv6 ./cmd/meshctl

# Benchmarks on loopback against baselines, into docs/benchmarks.md (needs wrk;
# as root for the TUN rows). `just bench -quick` is a smoke run.
bench *ARGS:
    go run ./bench -out docs/benchmarks.md {{ARGS}}

# The end-to-end user flow through the real binary (loopback only).
user-flow:
    bash ../shared/checks/user-flow.sh
