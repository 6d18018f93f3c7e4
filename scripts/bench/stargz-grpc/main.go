// Command stargz-grpc serves stargz-snapshotter's snapshotter over containerd's snapshots gRPC
// API on a unix socket: the benchmark's scenario (b). Debian packages the library but not the
// daemon, so this is the smallest main that wires the packaged service to a socket. Registries
// are reached over plain HTTP, since the benchmark's registry is a local docker-registry.
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/stargz-snapshotter/service"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "/run/stargz-bench/stargz.sock", "unix socket to serve on")
	root := flag.String("root", "/var/lib/stargz-bench", "state directory")
	flag.Parse()

	ctx := context.Background()
	// Plain HTTP to whatever host the image reference names, with a per-request timeout so a
	// stalled registry fails a read instead of hanging it. The library wraps the client's
	// Transport, so it must be set explicitly.
	hosts := func(ref reference.Spec) ([]docker.RegistryHost, error) {
		client := &http.Client{
			Transport: http.DefaultTransport.(*http.Transport).Clone(),
			Timeout:   60 * time.Second,
		}
		return []docker.RegistryHost{{
			Client:       client,
			Host:         ref.Hostname(),
			Scheme:       "http",
			Path:         "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
			Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(client)),
		}}, nil
	}
	var config service.Config
	snapshotter, err := service.NewStargzSnapshotterService(ctx, *root, &config,
		service.WithCustomRegistryHosts(hosts))
	if err != nil {
		log.Fatalf("stargz snapshotter: %v", err)
	}

	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		log.Fatalf("socket directory: %v", err)
	}
	_ = os.Remove(*address)
	listener, err := net.Listen("unix", *address)
	if err != nil {
		log.Fatalf("listen on %s: %v", *address, err)
	}
	server := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(server, snapshotservice.FromSnapshotter(snapshotter))

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-signals
		server.Stop()
		_ = snapshotter.Close()
	}()
	log.Printf("stargz snapshotter serving on %s, root %s", *address, *root)
	if err := server.Serve(listener); err != nil {
		log.Fatalf("serve: %v", err)
	}
}
