# make search: the main job on the embedded digits data.  make test: the test suite.
# make export RUN=runs/digits: a finished run as ONNX + TorchScript, verified and timed (under RUN/export/).
# Both create .venv and install the pinned dependencies when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: search test bench venv clean export

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch pinned in the same command as deepspeed (which requires torch), so nothing pulls a CUDA build.
	DS_BUILD_OPS=0 $(PY) -m pip install -q "torch==2.13.0" "deepspeed==0.19.8"
	$(PY) -m pip install -q -c constraints.txt -e ".[test,deepspeed,onnx]"
	touch $(STAMP)

venv: $(STAMP)

NPROC ?= 2

search: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m dist_hrnas.train --config configs/digits.yaml

# checked when the makefile is read, so a missing RUN stops before anything is installed
ifneq ($(filter export,$(MAKECMDGOALS)),)
ifeq ($(RUN),)
$(error usage: make export RUN=runs/digits (a run directory))
endif
endif

export: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m dist_hrnas.export $(RUN)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# Benchmarks print JSON and write it under bench/results/ (plus the Pareto plots). The head-to-head
# (search_quality.py: 3 seeds x 4 modes x 2 targets) takes several hours here; BENCH_QUALITY=--quick for 1 seed.
REPORT_RUN := bench/results/tmp/search_quality/throughput_seconds_launch_rho0.04_seed0
BENCH_QUALITY ?=

bench: $(STAMP)
	mkdir -p bench/results
	OMP_NUM_THREADS=1 $(PY) bench/overhead.py
	OMP_NUM_THREADS=1 $(PY) bench/latency_accuracy.py --out bench/results/latency_accuracy.json
	OMP_NUM_THREADS=1 $(PY) bench/profile_cost.py > bench/results/profile_cost.json && cat bench/results/profile_cost.json
	OMP_NUM_THREADS=1 $(PY) bench/search_quality.py $(BENCH_QUALITY)
	# the report of one searched network (throughput target, seconds penalty with the default launch-aware cost,
	# rho 0.04, seed 0) and its schedule plot
	OMP_NUM_THREADS=1 $(PY) -m dist_hrnas.report $(REPORT_RUN) --format markdown --out bench/results/report_digits.md
	cp $(REPORT_RUN)/report_schedule.png bench/results/report_digits_schedule.png
	# the report links the plot inside the run folder (not committed): point it at the copy beside it
	sed -i 's#(tmp/[^)]*/report_schedule.png)#(report_digits_schedule.png)#' bench/results/report_digits.md

clean:
	rm -rf $(VENV) runs
