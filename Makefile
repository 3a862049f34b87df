# The two commands a newcomer needs: `make demo` and `make test`.
PY := .venv/bin/python
export MMP_HOME ?= $(HOME)/.mmp

.PHONY: setup demo test bench clean

setup: .venv/.mmp-ready

.venv/.mmp-ready: pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	touch $@

demo: setup
	$(PY) -m mmp demo

test: setup
	$(PY) -m pytest -q

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf .venv build
