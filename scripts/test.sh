#!/usr/bin/env bash
# The README's test command: the system packages the tests use, the project in .venv, the suite.
#
#   scripts/test.sh                  the whole suite
#   scripts/test.sh -k hostfile -x   arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/system-packages.sh
if [ ! -x .venv/bin/python ]; then
  echo "scripts/test.sh: creating .venv and installing mlx_nb[test] (the first time builds llama-cpp-python: minutes)" >&2
  python3 -m venv .venv
fi
.venv/bin/pip install -q -e ".[test]"
# lint first: a minute of tests is not worth a typo (ruff is configured in pyproject.toml)
.venv/bin/python -m ruff check mlx_nb tests benchmarks
.venv/bin/python -m ruff format --check mlx_nb tests benchmarks
exec .venv/bin/python -m pytest "$@"
