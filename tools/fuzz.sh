#!/usr/bin/env bash
# The long fuzz run (issue 11, item 5): every ckptctl parser, N mutated inputs each (default
# 10,000), each parser in a worker subprocess that the supervisor restarts after a crash.
#
#   tools/fuzz.sh                       # every parser, 10,000 inputs each, seed 1
#   tools/fuzz.sh -n 50000 --seed 7     # more inputs, another sequence
#   tools/fuzz.sh --parser hdf5 --parser gguf
#
# Results in fuzz-out/ (or --out DIR): summary.jsonl (one line per parser: inputs, ok, clean
# errors, findings, worker crashes, wall and CPU seconds), findings/<parser>-*.bin (the input) and
# .txt (the traceback, or the signal the worker died of). Exit status 1 when anything was found.
# Runs under nice; needs the dev extra (torch, h5py, safetensors, gguf, tensorstore, zstandard).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python}"
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}"
exec nice -n "${NICE:-10}" "$py" "$here/tools/fuzz_targets.py" campaign "$@"
