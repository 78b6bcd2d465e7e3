# llmctl — set-up, server, tests and database tasks. `make help` lists them.
VENV    ?= .venv
PY      := $(VENV)/bin/python
LLMCTL  := $(VENV)/bin/llmctl
CONFIG  ?= models.yaml
TEST_MODEL ?= models/tiny

.PHONY: help install serve test lint migrate upgrade downgrade seed-key list-keys test-model clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## Create .venv and install llmctl with its test tools
	@$(LLMCTL) --help > /dev/null && echo "llmctl installed: $(LLMCTL)"

$(TEST_MODEL)/config.json: | $(VENV)/.installed
	$(LLMCTL) models create-test-model $(TEST_MODEL)

test-model: $(TEST_MODEL)/config.json  ## Build the offline test model that models.yaml serves

serve: install test-model  ## Install, then run the gateway on SQLite (models.yaml)
	$(LLMCTL) serve --config $(CONFIG)

test: install  ## Run the whole test suite (starts its own Postgres and Redis)
	$(VENV)/bin/pytest -q

lint: install  ## ruff
	$(VENV)/bin/ruff check .

migrate: install  ## Autogenerate a migration: make migrate MSG="add x"
	$(LLMCTL) db revision -m "$(or $(MSG),schema change)"

upgrade: install  ## Upgrade the database to head
	$(LLMCTL) db upgrade

downgrade: install  ## Downgrade one revision (or REV=...)
	$(LLMCTL) db downgrade $(or $(REV),-1)

seed-key: install  ## Import a known key: make seed-key API_KEY=<value>
	@test -n "$(API_KEY)" || (echo "usage: make seed-key API_KEY=<value> [NAME=seed]"; exit 2)
	@$(LLMCTL) keys create --name "$(or $(NAME),seed)" --role admin --value "$(API_KEY)" > /dev/null \
		&& echo "imported key $(or $(NAME),seed)"

list-keys: install  ## List API keys
	$(LLMCTL) keys list

clean:  ## Remove the virtualenv, caches and built test models
	rm -rf $(VENV) models/tiny .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
