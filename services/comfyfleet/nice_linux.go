package main

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// lowerPriority gives every thread of this process the nice value n, and so every
// thread it starts later, which inherits its creator's. Processes started before
// keep theirs.
func lowerPriority(n int) error {
	// Twice: a thread started during the first pass is caught by the second.
	for range 2 {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return fmt.Errorf("lower priority: %w", err)
		}
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			if err := unix.Setpriority(unix.PRIO_PROCESS, tid, n); err != nil {
				return fmt.Errorf("lower priority of thread %d: %w", tid, err)
			}
		}
	}
	return nil
}
