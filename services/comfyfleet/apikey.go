package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
)

func runAPIKey(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) == 0 || args[0] != "create" {
		return fmt.Errorf("apikey: use 'comfyfleet apikey create --tenant NAME --role read|submit|admin'")
	}
	fs := flag.NewFlagSet("apikey create", flag.ContinueOnError)
	tenant := fs.String("tenant", "", "tenant the key acts for (created if new)")
	role := fs.String("role", "submit", "read, submit or admin")
	name := fs.String("name", "", "a label for the key")
	var sf serviceFlags
	sf.register(fs)
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	svc, err := sf.start(ctx, "apikey", os.Stderr)
	if err != nil {
		return err
	}
	defer svc.close()
	js, err := jetstream.New(svc.conn)
	if err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	if err := fleet.Ensure(ctx, js, svc.settings); err != nil {
		return err
	}
	store, err := tenancy.Open(ctx, js)
	if err != nil {
		return err
	}
	key, k, err := store.CreateKey(ctx, *tenant, tenancy.Role(*role), *name)
	if err != nil {
		return err
	}
	t, err := store.Tenant(ctx, k.Tenant)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "API key (shown once; send as Authorization: Bearer <key>):\n  %s\ntenant %s, role %s\nwebhook signing secret of tenant %s (Standard Webhooks):\n  %s\n",
		key, k.Tenant, k.Role, k.Tenant, t.WebhookSecret)
	return nil
}
