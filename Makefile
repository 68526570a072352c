# Conveniences over scripts/ (which need only bash).
.PHONY: setup run test bench bench-live docs
setup:
	scripts/setup
run:
	scripts/run
test:
	scripts/test
bench: setup
	.venv/bin/python benchmarks/bench_replay.py
bench-live: setup
	.venv/bin/python benchmarks/livebench.py --quick
docs: setup
	.venv/bin/xstate-agent rules --format markdown > docs/rules.md
	.venv/bin/python dashboards/generate.py
