//go:build !linux

package main

import "errors"

// lowerPriority gives every thread of this process the nice value n; only on Linux.
func lowerPriority(int) error {
	return errors.New("lower priority: only on Linux")
}
