# The two commands (see README): `make run` and `make test`. Both install what they need.
.PHONY: run test bench lint docs install schema clean

install:
	scripts/bootstrap.sh

run: install
	.venv/bin/snapferry demo

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

# The documentation site (mkdocs.yml, docs/): --strict fails on a broken link or any warning.
docs: install
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir .venv/docs-site

# Two pytest processes, a test file each at a time (--dist loadfile): most integration tests
# wait on Temporal timers and on their own dev server, so two share the 2 cores well.
test: lint docs
	.venv/bin/pytest -q -p no:cacheprovider --durations=25 -n 2 --dist loadfile tests

bench: install
	.venv/bin/python bench/bench.py --sizes-gib 1 4

schema: install
	.venv/bin/snapferry schema --out schemas
