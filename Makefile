# The two commands a newcomer needs: `make demo` and `make test`.
PY := .venv/bin/python
export MMP_HOME ?= $(HOME)/.mmp

.PHONY: setup setup-dev system-packages demo test bench clean

setup: .venv/.mmp-ready          # what the demo needs: torch, Horovod, mmp
setup-dev: .venv/.mmp-ready-dev  # plus the test and infrastructure extras

.venv/.mmp-ready: pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	touch $@

.venv/.mmp-ready-dev: .venv/.mmp-ready
	MMP_EXTRAS=dev bash scripts/bootstrap.sh
	touch $@

demo: setup
	$(PY) -m mmp demo

system-packages:  # what the tests need from the system (sshd); installs as root, else says the command
	MMP_ONLY_SYSTEM=1 bash scripts/bootstrap.sh

# Tests spend much of their time waiting on subprocesses (horovodrun, mlflow, sshd): on CI's 2 cores two
# workers take the suite from 28 to 16 minutes. loadfile keeps a file's tests, and what their fixtures
# build once, on one worker.
TEST_WORKERS ?= 2

test: system-packages setup-dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: setup-dev
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf .venv build
