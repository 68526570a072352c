# Conveniences over scripts/ (which need only bash).
.PHONY: setup run test bench docs
setup:
	scripts/setup
run:
	scripts/run
test:
	scripts/test
bench: setup
	.venv/bin/python benchmarks/bench_replay.py
docs: setup
	.venv/bin/xstate-agent rules --format markdown > docs/rules.md
