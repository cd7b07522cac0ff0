package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
)

const apikeyUsage = "apikey: use 'comfyfleet apikey create --tenant NAME --role read|submit|admin', 'apikey list' or 'apikey revoke ID'"

// runAPIKey manages API keys straight in the fleet's NATS, without the API: it is
// how the first key of a fleet is made.
func runAPIKey(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("%s", apikeyUsage)
	}
	fs := flag.NewFlagSet("apikey "+args[0], flag.ContinueOnError)
	var (
		run        func(*tenancy.Store) error
		positional []string
	)
	switch args[0] {
	case "create":
		tenant := fs.String("tenant", "", "tenant the key acts for (created if new)")
		role := fs.String("role", "submit", "read, submit or admin")
		name := fs.String("name", "", "a label for the key")
		run = func(store *tenancy.Store) error {
			return createKey(ctx, store, *tenant, tenancy.Role(*role), *name, stdout)
		}
	case "list":
		run = func(store *tenancy.Store) error { return listKeys(ctx, store, stdout) }
	case "revoke":
		run = func(store *tenancy.Store) error {
			if len(positional) != 1 {
				return fmt.Errorf("apikey revoke: give the key's ID, as 'apikey list' shows it")
			}
			k, err := store.Revoke(ctx, positional[0])
			if err != nil {
				return fmt.Errorf("revoke %s: %w", positional[0], err)
			}
			fmt.Fprintf(stdout, "revoked API key %s (tenant %s, role %s)\n", k.ID, k.Tenant, k.Role)
			return nil
		}
	default:
		return fmt.Errorf("%s", apikeyUsage)
	}
	var sf serviceFlags
	sf.register(fs)
	positional, err := parseArgs(fs, args[1:])
	if err != nil {
		return err
	}
	if args[0] != "revoke" && len(positional) > 0 {
		return fmt.Errorf("apikey %s takes no argument %q", args[0], positional[0])
	}
	svc, err := sf.start(ctx, "apikey", stderr)
	if err != nil {
		return err
	}
	defer svc.close()
	js, err := jetstream.New(svc.conn)
	if err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	// A NATS cluster just started elects its JetStream leader first: wait for it, a
	// minute at most.
	wait, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var store *tenancy.Store
	if err := fleet.Retry(wait, svc.log, "reach JetStream", func(ctx context.Context) error {
		if err := fleet.Ensure(ctx, js, svc.settings); err != nil {
			return err
		}
		store, err = tenancy.Open(ctx, js)
		return err
	}); err != nil {
		return err
	}
	return run(store)
}

func createKey(ctx context.Context, store *tenancy.Store, tenant string, role tenancy.Role, name string, stdout io.Writer) error {
	key, k, err := store.CreateKey(ctx, tenant, role, name)
	if err != nil {
		return err
	}
	t, err := store.Tenant(ctx, k.Tenant)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "API key (shown once; send as Authorization: Bearer <key>):\n  %s\nid %s, tenant %s, role %s\nwebhook signing secret of tenant %s (Standard Webhooks):\n  %s\n",
		key, tenancy.ShortID(key), k.Tenant, k.Role, k.Tenant, t.WebhookSecret)
	return nil
}

func listKeys(ctx context.Context, store *tenancy.Store, stdout io.Writer) error {
	keys, err := store.Keys(ctx)
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tTENANT\tROLE\tNAME\tCREATED")
	for _, k := range keys {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", k.ID, k.Tenant, k.Role, k.Name, k.Created.Local().Format("2006-01-02 15:04"))
	}
	return w.Flush()
}
