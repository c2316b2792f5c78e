#!/usr/bin/env bash
# Gather what a GPU machine needs besides this repository into bench/gpu_files/ (or $1): pyautoattack's Python
# files from this virtual environment (not its example models). The machine then runs, from the repository root:
#     PYTHONPATH=bench/gpu_files python bench/gpu_check.py --device cuda
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-bench/gpu_files}"
python="${PYTHON:-.venv/bin/python}"
src="$("$python" -c 'import os, pyautoattack; print(os.path.dirname(pyautoattack.__file__))')"
rm -rf "$dest/pyautoattack"
mkdir -p "$dest/pyautoattack"
find "$src" -maxdepth 1 -name '*.py' -exec cp {} "$dest/pyautoattack/" \;
bytes="$(du -sb "$dest" | cut -f1)"
limit=$((64 * 1024 * 1024))
echo "$dest: $(find "$dest" -type f | wc -l) files, $bytes bytes (limit $limit)"
if [ "$bytes" -ge "$limit" ]; then
    echo "error: $dest is over 64 MiB" >&2
    exit 1
fi
