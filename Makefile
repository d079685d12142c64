# marllb — the README's two commands are `make demo` and `make test`; both do every set-up step themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MARLLB := $(VENV)/bin/marllb
STAMP := $(VENV)/.installed
# The CPU build of PyTorch; an unpinned `torch` would pull several GB of CUDA wheels.
TORCH_PIN ?= torch==2.13.0
# Debian packages the testbeds need (Apache + PHP in namespaces, iproute2, nftables, ethtool, curl; sshd for
# the SSH tests; wrk for `make bench`; MediaWiki, MariaDB and memcached for `app: mediawiki` servers).
APT_PACKAGES := apache2 libapache2-mod-php php-cli iproute2 nftables ethtool curl procps psmisc openssh-server wrk \
	mediawiki php-mysql php-memcached php-intl mariadb-server-core mariadb-client-core memcached

.PHONY: install system-deps system-deps-kvm test test-unit test-integration test-kvm bench bench-live demo lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e '.[dev,fast,ray]'
	touch $(STAMP)

# Installs only what is missing; needs root and apt-get (Debian/Ubuntu).
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q 'install ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "system packages: all present"; \
	elif [ "$$(id -u)" != 0 ]; then echo "missing packages: $$missing — run 'sudo make system-deps'" >&2; exit 1; \
	else echo "installing: $$missing"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi

test: install system-deps
	$(PY) -m pytest -m "not slow and not kvm" tests

test-unit: install
	$(PY) -m pytest -m "not integration and not slow and not kvm" tests

test-integration: install system-deps
	$(PY) -m pytest -m "integration and not slow and not kvm" tests

# What `kind: kvm` needs besides: debootstrap builds the guests' image, qemu runs them.
KVM_PACKAGES := debootstrap qemu-system-x86 qemu-utils debian-archive-keyring

system-deps-kvm:
	@$(MAKE) --no-print-directory system-deps APT_PACKAGES="$(KVM_PACKAGES)"

test-kvm: install system-deps system-deps-kvm
	$(PY) -m pytest -m kvm tests

# Benchmarks (root): figures go into docs/benchmarks.md with the command that produced them.
bench: install system-deps
	$(MARLLB) bench dataplane
	$(MARLLB) bench replay
	$(MARLLB) bench sim
	$(MARLLB) bench sweep

DEMO_CONFIG ?= configs/local-small.yaml
DEMO_TRACE ?= traces/rate_200_steady_30s.tsv
DEMO_SECONDS ?= 40
DEMO_LOAD ?= 0.85
DEMO_SIM_EPISODES ?= 20
DEMO_LIVE_EPISODES ?= 3
# Deploy the small testbed and calibrate it; replay the shipped trace open loop at the speed that offers 85 % of
# the servers' CPU on this machine through ECMP and SED LBs; train QMIX briefly in the simulator, fine-tune it
# for a few live episodes through its coordinator on the testbed, and replay the same trace with it; print the
# report of the three with the learning curve; tear down (also on failure or Ctrl-C). Everything stays in
# runs/demo-*.
demo: install system-deps
	@set -e; trap '$(MARLLB) teardown $(DEMO_CONFIG)' EXIT; \
	runs=runs/demo-$$(date +%Y%m%dT%H%M%S); \
	$(MARLLB) deploy $(DEMO_CONFIG); \
	$(MARLLB) calibrate $(DEMO_CONFIG) --trace $(DEMO_TRACE) --target-load $(DEMO_LOAD); \
	for method in ecmp sed; do \
	  $(MARLLB) replay-trace $(DEMO_CONFIG) --trace $(DEMO_TRACE) --method $$method --load $(DEMO_LOAD) \
	    --duration $(DEMO_SECONDS) --runs-dir $$runs/eval; \
	done; \
	$(MARLLB) train $(DEMO_CONFIG) --algo qmix --episodes $(DEMO_SIM_EPISODES) --out $$runs/qmix-sim; \
	$(MARLLB) train $(DEMO_CONFIG) --env testbed --algo qmix --init $$runs/qmix-sim \
	  --episodes $(DEMO_LIVE_EPISODES) --episode-s 20 --out $$runs/qmix; \
	$(MARLLB) replay-trace $(DEMO_CONFIG) --trace $(DEMO_TRACE) --method rl:$$runs/qmix --load $(DEMO_LOAD) \
	  --duration $(DEMO_SECONDS) --runs-dir $$runs/eval; \
	$(MARLLB) report $$runs/eval $$runs/qmix --out $$runs/report

# Training on the live testbed, measured (root, ≈ 45 min): docs/benchmarks.md, "Training on the testbed".
bench-live:
	scripts/bench-live-training.sh

lint: install
	$(VENV)/bin/ruff check marllb_cli tests
	$(VENV)/bin/ruff format --check marllb_cli tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info
