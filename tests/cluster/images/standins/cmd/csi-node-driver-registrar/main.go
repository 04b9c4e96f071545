// Command csi-node-driver-registrar is a stand-in for
// kubernetes-csi/node-driver-registrar, written for nbd-csi's cluster tests
// because the Go module proxy does not serve the upstream module (every
// version answers 403) and GitHub cannot be reached from the test machines.
// It is not the upstream program; it accepts the flags nbd-csi's chart
// passes and does what the kubelet needs from the upstream one:
//
//   - asks the driver for its name (CSI GetPluginInfo on --csi-address);
//   - serves the kubelet's plugin registration service on
//     <plugin-registration-path>/<driver-name>-reg.sock, where the kubelet's
//     plugin watcher finds it; GetInfo answers type CSIPlugin, the driver
//     name, the driver socket's path on the host
//     (--kubelet-registration-path) and version 1.0.0;
//   - exits non-zero when the kubelet reports a failed registration, so the
//     container restarts and registers again;
//   - serves /healthz on --http-endpoint: 200 while the registration socket
//     accepts connections.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"nbd-csi.local/standins/internal/csiconn"
)

type registrationServer struct {
	registerapi.UnimplementedRegistrationServer
	driverName string
	endpoint   string
	verbosity  int
}

func (s *registrationServer) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	if s.verbosity >= 2 {
		log.Printf("kubelet asked for the plugin info of %s", s.driverName)
	}
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              s.driverName,
		Endpoint:          s.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (s *registrationServer) NotifyRegistrationStatus(_ context.Context, status *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !status.PluginRegistered {
		// As upstream: a restarted container registers again from scratch.
		log.Printf("registration of %s failed: %s; exiting so the container restarts", s.driverName, status.Error)
		os.Exit(1)
	}
	log.Printf("kubelet registered %s", s.driverName)
	return &registerapi.RegistrationStatusResponse{}, nil
}

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "CSI driver socket inside this container (path or unix:// URL)")
	kubeletPath := flag.String("kubelet-registration-path", "", "the driver socket's path on the host, as the kubelet dials it")
	pluginDir := flag.String("plugin-registration-path", "/registration", "directory the kubelet watches for registration sockets")
	httpEndpoint := flag.String("http-endpoint", "", "address to serve /healthz on, e.g. :9809 (empty: no HTTP server)")
	connectTimeout := flag.Duration("timeout", time.Second, "timeout of each GetPluginInfo call")
	verbosity := flag.Int("v", 0, "log verbosity (klog style)")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println("csi-node-driver-registrar stand-in (nbd-csi tests/cluster/images/standins)")
		return
	}
	if *kubeletPath == "" {
		log.Fatal("--kubelet-registration-path is required")
	}

	driverName, err := driverName(*csiAddress, *connectTimeout)
	if err != nil {
		log.Fatal(err)
	}
	socketPath := filepath.Join(*pluginDir, driverName+"-reg.sock")
	// A socket left by a previous container would make Listen fail.
	if err := os.Remove(socketPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.Fatalf("removing the stale %s: %v", socketPath, err)
	}
	listener, err := net.Listen("unix", socketPath)
	if err != nil {
		log.Fatalf("listening on %s: %v", socketPath, err)
	}
	server := grpc.NewServer()
	registerapi.RegisterRegistrationServer(server, &registrationServer{
		driverName: driverName,
		endpoint:   *kubeletPath,
		verbosity:  *verbosity,
	})

	if *httpEndpoint != "" {
		go serveHealth(*httpEndpoint, socketPath)
	}

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		sig := <-signals
		log.Printf("%v: removing %s", sig, socketPath)
		server.Stop()
		_ = os.Remove(socketPath)
		os.Exit(0)
	}()

	log.Printf("registration server for %s (driver socket %s on the host) at %s", driverName, *kubeletPath, socketPath)
	if err := server.Serve(listener); err != nil {
		log.Fatal(err)
	}
}

// driverName asks the driver for its name, retrying while its socket does
// not answer yet (the containers of a pod start in any order).
func driverName(address string, timeout time.Duration) (string, error) {
	conn, err := csiconn.Dial(address)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	client := csi.NewIdentityClient(conn)
	for attempt := 1; ; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		resp, err := client.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil {
			if resp.GetName() == "" {
				return "", fmt.Errorf("the driver at %s returned an empty name", address)
			}
			return resp.GetName(), nil
		}
		if attempt%10 == 1 {
			log.Printf("waiting for the CSI driver at %s: %v", address, err)
		}
		time.Sleep(time.Second)
	}
}

// serveHealth answers 200 while the registration socket accepts connections.
func serveHealth(addr, socketPath string) {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		conn, err := net.DialTimeout("unix", socketPath, time.Second)
		if err != nil {
			http.Error(w, fmt.Sprintf("registration socket: %v", err), http.StatusInternalServerError)
			return
		}
		conn.Close()
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte("ok"))
	})
	if err := http.ListenAndServe(addr, mux); err != nil {
		log.Fatalf("serving /healthz on %s: %v", addr, err)
	}
}
