package fleet

import (
	"context"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// OpenObject opens the object name of store for a read that lasts as long as ctx
// allows and at most ObjectReadTime of its size; finding the object may take up to
// objectFindTimeout. The object store's own Get, given a context without a deadline,
// cuts the whole read at the JetStream client's default timeout (5 s) whatever the
// object's size. Closing the result ends the read. A missing object is
// jetstream.ErrObjectNotFound.
func OpenObject(ctx context.Context, store jetstream.ObjectStore, name string) (jetstream.ObjectResult, *jetstream.ObjectInfo, error) {
	find, cancel := context.WithTimeout(ctx, objectFindTimeout)
	info, err := store.GetInfo(find, name)
	cancel()
	if err != nil {
		return nil, nil, err
	}
	read, cancel := context.WithTimeout(ctx, ObjectReadTime(info.Size))
	res, err := store.Get(read, name)
	if err == nil {
		if info, err = res.Info(); err != nil {
			res.Close()
		}
	}
	if err != nil {
		cancel()
		return nil, nil, err
	}
	return &objectReading{ObjectResult: res, cancel: cancel}, info, nil
}

// objectFindTimeout bounds finding an object: generous, for a server that a loaded
// host starves for seconds.
const objectFindTimeout = 30 * time.Second

// ObjectReadTime is the longest a read of an object of size bytes may take: a
// minute, and a second for each MiB. It also bounds how long a read waits on a
// server that stopped sending.
func ObjectReadTime(size uint64) time.Duration {
	return time.Minute + time.Duration(size>>20)*time.Second
}

// objectReading is an object being read; Close ends the read's context too.
type objectReading struct {
	jetstream.ObjectResult
	cancel context.CancelFunc
}

func (r *objectReading) Close() error {
	defer r.cancel()
	return r.ObjectResult.Close()
}
