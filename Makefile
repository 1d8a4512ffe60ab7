# kasagi-relay: the Redis Sentinel deployment kit, plus the project's test/bench/wheel.
#
# Two modes, picked per run (the first line of every kit target says which):
#   docker  a Docker engine answers `docker info`: docker-compose.yml runs the topology.
#   local   no engine: kit/localkit.py (run as `python -m kit.localkit`) runs the same topology
#           as local processes of the OS's redis-server, from the same config files, through the
#           shared launcher kit/topology.py, with PID files under $(STATE_DIR).
# Force one with MODE=docker or MODE=local.
#
# Local mode, when 6379 & co. are taken (they are on most developer machines):
#   make up REDIS_PORT=7379 REPLICA_1_PORT=7380 REPLICA_2_PORT=7381 \
#           SENTINEL_1_PORT=27379 SENTINEL_2_PORT=27380 SENTINEL_3_PORT=27381
# `up` records the ports in $(STATE_DIR)/kit.json; the other targets read them from there.

SHELL := /bin/sh

# ---- topology (the same numbers as docker-compose.yml and redis/, sentinel/) -----------------
MASTER_NAME      ?= kasagi-master
QUORUM           ?= 2
NETWORK          ?= kasagi-network
REDIS_PORT       ?= 6379
REPLICA_1_PORT   ?= 6380
REPLICA_2_PORT   ?= 6381
SENTINEL_1_PORT  ?= 26379
SENTINEL_2_PORT  ?= 26380
SENTINEL_3_PORT  ?= 26381
RELAY_PORT       ?= 8765
# The Redis Cluster kit (local mode): 3 primaries + 3 replicas, and a relay on its own port.
CLUSTER_PORTS      ?= 7001,7002,7003,7004,7005,7006
CLUSTER_RELAY_PORT ?= 8766
CLUSTER_STATE_DIR  ?= .kit-cluster
CLUSTER_NODE_TIMEOUT_MS ?= 5000

# ---- local mode ------------------------------------------------------------------------------
STATE_DIR        ?= .kit
# Sentinel's down-after-milliseconds in local mode (the configs say 5000; tests use 1000).
DOWN_AFTER_MS    ?= 5000
REDIS_SERVER     ?= redis-server
REDIS_CLI        ?= redis-cli
# The relay command; empty (`make up RELAY=`) brings up Redis and Sentinels only.
RELAY            ?= .venv/bin/kasagi-relay
RELAY_ARGS       ?=
# The kit's python: up/status/down need only the standard library (any python3); the relay
# half of failover-test talks to the relay with the project's client (kasagi_relay.client),
# so it needs .venv's python, and says so in one line when run with another.
PYTHON           ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

# ---- mode detection --------------------------------------------------------------------------
ifeq ($(origin MODE),undefined)
  DOCKER_ENGINE := $(shell docker info >/dev/null 2>&1 && echo yes)
  ifeq ($(DOCKER_ENGINE),yes)
    MODE := docker
    MODE_WHY := a Docker engine answered docker info
  else
    MODE := local
    MODE_WHY := no Docker engine answered docker info; local redis-server processes, state in $(STATE_DIR)
  endif
else
  MODE_WHY := MODE=$(MODE) given
endif
ifeq ($(MODE),docker)
  COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
endif

SAY_MODE = @echo "mode: $(MODE) ($(MODE_WHY))"
KIT = $(PYTHON) -m kit.localkit
KIT_STATE = --state-dir "$(STATE_DIR)"
KIT_UP = $(KIT_STATE) \
	--ports $(REDIS_PORT),$(REPLICA_1_PORT),$(REPLICA_2_PORT) \
	--sentinel-ports $(SENTINEL_1_PORT),$(SENTINEL_2_PORT),$(SENTINEL_3_PORT) \
	--relay-port $(RELAY_PORT) --down-after-ms $(DOWN_AFTER_MS) \
	--redis-server "$(REDIS_SERVER)" --relay "$(RELAY)" --relay-args "$(RELAY_ARGS)"

.PHONY: help up status failover-test down clean sentinel-status cli-sentinel logs \
	cluster-up cluster-status cluster-failover-test cluster-down test bench bench-peers wheel

help:
	$(SAY_MODE)
	@echo "kit:     make up | status | sentinel-status | cli-sentinel | failover-test | down | clean"
	@echo "cluster: make cluster-up | cluster-status | cluster-failover-test | cluster-down"
	@echo "project: make test | bench | bench-peers [PEERS_ARGS=--quick] | wheel"
	@echo "local-mode variables: REDIS_PORT REPLICA_1_PORT REPLICA_2_PORT SENTINEL_1_PORT"
	@echo "  SENTINEL_2_PORT SENTINEL_3_PORT RELAY_PORT STATE_DIR DOWN_AFTER_MS RELAY RELAY_ARGS"

ifeq ($(MODE),docker)
# ============================== docker mode ==================================================

