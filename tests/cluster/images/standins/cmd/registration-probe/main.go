// Command registration-probe plays the kubelet's plugin watcher against a
// registration socket, for tests/cluster/images.sh: it calls GetInfo, prints
// the answer as JSON, and with --notify reports a successful registration,
// with --fail a failed one (the registrar must then exit 1).
// A test tool only; no image holds it.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"time"

	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"nbd-csi.local/standins/internal/csiconn"
)

func main() {
	socket := flag.String("socket", "", "registration socket (<dir>/<driver>-reg.sock)")
	wait := flag.Duration("wait", 10*time.Second, "how long to wait for the socket to answer")
	notify := flag.Bool("notify", false, "call NotifyRegistrationStatus(registered) after GetInfo")
	fail := flag.Bool("fail", false, "call NotifyRegistrationStatus(not registered) after GetInfo")
	flag.Parse()
	if *socket == "" {
		log.Fatal("--socket is required")
	}
	conn, err := csiconn.Dial(*socket)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	client := registerapi.NewRegistrationClient(conn)
	var info *registerapi.PluginInfo
	err = csiconn.Retry(*wait, 200*time.Millisecond, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		info, err = client.GetInfo(ctx, &registerapi.InfoRequest{})
		return err
	})
	if err != nil {
		log.Fatalf("GetInfo on %s: %v", *socket, err)
	}
	out, _ := json.Marshal(map[string]any{
		"type":               info.Type,
		"name":               info.Name,
		"endpoint":           info.Endpoint,
		"supported_versions": info.SupportedVersions,
	})
	fmt.Println(string(out))
	if *notify || *fail {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		status := &registerapi.RegistrationStatus{PluginRegistered: *notify && !*fail}
		if !status.PluginRegistered {
			status.Error = "registration-probe --fail"
		}
		// The registrar exits on a failure, so that call may end without an answer.
		if _, err := client.NotifyRegistrationStatus(ctx, status); err != nil && status.PluginRegistered {
			log.Fatalf("NotifyRegistrationStatus: %v", err)
		}
	}
	os.Exit(0)
}
