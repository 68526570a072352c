# Conveniences over scripts/ (which need only bash).
.PHONY: setup run test bench bench-live bench-kprobe docs
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
bench-kprobe: setup
	.venv/bin/python benchmarks/bench_kprobe_overhead.py --kernels 6.1,6.12
docs: setup
	.venv/bin/xstate-agent rules --format markdown > docs/rules.md
	.venv/bin/python dashboards/generate.py
