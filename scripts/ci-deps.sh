#!/usr/bin/env bash
# Installs what the tests need on a fresh machine, once: reruns are quick.
# - python3 >= 3.11: the independent reference implementation (tests/reference.rs).
set -euo pipefail
if ! python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "python3 >= 3.11 is needed by tests/reference.rs" >&2
  if command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3 >&2
  fi
  python3 -c 'import sys; assert sys.version_info >= (3, 11)'
fi
