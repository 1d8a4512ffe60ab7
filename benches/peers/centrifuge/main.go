// A minimal Centrifuge server for the peer benchmark (benches/peers): the JSON protocol over
// WebSocket at /connection/websocket, anonymous clients, subscribe and publish allowed to every
// client (OnSubscribe, OnPublish), the memory broker or -redis HOST:PORT for the Redis broker.
// Publications are kept in history like the relay keeps deltas (-history 1000 for 600 s: the
// relay's defaults), so that an ack means the same: stored. No presence.
//
// Build (GOPATH mode, offline, against Debian's golang-*-dev packages): see benches/peers/build.py.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/centrifugal/centrifuge"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	redisAddr := flag.String("redis", "", "Redis HOST:PORT for the Redis broker (empty: memory broker)")
	historySize := flag.Int("history", 1000, "publications kept per channel (0: none)")
	historyTTL := flag.Duration("history-ttl", 600*time.Second, "and for this long")
	flag.Parse()

	cfg := centrifuge.DefaultConfig
	cfg.LogLevel = centrifuge.LogLevelError
	cfg.LogHandler = func(e centrifuge.LogEntry) { log.Printf("%s: %v", e.Message, e.Fields) }
	node, err := centrifuge.New(cfg)
	if err != nil {
		log.Fatal(err)
	}
	node.OnConnecting(func(ctx context.Context, e centrifuge.ConnectEvent) (centrifuge.ConnectReply, error) {
		return centrifuge.ConnectReply{Credentials: &centrifuge.Credentials{UserID: ""}}, nil
	})
	node.OnConnect(func(client *centrifuge.Client) {
		client.OnSubscribe(func(e centrifuge.SubscribeEvent, cb centrifuge.SubscribeCallback) {
			cb(centrifuge.SubscribeReply{}, nil)
		})
		client.OnPublish(func(e centrifuge.PublishEvent, cb centrifuge.PublishCallback) {
			cb(centrifuge.PublishReply{Options: centrifuge.PublishOptions{
				HistorySize: *historySize, HistoryTTL: *historyTTL,
			}}, nil)
		})
	})
	if *redisAddr != "" {
		shard, err := centrifuge.NewRedisShard(node, centrifuge.RedisShardConfig{Address: *redisAddr})
		if err != nil {
			log.Fatal(err)
		}
		broker, err := centrifuge.NewRedisBroker(node, centrifuge.RedisBrokerConfig{Shards: []*centrifuge.RedisShard{shard}})
		if err != nil {
			log.Fatal(err)
		}
		node.SetBroker(broker)
	}
	if err := node.Run(); err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/connection/websocket", centrifuge.NewWebsocketHandler(node, centrifuge.WebsocketConfig{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(200) })
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	// The harness reads the port from this line.
	fmt.Fprintf(os.Stderr, "centrifuge serving ws://%s/connection/websocket\n", ln.Addr())
	go func() { _ = http.Serve(ln, mux) }()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	_ = node.Shutdown(context.Background())
}
