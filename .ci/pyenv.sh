#!/usr/bin/env bash
# Makes (once) the Python venv of the manifest and image checks and prints its directory.
#   venv=$(bash .ci/pyenv.sh)    ->  "$venv/bin/checkov", "$venv/bin/kubernetes-validate"
# The venv holds exactly .ci/python-requirements.txt (pinned, from PyPI) and is cached under
# $GMAIL_SYNC_CI_CACHE_DIR (default ${XDG_CACHE_HOME:-~/.cache}/gmail-sync-ci), keyed by the
# requirements file and the Python version: the first run installs (about 2-3 minutes), later
# runs reuse it in well under a second. A venv left half-made by an interrupted run is not used:
# it is made again. Concurrent runs wait for each other (flock).
# Logs go to stderr; stdout is the venv's path only.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { printf 'pyenv: %s\n' "$*" >&2; }
die() { printf 'pyenv: ERROR: %s\n' "$*" >&2; exit 1; }

req=.ci/python-requirements.txt
python=${GMAIL_SYNC_CI_PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 ||
  die "$python not found: install Python 3.9+ (Debian: apt-get install -y python3 python3-venv) or set GMAIL_SYNC_CI_PYTHON"
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' ||
  die "$python is $("$python" --version 2>&1); checkov needs Python 3.9 or newer (set GMAIL_SYNC_CI_PYTHON)"
"$python" -c 'import venv, ensurepip' 2>/dev/null ||
  die "$python has no venv/ensurepip module: apt-get install -y python3-venv (bash .ci/prereqs does it)"

pyver=$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
key=$( (cat "$req"; echo "$pyver") | sha256sum | cut -c1-16)
cache=${GMAIL_SYNC_CI_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gmail-sync-ci}
venv=$cache/venv-py$pyver-$key
mkdir -p "$cache"

exec 9>"$cache/venv.lock"
flock 9
# Venvs of this cache unused for a week (other requirements or Python versions) go.
find "$cache" -mindepth 1 -maxdepth 1 -name 'venv-py*' -not -path "$venv" -mtime +7 \
  -exec rm -rf -- {} + 2>/dev/null || true
if [[ -f $venv/.complete ]]; then
  touch "$venv"
  printf '%s\n' "$venv"
  exit 0
fi
rm -rf -- "$venv"
log "making $venv from $req (pinned, PyPI; once per requirements change)"
"$python" -m venv "$venv" >&2 || die "python -m venv failed (Debian: apt-get install -y python3-venv)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
  --requirement "$req" >&2 ||
  die "pip install -r $req failed (PyPI unreachable? see the lines above); $venv is left incomplete and will be made again"
"$venv/bin/checkov" --version >/dev/null || die "checkov does not start in $venv"
"$venv/bin/kubernetes-validate" --version >/dev/null || die "kubernetes-validate does not start in $venv"
touch "$venv/.complete" "$venv"
log "ready: checkov $("$venv/bin/checkov" --version), kubernetes-validate $("$venv/bin/kubernetes-validate" --version 2>&1 | tail -n1)"
printf '%s\n' "$venv"
