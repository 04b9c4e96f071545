// Command livenessprobe is a stand-in for kubernetes-csi/livenessprobe,
// written for nbd-csi's cluster tests because the Go module proxy does not
// serve the upstream module (every version answers 403) and GitHub cannot
// be reached from the test machines. It is not the upstream program; it
// accepts the flags nbd-csi's chart passes and behaves as the upstream one
// does for them: GET /healthz calls the driver's CSI Identity Probe and
// answers 200 when the driver is ready, 500 otherwise.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"

	"nbd-csi.local/standins/internal/csiconn"
)

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "CSI driver socket (path or unix:// URL)")
	httpEndpoint := flag.String("http-endpoint", "", "address to serve /healthz on, e.g. :9808 (overrides --health-port)")
	healthPort := flag.Int("health-port", 9808, "port to serve /healthz on when --http-endpoint is empty")
	probeTimeout := flag.Duration("probe-timeout", time.Second, "timeout of each Probe call")
	verbosity := flag.Int("v", 0, "log verbosity (klog style; 4 or more logs every probe)")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println("livenessprobe stand-in (nbd-csi tests/cluster/images/standins)")
		return
	}
	addr := *httpEndpoint
	if addr == "" {
		addr = ":" + strconv.Itoa(*healthPort)
	}

	conn, err := csiconn.Dial(*csiAddress)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()

	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), *probeTimeout)
		defer cancel()
		if err := probe(ctx, conn); err != nil {
			log.Printf("health check failed: %v", err)
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		if *verbosity >= 4 {
			log.Printf("health check succeeded")
		}
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte("ok"))
	})

	listener, err := net.Listen("tcp", addr)
	if err != nil {
		log.Fatalf("listening on %s: %v", addr, err)
	}
	log.Printf("serving /healthz on %s for the CSI driver at %s", listener.Addr(), csiconn.Path(*csiAddress))
	if err := http.Serve(listener, nil); err != nil {
		log.Print(err)
		os.Exit(1)
	}
}

// probe is healthy when Probe succeeds and does not say "not ready" (an
// absent ready field means ready, as in the CSI spec).
func probe(ctx context.Context, conn *grpc.ClientConn) error {
	resp, err := csi.NewIdentityClient(conn).Probe(ctx, &csi.ProbeRequest{})
	if err != nil {
		return fmt.Errorf("CSI Probe: %w", err)
	}
	if ready := resp.GetReady(); ready != nil && !ready.GetValue() {
		return fmt.Errorf("CSI Probe: driver is not ready")
	}
	return nil
}
