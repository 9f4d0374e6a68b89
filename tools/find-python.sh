#!/usr/bin/env bash
# Print the path of a working CPython X.Y interpreter on this machine, or nothing.
# (pyenv shims exist for versions that are installed but not selected: try them for real.)
v="$1"
for py in "$(command -v "python$v" 2>/dev/null)" "$HOME"/.pyenv/versions/"$v".*/bin/python"$v" \
          /usr/bin/python"$v" /usr/local/bin/python"$v"; do
  [ -n "$py" ] && [ -x "$py" ] || continue
  if PYENV_VERSION="$(basename "$(dirname "$(dirname "$py")")")" "$py" -c 'import sys' >/dev/null 2>&1; then
    "$py" -c 'import sys; print(sys.executable)' 2>/dev/null && exit 0
  fi
  "$py" -c 'import sys; print(sys.executable)' 2>/dev/null && exit 0
done
exit 0
