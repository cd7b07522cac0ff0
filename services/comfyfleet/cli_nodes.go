package main

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/comfyfleet/comfyfleet/services/intake"
)

// runNodes lists, adds, drains, undrains and removes ComfyUI nodes.
func runNodes(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return subcommand(ctx, "nodes", map[string]func(context.Context, []string, io.Writer, io.Writer) error{
		"list":    runNodesList,
		"add":     runNodesAdd,
		"drain":   nodeAction("drain", "POST", "/drain", "drained: it finishes what it holds and takes nothing new"),
		"undrain": nodeAction("undrain", "POST", "/undrain", "undrained: it takes scenes again"),
		"rm":      nodeAction("rm", "DELETE", "", "removed"),
	}, args, stdout, stderr)
}

func runNodesList(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := commandFlags("nodes list", "[--json] [flags]", stderr)
	var cf clientFlags
	asJSON := fs.Bool("json", false, "print the API's JSON answer")
	cf.register(fs)
	if err := noArgs(fs, args); err != nil {
		return err
	}
	c, err := cf.client()
	if err != nil {
		return err
	}
	var list struct {
		Nodes []intake.Node `json:"nodes"`
	}
	if err := c.call(ctx, "GET", "/v1/nodes", nil, &list); err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, list)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tSTATUS\tPOOLS\tWEIGHT\tREGION\tHOLDING\tSCENE\tDONE\tS/SCENE\tMODEL\tHEARTBEAT\tURL")
	for _, n := range list.Nodes {
		h := n.Health
		status := h.Status
		if n.Drained && status != "draining" {
			status += " (drained)"
		}
		if !n.Registered {
			status += " (not registered)"
		}
		if h.Error != "" {
			status += ": " + shorten(h.Error, 40)
		}
		speed := "-"
		if h.SecondsPerScene > 0 {
			speed = fmt.Sprintf("%.1f", h.SecondsPerScene)
		}
		beat := "-"
		if h.LastHeartbeat != nil {
			beat = time.Since(*h.LastHeartbeat).Round(time.Second).String() + " ago"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%g\t%s\t%d\t%s\t%d\t%s\t%s\t%s\t%s\n", n.ID, status, strings.Join(n.Pools, ","), n.Weight,
			orDash(n.Region), h.Holding, orDash(h.Scene), h.ScenesDone, speed, orDash(h.Model), beat, n.URL)
	}
	return tw.Flush()
}

func runNodesAdd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := commandFlags("nodes add", "NODE --url URL [--pool POOL]… [--weight W] [--region R] [--label NAME=VALUE]… [flags]", stderr)
	var (
		cf     clientFlags
		pools  listFlag
		labels listFlag
	)
	nodeURL := fs.String("url", "", "base URL of the node's ComfyUI, such as http://10.0.0.5:8188")
	weight := fs.Float64("weight", 0, "relative speed: 4 for a GPU four times as fast as one of weight 1 (default 1)")
	fs.Var(&pools, "pool", "a pool whose scenes the node runs, such as image or video (repeatable, or comma-separated; default image)")
	region := fs.String("region", "", "where the node is, such as shenzhen: scenes that require a region run only on its nodes")
	fs.Var(&labels, "label", "a label, name=value, such as gpu=a100 (repeatable)")
	cf.register(fs)
	c, id, err := idArg(fs, &cf, args, "node")
	if err != nil {
		return err
	}
	if *nodeURL == "" {
		return fmt.Errorf("nodes add: give the node's ComfyUI URL with --url")
	}
	body := intake.NodeInput{URL: *nodeURL, Weight: *weight, Region: *region}
	for _, p := range pools {
		for _, name := range strings.Split(p, ",") {
			if name = strings.TrimSpace(name); name != "" {
				body.Pools = append(body.Pools, name)
			}
		}
	}
	for _, kv := range labels {
		name, value, ok := strings.Cut(kv, "=")
		if !ok {
			return fmt.Errorf("--label %q: write name=value", kv)
		}
		if body.Labels == nil {
			body.Labels = map[string]string{}
		}
		body.Labels[name] = value
	}
	var node intake.Node
	if err := c.call(ctx, "PUT", "/v1/nodes/"+url.PathEscape(id), body, &node); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "node %s: %s, pools %s, weight %g\n", node.ID, node.URL, strings.Join(node.Pools, ","), node.Weight)
	return nil
}

// nodeAction is a command that calls method on the node's path plus suffix and
// prints what happened to the node.
func nodeAction(name, method, suffix, done string) func(context.Context, []string, io.Writer, io.Writer) error {
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		fs := commandFlags("nodes "+name, "NODE [flags]", stderr)
		var cf clientFlags
		cf.register(fs)
		c, id, err := idArg(fs, &cf, args, "node")
		if err != nil {
			return err
		}
		if err := c.call(ctx, method, "/v1/nodes/"+url.PathEscape(id)+suffix, nil, nil); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "node %s %s\n", id, done)
		return nil
	}
}
