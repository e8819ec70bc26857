#!/usr/bin/env bash
# Prints the path of a working Python interpreter of version $1 (e.g. 3.12), or fails with one line.
# pyenv shims exist for every installed version but answer only for the selected ones, so each
# candidate is run, not just found.
set -euo pipefail
want=${1:?usage: find_python.sh MAJOR.MINOR}
for cand in "python$want" "$HOME"/.pyenv/versions/"$want".*/bin/"python$want" /usr/bin/"python$want" /usr/local/bin/"python$want"; do
  path=$(command -v "$cand" 2>/dev/null || true)
  [ -n "$path" ] || continue
  if "$path" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$want'.split('.')))" 2>/dev/null; then
    echo "$path"; exit 0
  fi
done
echo "error: no working python$want found (tried PATH, ~/.pyenv/versions/$want.*, /usr/bin); install Python $want" >&2
exit 1
