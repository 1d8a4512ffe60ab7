#!/bin/sh
# The Redis Cluster kit in docker mode (docker-compose.cluster.yml), for the Makefile's
# cluster-* targets when a Docker engine answers:
#
#   sh kit/cluster-compose.sh wait            until cluster_state:ok and the relay is healthy
#   sh kit/cluster-compose.sh status          each node's role, the cluster's state, /healthz
#   sh kit/cluster-compose.sh failover-test   SIGKILL the primary of the test room's slot,
#                                             time the promotion, check acknowledged writes
#
# Node N is the container kasagi-cluster-N on port 700N, announcing its container name as
# hostname (so CLUSTER NODES names containers). Local mode (no engine) is kit/clusterkit.py,
# whose failover-test also writes through the kasagi library during the failover; this one
# writes INCR + WAIT 1 (what --ack replica waits for) before the kill and checks that every
# acknowledged increment survives the promotion.
set -eu

ROOM_KEY='{kit-cluster-failover}:counter'
RELAY=kasagi-cluster-relay

cli() { # cli N ARGS...: redis-cli on node N
    n=$1
    shift
    docker exec "kasagi-cluster-$n" redis-cli -p "700$n" "$@"
}

state_ok() { cli "$1" cluster info 2>/dev/null | grep -q 'cluster_state:ok'; }

relay_health() {
    docker exec "$RELAY" python -c "import urllib.request as u
try:
    r = u.urlopen('http://127.0.0.1:8766/healthz', timeout=2); print(r.status, r.read().decode())
except Exception as e:
    print(getattr(e, 'code', 'down'), e)"
}

primary_of() { # primary_of SLOT ASKING-NODE: the container name of the slot's primary
    cli "$2" cluster nodes | awk -v s="$1" '
        $3 ~ /master/ && $3 !~ /fail/ {
            for (i = 9; i <= NF; i++) {
                n = split($i, r, "-"); if (n == 1) r[2] = r[1]
                if (s + 0 >= r[1] + 0 && s + 0 <= r[2] + 0) { split($2, a, ","); print a[2]; exit }
            }
        }'
}

cmd_wait() {
    i=0
    until state_ok 1 && [ "$(docker inspect -f '{{.State.Health.Status}}' "$RELAY" 2>/dev/null)" = healthy ]; do
        i=$((i + 1))
        if [ "$i" -gt 120 ]; then
            echo "the cluster or the relay is not ready after 120 s: make cluster-status" >&2
            exit 1
        fi
        sleep 1
    done
    echo "cluster_state:ok, relay healthy"
}

cmd_status() {
    for n in 1 2 3 4 5 6; do
        role=$(cli "$n" info replication 2>/dev/null | tr -d '\r' | grep '^role:' || echo 'role:down')
        echo "kasagi-cluster-$n:700$n $role"
    done
    cli 1 cluster info | tr -d '\r' | grep -E '^cluster_(state|slots_ok|known_nodes|size):'
    echo "relay /healthz: $(relay_health)"
    state_ok 1
}

cmd_failover_test() {
    state_ok 1 || { echo "the cluster is not ok: make cluster-status" >&2; exit 1; }
    slot=$(cli 1 cluster keyslot "$ROOM_KEY" | tr -d '\r')
    victim=$(primary_of "$slot" 1)
    [ -n "$victim" ] || { echo "no primary found for slot $slot" >&2; exit 1; }
    vn=${victim#kasagi-cluster-}
    other=1
    [ "$vn" = 1 ] && other=2
    acked=0
    for _ in $(seq 200); do
        # One connection: INCR, then WAIT 1 on it (the acknowledgement --ack replica waits for).
        out=$(printf 'INCR %s\nWAIT 1 1000\n' "$ROOM_KEY" | docker exec -i "$victim" redis-cli -p "700$vn" | tr -d '\r')
        value=$(echo "$out" | sed -n 1p)
        replicas=$(echo "$out" | sed -n 2p)
        [ "${replicas:-0}" -ge 1 ] && acked=$value
    done
    echo "slot $slot: primary $victim; last acknowledged value $acked; SIGKILL"
    t0=$(date +%s.%N)
    docker kill --signal KILL "$victim" >/dev/null
    i=0
    while :; do
        now=$(primary_of "$slot" "$other")
        if [ -n "$now" ] && [ "$now" != "$victim" ] && state_ok "$other"; then break; fi
        i=$((i + 1))
        [ "$i" -gt 600 ] && { echo "no replica promoted after 60 s" >&2; exit 1; }
        sleep 0.1
    done
    t1=$(date +%s.%N)
    nn=${now#kasagi-cluster-}
    value=$(cli "$nn" get "$ROOM_KEY" | tr -d '\r')
    echo "promoted $now in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s; value there: $value"
    docker start "$victim" >/dev/null
    i=0
    until cli "$vn" info replication 2>/dev/null | grep -q '^role:slave'; do
        i=$((i + 1))
        [ "$i" -gt 120 ] && { echo "$victim did not rejoin as a replica" >&2; exit 1; }
        sleep 0.5
    done
    echo "$victim rejoined as a replica"
    if [ "$value" -ge "$acked" ]; then
        echo "PASS: no acknowledged write lost ($value >= $acked)"
    else
        echo "FAIL: acknowledged writes lost ($value < $acked)" >&2
        exit 1
    fi
}

case "${1:-}" in
    wait) cmd_wait ;;
    status) cmd_status ;;
    failover-test) cmd_failover_test ;;
    *) echo "usage: sh kit/cluster-compose.sh wait|status|failover-test" >&2; exit 2 ;;
esac
