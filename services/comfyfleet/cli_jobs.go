package main

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/api"
)

// runJobs lists, shows, cancels, deletes, retries and follows jobs.
func runJobs(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return subcommand(ctx, "jobs", map[string]func(context.Context, []string, io.Writer, io.Writer) error{
		"list":   runJobsList,
		"get":    runJobsGet,
		"cancel": runJobsCancel,
		"delete": runJobsDelete,
		"retry":  runJobsRetry,
		"watch":  runJobsWatch,
	}, args, stdout, stderr)
}

func runJobsList(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := commandFlags("jobs list", "[--status S] [--tenant T] [--since 24h] [--limit N] [--cursor C] [flags]", stderr)
	var cf clientFlags
	status := fs.String("status", "", "only jobs in this state: queued, running, succeeded, failed or cancelled")
	tenant := fs.String("tenant", "", "another tenant's jobs: admin keys only (default: the key's tenant)")
	since := fs.String("since", "", "only jobs created since: a duration back from now (24h) or an RFC 3339 time")
	limit := fs.Int("limit", 50, "most jobs on a page")
	cursor := fs.String("cursor", "", "the page after this cursor (printed at the end of the previous page)")
	asJSON := fs.Bool("json", false, "print the API's JSON answer")
	cf.register(fs)
	if err := noArgs(fs, args); err != nil {
		return err
	}
	c, err := cf.client()
	if err != nil {
		return err
	}
	q := url.Values{}
	for k, v := range map[string]string{"status": *status, "tenant": *tenant, "cursor": *cursor} {
		if v != "" {
			q.Set(k, v)
		}
	}
	if *since != "" {
		t, err := parseSince(*since, time.Now())
		if err != nil {
			return err
		}
		q.Set("since", t.UTC().Format(time.RFC3339))
	}
	if *limit > 0 {
		q.Set("limit", strconv.Itoa(*limit))
	}
	var page api.JobPage
	if err := c.call(ctx, "GET", "/v1/jobs?"+q.Encode(), nil, &page); err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, page)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "JOB\tTENANT\tSTATUS\tPRIORITY\tSCENES\tCREATED\tFINISHED")
	for _, j := range page.Jobs {
		done := fmt.Sprintf("%d/%d", j.Succeeded, j.Scenes)
		if j.Failed > 0 {
			done += fmt.Sprintf(" (%d failed)", j.Failed)
		}
		if j.Cancelled > 0 {
			done += fmt.Sprintf(" (%d cancelled)", j.Cancelled)
		}
		finished := "-"
		if j.FinishedAt != nil {
			finished = j.FinishedAt.Local().Format(time.DateTime)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\n", j.ID, j.Tenant, j.Status, j.Priority, done, j.CreatedAt.Local().Format(time.DateTime), finished)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if page.NextCursor != "" {
		fmt.Fprintf(stdout, "more: --cursor %s\n", page.NextCursor)
	}
	return nil
}

// parseSince reads --since: a duration back from now, or an RFC 3339 time.
func parseSince(v string, now time.Time) (time.Time, error) {
	if d, err := time.ParseDuration(v); err == nil && d >= 0 {
		return now.Add(-d), nil
	}
	t, err := time.Parse(time.RFC3339, v)
	if err != nil {
		return time.Time{}, fmt.Errorf("--since %q: give a duration (24h) or an RFC 3339 time (2026-12-01T09:00:00Z)", v)
	}
	return t, nil
}

func runJobsGet(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := commandFlags("jobs get", "JOB [flags]", stderr)
	var cf clientFlags
	asJSON := fs.Bool("json", false, "print the API's JSON answer")
	cf.register(fs)
	c, id, err := idArg(fs, &cf, args, "job")
	if err != nil {
		return err
	}
	var job api.Job
	if err := c.call(ctx, "GET", api.JobPath(id), nil, &job); err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, job)
	}
	printJob(stdout, job)
	return nil
}

// printJob prints a job and its scenes; printOutcome's table, and each scene's
// progress while it runs.
func printJob(w io.Writer, job api.Job) {
	printOutcome(w, job)
	for _, s := range job.Scenes {
		if s.Progress != nil && s.Status == "running" {
			fmt.Fprintf(w, "scene %d: step %d/%d on %s\n", s.Index, s.Progress.Value, s.Progress.Max, s.Node)
		}
	}
}

func runJobsCancel(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := commandFlags("jobs cancel", "JOB [flags]", stderr)
	var cf clientFlags
	cf.register(fs)
	c, id, err := idArg(fs, &cf, args, "job")
	if err != nil {
		return err
	}
	var job api.Job
	if err := c.call(ctx, "POST", api.JobPath(id)+"/cancel", nil, &job); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "job %s cancelled: its scenes that had not ended are stopped\n", job.ID)
	return nil
}

func runJobsDelete(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := commandFlags("jobs delete", "JOB [--cancel] [flags]", stderr)
	var cf clientFlags
	cancel := fs.Bool("cancel", false, "cancel the job first if it has not ended (otherwise such a job is not deleted)")
	cf.register(fs)
	c, id, err := idArg(fs, &cf, args, "job")
	if err != nil {
		return err
	}
	path := api.JobPath(id)
	if *cancel {
		path += "?cancel=true"
	}
	if err := c.call(ctx, "DELETE", path, nil, nil); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "job %s deleted, with its inputs and outputs\n", id)
	return nil
}

func runJobsRetry(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := commandFlags("jobs retry", "JOB INDEX [--wait] [flags]", stderr)
	var cf clientFlags
	wait := fs.Bool("wait", false, "follow the job to its end again")
	cf.register(fs)
	positional, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(positional) != 2 {
		return fmt.Errorf("jobs retry: give the job and the scene index: comfyfleet jobs retry JOB INDEX")
	}
	index, err := strconv.Atoi(positional[1])
	if err != nil || index < 0 {
		return fmt.Errorf("jobs retry: scene index %q is not a number from 0", positional[1])
	}
	c, err := cf.client()
	if err != nil {
		return err
	}
	id := positional[0]
	var job api.Job
	if err := c.call(ctx, "POST", fmt.Sprintf("%s/scenes/%d/retry", api.JobPath(id), index), nil, &job); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "job %s: scene %d queued again\n", job.ID, index)
	if !*wait {
		return nil
	}
	return watchJob(ctx, c, id, "", stdout, stderr)
}

func runJobsWatch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := commandFlags("jobs watch", "JOB [--out DIR] [flags]", stderr)
	var cf clientFlags
	out := fs.String("out", "", "download every output file into this directory once the job is done")
	cf.register(fs)
	c, id, err := idArg(fs, &cf, args, "job")
	if err != nil {
		return err
	}
	return watchJob(ctx, c, id, *out, stdout, stderr)
}
