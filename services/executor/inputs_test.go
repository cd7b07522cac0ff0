package executor

import (
	"errors"
	"fmt"
	"testing"

	"github.com/comfyfleet/comfyfleet/pkg/comfy"
)

func TestInputFailuresAreClassifiedByTheirCause(t *testing.T) {
	t.Parallel()
	refused := &comfy.HTTPError{Op: "upload image", StatusCode: 400}
	for name, tc := range map[string]struct {
		err       error
		permanent bool
	}{
		"upload refused by the node": {fmt.Errorf("fetch input image: %w", &inputError{err: fmt.Errorf("upload: %w", refused)}), false},
		"image gone from its server": {&inputError{err: &comfy.HTTPError{StatusCode: 404}, permanent: true}, true},
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
