# Thin wrappers: the scripts do the work, so machines without make can run them.
.PHONY: run test lint
run:
	scripts/run.sh
test:
	scripts/test.sh
lint:
	.venv/bin/ruff check relay tests
	.venv/bin/ruff format --check relay tests
