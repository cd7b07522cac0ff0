//go:build !linux

package dispatcher

import "time"

// threadCPU returns the CPU time the calling OS thread has used, and false where the
// system cannot tell.
func threadCPU() (time.Duration, bool) { return 0, false }
