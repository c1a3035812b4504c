#!/usr/bin/env bash
# Installs the package with its test extras (torch kept at the pinned CPU wheel) and runs lint and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q -c constraints.txt torch==2.13.0
python3 -m pip install -q -c constraints.txt -e ".[test]"
python3 -m ruff check .
python3 -m pytest -q "$@"