up:
	$(SAY_MODE)
	$(COMPOSE) up -d --build --wait
	@echo "Sentinels: localhost:$(SENTINEL_1_PORT),localhost:$(SENTINEL_2_PORT),localhost:$(SENTINEL_3_PORT) (master name $(MASTER_NAME))"
	@echo "Relay: ws://localhost:$(RELAY_PORT)/ws  health http://localhost:$(RELAY_PORT)/healthz"

status:
	$(SAY_MODE)
	@$(COMPOSE) ps
	@$(KIT) status --docker

sentinel-status:
	$(SAY_MODE)
	docker exec kasagi-sentinel-1 redis-cli -p $(SENTINEL_1_PORT) SENTINEL master $(MASTER_NAME)
	docker exec kasagi-sentinel-1 redis-cli -p $(SENTINEL_1_PORT) SENTINEL replicas $(MASTER_NAME)
	docker exec kasagi-sentinel-1 redis-cli -p $(SENTINEL_1_PORT) SENTINEL sentinels $(MASTER_NAME)
	docker exec kasagi-sentinel-1 redis-cli -p $(SENTINEL_1_PORT) SENTINEL ckquorum $(MASTER_NAME)

cli-sentinel:
	$(SAY_MODE)
	docker exec -it kasagi-sentinel-1 redis-cli -p $(SENTINEL_1_PORT)

failover-test:
	$(SAY_MODE)
	@$(KIT) failover-test --docker

logs:
	$(SAY_MODE)
	$(COMPOSE) logs --tail=50

down:
	$(SAY_MODE)
	$(COMPOSE) down

clean:
	$(SAY_MODE)
	$(COMPOSE) down -v --remove-orphans

else
# ============================== local mode ===================================================

up:
	$(SAY_MODE)
	@$(KIT) up $(KIT_UP)

status:
	$(SAY_MODE)
	@$(KIT) status $(KIT_STATE)

sentinel-status:
	$(SAY_MODE)
	@$(KIT) sentinel-status $(KIT_STATE)

cli-sentinel:
	$(SAY_MODE)
	@$(KIT) cli-sentinel $(KIT_STATE) --redis-cli "$(REDIS_CLI)"

failover-test:
	$(SAY_MODE)
	@$(KIT) failover-test $(KIT_STATE)

logs:
	$(SAY_MODE)
	@tail -n 20 "$(STATE_DIR)"/*.log

down:
	$(SAY_MODE)
	@$(KIT) down $(KIT_STATE)

clean:
	$(SAY_MODE)
	@$(KIT) clean $(KIT_STATE)

endif

# ============================== Redis Cluster kit ============================================
# docker mode: docker-compose.cluster.yml (6 nodes, a one-shot cluster-init, the relay on
# $(CLUSTER_RELAY_PORT)); local mode: local redis-server processes (kit/clusterkit.py).

CLUSTER_COMPOSE = docker-compose.cluster.yml
CLUSTER_KIT = $(PYTHON) -m kit.clusterkit --state-dir "$(CLUSTER_STATE_DIR)"

ifeq ($(MODE),docker)

cluster-up:
	$(SAY_MODE)
	$(COMPOSE) -f $(CLUSTER_COMPOSE) up -d --build
	@sh kit/cluster-compose.sh wait
	@echo "Relay: ws://localhost:$(CLUSTER_RELAY_PORT)/ws  health http://localhost:$(CLUSTER_RELAY_PORT)/healthz"

cluster-status:
	$(SAY_MODE)
	@$(COMPOSE) -f $(CLUSTER_COMPOSE) ps
	@sh kit/cluster-compose.sh status

cluster-failover-test:
	$(SAY_MODE)
	@sh kit/cluster-compose.sh failover-test

cluster-down:
	$(SAY_MODE)
	$(COMPOSE) -f $(CLUSTER_COMPOSE) down

else

cluster-up:
	$(SAY_MODE)
	@$(CLUSTER_KIT) up --ports $(CLUSTER_PORTS) --relay-port $(CLUSTER_RELAY_PORT) \
		--node-timeout-ms $(CLUSTER_NODE_TIMEOUT_MS) --redis-server "$(REDIS_SERVER)" \
		--redis-cli "$(REDIS_CLI)" --relay "$(RELAY)" --relay-args "$(RELAY_ARGS)"

cluster-status:
	$(SAY_MODE)
	@$(CLUSTER_KIT) status

cluster-failover-test:
	$(SAY_MODE)
	@$(CLUSTER_KIT) failover-test

cluster-down:
	$(SAY_MODE)
	@$(CLUSTER_KIT) down

endif

# ============================== project ======================================================

test:
	$(SAY_MODE)
	./scripts/test.sh

bench:
	$(SAY_MODE)
	.venv/bin/pytest benches/ --benchmark-only

# kasagi-relay against Centrifuge, Nchan and python-socketio (docs/benchmarks.md "Peers");
# setup.sh installs the peers from Debian and pip first. PEERS_ARGS=--quick for a short run.
PEERS_ARGS ?=
bench-peers:
	PYTHON=.venv/bin/python sh benches/peers/setup.sh
	.venv/bin/python -m benches.peers $(PEERS_ARGS)

wheel:
	$(SAY_MODE)
	.venv/bin/maturin build --release
