#!/usr/bin/env bash
# make test-newest: the newest releases of the libraries whose private parts the proxy leans on
# (paddler_sync/library_checks.py), whatever setup.cfg's bounds say, in a venv of their own (.venv-newest);
# then the start-up check and the tests of the relay's wire, pools and framing against them. Run it when one of
# them releases, before users meet it; widen the bounds in setup.cfg and library_checks.VERIFIED when it passes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-newest
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e '.[test]'
# pip warns that these break paddler-sync's bounds: that is the point
"$VENV/bin/python" -m pip install --quiet --upgrade urllib3 gevent gunicorn redis requests 2>&1 \
    | grep -v "dependency resolver\|requires .* but you have" || true
"$VENV/bin/python" - <<'PY'
from paddler_sync.library_checks import VERIFIED, installed, problems
for name in VERIFIED:
    print(f"{name} {installed(name)}")
errors, warnings = problems()
for line in warnings:
    print("warning:", line)
for line in errors:
    print("error:", line)
raise SystemExit(1 if errors else 0)
PY
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/unit/test_library_checks.py tests/live/test_relay_wire.py \
    tests/live/test_proxy.py tests/live/test_hostile_proxy.py tests/live/test_start_checks.py
