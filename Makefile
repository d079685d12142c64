# marllb — the README's two commands are `make demo` and `make test`; both do every set-up step themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MARLLB := $(VENV)/bin/marllb
STAMP := $(VENV)/.installed
# The CPU build of PyTorch; an unpinned `torch` would pull several GB of CUDA wheels.
TORCH_PIN ?= torch==2.13.0
# Debian packages the local testbed needs (Apache + PHP in namespaces, iproute2, nftables, ethtool, curl).
APT_PACKAGES := apache2 libapache2-mod-php php-cli iproute2 nftables ethtool curl procps psmisc

.PHONY: install system-deps test test-unit test-integration test-kvm bench demo lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e '.[dev]'
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

test-kvm: install system-deps
	$(PY) -m pytest -m kvm tests

# Benchmarks (root): figures go into docs/benchmarks.md with the command that produced them.
bench: install system-deps
	$(MARLLB) bench dataplane

DEMO_CONFIG ?= configs/local-small.yaml
# Deploy the small testbed, start SED LBs, send 40 concurrent requests to the VIP from the client namespace
# (they spread over the servers by SED), show the LBs' view, and tear down (also on failure or Ctrl-C).
demo: install system-deps
	@set -e; trap '$(MARLLB) teardown $(DEMO_CONFIG)' EXIT; \
	$(MARLLB) deploy $(DEMO_CONFIG); \
	$(MARLLB) lb start $(DEMO_CONFIG) --method sed; \
	eval $$($(MARLLB) status $(DEMO_CONFIG) --json | $(PY) -c 'import json,sys; s=json.load(sys.stdin); print("client=" + next(n["namespace"] for n in s["nodes"] if n["role"]=="client"), "vip=" + s["vip"])'); \
	echo "40 concurrent GET http://$$vip/dummy.php/?n=2000000 from $$client:"; \
	ip netns exec $$client curl -s --no-progress-meter --parallel --parallel-immediate --parallel-max 40 -w '%{http_code} %header{x-server}\n' \
	  $$(for i in $$(seq 40); do echo "-o /dev/null http://$$vip/dummy.php/?n=2000000&i=$$i"; done) | sort | uniq -c; \
	$(MARLLB) lb stats $(DEMO_CONFIG)


lint: install
	$(VENV)/bin/ruff check marllb_cli tests
	$(VENV)/bin/ruff format --check marllb_cli tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info
