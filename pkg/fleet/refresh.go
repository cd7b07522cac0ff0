package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"
)

// ErrNoExecutor is what RefreshNode returns when no executor drives the node.
var ErrNoExecutor = errors.New("no executor drives the node")

// NodeRefreshSubject is where the executor driving node takes requests to read the
// node's inventory again; it answers each with a NodeRefreshReply once it has.
func NodeRefreshSubject(node string) string { return "fleet.node.refresh." + node }

// nodeRefreshedPrefix starts the subjects that the answers of refresh requests go
// to: fleet.node.refreshed.<node>.<token>.
const nodeRefreshedPrefix = "fleet.node.refreshed"

// RefreshNode asks the executor driving node to read the node's inventory again, and
// returns its answer; ErrNoExecutor when no executor drives the node. The answer
// comes on a subject of its own under fleet.node.refreshed rather than an inbox, so
// that it crosses the leaf-node link of a region (which carries only the subjects an
// executor may publish) and no executor may publish to another service's inbox.
func RefreshNode(ctx context.Context, nc *nats.Conn, node string) (NodeRefreshReply, error) {
	answers := make(chan *nats.Msg, 1)
	reply := nodeRefreshedPrefix + "." + node + "." + nuid.Next()
	sub, err := nc.ChanSubscribe(reply, answers)
	if err != nil {
		return NodeRefreshReply{}, fmt.Errorf("refresh node %s: %w", node, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.PublishRequest(NodeRefreshSubject(node), reply, nil); err != nil {
		return NodeRefreshReply{}, fmt.Errorf("refresh node %s: %w", node, err)
	}
	select {
	case <-ctx.Done():
		return NodeRefreshReply{}, fmt.Errorf("refresh node %s: no answer: %w", node, ctx.Err())
	case m := <-answers:
		if m.Header.Get("Status") == "503" {
			return NodeRefreshReply{}, fmt.Errorf("refresh node %s: %w", node, ErrNoExecutor)
		}
		var out NodeRefreshReply
		if err := json.Unmarshal(m.Data, &out); err != nil {
			return NodeRefreshReply{}, fmt.Errorf("refresh node %s: undecodable answer: %w", node, err)
		}
		return out, nil
	}
}
