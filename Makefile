# The two commands the README promises. Both work on a fresh Debian machine (root).
.PHONY: demo test bench stack-up stack-down

# Bring up the local stack and promote the example app to dev; prints where it runs.
demo:
	bash infra/bootstrap.sh
	uv run python -m infra.demo promote --app hello --environment dev

# Run the whole test suite (lint, strict types, then unit and integration tests against
# real components).
test:
	bash infra/bootstrap.sh --tests
	uv run ruff check .
	uv run mypy
	uv run pytest

# Run every benchmark and print one table of figures with their goals (not part of `test`:
# figures are measured, never asserted). `uv run python -m bench canary_sim` runs one.
bench:
	bash infra/bootstrap.sh --tests
	uv run python -m bench

stack-up:
	uv run python -m infra.stack up

stack-down:
	uv run python -m infra.stack down
