package executor

import (
	"errors"
	"fmt"
	"testing"

	"github.com/comfyfleet/comfyfleet/pkg/comfy"
)

func TestFileFailuresAreClassifiedByTheirCause(t *testing.T) {
	t.Parallel()
	refused := &comfy.HTTPError{Op: "upload image", StatusCode: 400}
	for name, tc := range map[string]struct {
		err       error
		permanent bool
	}{
		"upload refused by the node": {fmt.Errorf("fetch input image: %w", &fileError{err: fmt.Errorf("upload: %w", refused)}), false},
		"image gone from its server": {&fileError{err: &comfy.HTTPError{StatusCode: 404}, permanent: true}, true},
		"output lost by its node":    {fmt.Errorf("store: %w", &fileError{err: &comfy.HTTPError{Op: "view", StatusCode: 404}}), false},
		"prompt rejected":            {fmt.Errorf("run: %w", &comfy.RejectedError{Type: "invalid_prompt"}), true},
		"node unreachable":           {errors.New("dial tcp: connection refused"), false},
	} {
		if got := isPermanent(tc.err); got != tc.permanent {
			t.Errorf("%s: isPermanent = %v, want %v", name, got, tc.permanent)
		}
	}
	if !comfy.IsPermanent(refused) {
		t.Fatal("the comfy client no longer sees a 400 as permanent; this test lost its point")
	}
}
