// Package csiconn dials a CSI driver's Unix socket, the one piece both
// stand-in sidecars share.
package csiconn

import (
	"context"
	"fmt"
	"net"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Path strips an optional unix:// scheme: the chart passes a bare path, the
// upstream sidecars accept both.
func Path(address string) string {
	if rest, ok := strings.CutPrefix(address, "unix://"); ok {
		return rest
	}
	return address
}

// Dial returns a client connection to the socket. gRPC connects lazily, so
// a driver that is not listening yet shows up as an error on the first call.
func Dial(address string) (*grpc.ClientConn, error) {
	path := Path(address)
	dialer := func(ctx context.Context, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}
	conn, err := grpc.NewClient("passthrough:///"+path,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(dialer))
	if err != nil {
		return nil, fmt.Errorf("dialing %s: %w", path, err)
	}
	return conn, nil
}

// Retry calls fn until it succeeds or the deadline passes, with a fixed
// pause between attempts; the driver container may start after the sidecar.
func Retry(deadline time.Duration, pause time.Duration, fn func() error) error {
	end := time.Now().Add(deadline)
	for {
		err := fn()
		if err == nil || time.Now().After(end) {
			return err
		}
		time.Sleep(pause)
	}
}
