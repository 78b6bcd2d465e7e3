# llmctl — set-up, server, tests, database tasks and the compose stack. `make help` lists them.
VENV    ?= .venv
PY      := $(VENV)/bin/python
LLMCTL  := $(VENV)/bin/llmctl
CONFIG  ?= models.yaml
TEST_MODEL ?= models/tiny
# Everything the tests need: serving, the eval and bench extras, the test tools.
EXTRAS  ?= eval,bench,dev
# The stack: `make up GPU=1` adds the NVIDIA override; SERVICE=api narrows logs/restart.
COMPOSE ?= docker compose -f compose/docker-compose.yml $(if $(GPU),-f compose/docker-compose.gpu.yml)

.PHONY: help install serve test lint migrate upgrade downgrade db-shell seed-key list-keys \
	test-needs test-model clean up down restart logs nuke

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# constraints.txt holds the exact torch (the local CPU wheel here); pyproject a range.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed  ## Create .venv and install llmctl with its test tools
	@$(LLMCTL) --help > /dev/null && echo "llmctl installed: $(LLMCTL)"

$(TEST_MODEL)/config.json: | $(VENV)/.installed
	$(LLMCTL) models create-test-model $(TEST_MODEL)

test-model: $(TEST_MODEL)/config.json  ## Build the offline test model that models.yaml serves

serve: install test-model  ## Install, then run the gateway on SQLite (models.yaml)
	$(LLMCTL) serve --config $(CONFIG)

# The suite starts its own servers from these binaries (tests/plugins/): say which
# package is missing before running it. Debian keeps initdb in /usr/lib/postgresql/*/bin.
PG_BIN_GLOB ?= /usr/lib/postgresql/*/bin
test-needs:
	@command -v redis-server > /dev/null \
		|| { echo "make test needs redis-server: apt-get install redis-server"; exit 1; }
	@command -v initdb > /dev/null || ls $(PG_BIN_GLOB)/initdb > /dev/null 2>&1 \
		|| { echo "make test needs PostgreSQL's initdb and pg_ctl: apt-get install postgresql"; exit 1; }

test: test-needs install  ## Run the whole test suite (needs redis-server and PostgreSQL's initdb/pg_ctl)
	$(VENV)/bin/pytest -q

lint: install  ## ruff
	$(VENV)/bin/ruff check .

migrate: install  ## Autogenerate a migration: make migrate MSG="add x"
	$(LLMCTL) db revision -m "$(or $(MSG),schema change)"

upgrade: install  ## Upgrade the database to head
	$(LLMCTL) db upgrade

# `--`: a relative revision such as -1 is an argument, not an option.
downgrade: install  ## Downgrade one revision (or REV=...)
	$(LLMCTL) db downgrade -- $(or $(REV),-1)

db-shell: install  ## Open the configured database: sqlite3 (embedded default) or psql
	@$(LLMCTL) db shell

seed-key: install  ## Import a known key: make seed-key API_KEY=<value>
	@test -n "$(API_KEY)" || (echo "usage: make seed-key API_KEY=<value> [NAME=seed]"; exit 2)
	@$(LLMCTL) keys create --name "$(or $(NAME),seed)" --role admin --value "$(API_KEY)" > /dev/null \
		&& echo "imported key $(or $(NAME),seed)"

list-keys: install  ## List API keys
	$(LLMCTL) keys list

clean:  ## Remove the virtualenv, caches and built test models (models/)
	rm -rf $(VENV) models .pytest_cache .ruff_cache *.egg-info build
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

compose/.env:
	@echo "compose/.env is missing: cp compose/.env.example compose/.env and set its passwords"
	@exit 1

up: compose/.env  ## Build and start the compose stack, wait until healthy (GPU=1 for NVIDIA)
	$(COMPOSE) up --build --detach --wait

down:  ## Stop the compose stack (its volumes stay)
	$(COMPOSE) down

restart:  ## Restart the stack's containers (or one: SERVICE=api)
	$(COMPOSE) restart $(SERVICE)

logs:  ## Follow the stack's logs (or one service's: SERVICE=api)
	$(COMPOSE) logs --follow --tail=200 $(SERVICE)

nuke:  ## Stop the stack and delete its volumes: database, metrics, model cache (asks; FORCE=1 does not)
	@if [ "$(FORCE)" != 1 ]; then \
		printf "Delete the stack's volumes (database, metrics, dashboards' data, model cache)? [y/N] "; \
		read answer || true; \
		case "$$answer" in y|Y|yes) ;; *) echo "nothing deleted"; exit 1;; esac; \
	fi
	$(COMPOSE) down --volumes --remove-orphans
