#!/usr/bin/env bash
# The GPU check, in one command from the repository root (gpu/check.py says what it measures):
#
#     bash gpu/check.sh "$OUT"              # on the GPU machine, after gpu/prepare.sh here (it prints the call)
#     bash gpu/check.sh --dry-run           # here, on the CPU, at a tiny size; needs neither the wheels nor prepare
#
# Writes OUTDIR (else $OUT, else runs/gpu-check)/gpu_check.json, gpu_check.txt and gpu_check.log; exits 0 when every
# step passed, 1 when one did not (the others still ran), 2 for a usage error.
set -uo pipefail
PYTHON=${PYTHON:-python3}
dry= outdir=
for arg in "$@"; do
    case $arg in
        --dry-run) dry=--dry-run ;;
        -*) echo "error: unknown option $arg (usage: bash gpu/check.sh [OUTDIR] [--dry-run])" >&2; exit 2 ;;
        *) outdir=$(realpath -m "$arg") ;;  # as given, from where it was called
    esac
done
cd "$(dirname "$0")/.."
outdir=${outdir:-${OUT:-runs/gpu-check}}  # runs/ is ignored: what a check writes there never travels
if [ -z "$dry" ]; then
    if [ ! -d gpu/carry/site ]; then
        echo "error: gpu/carry is missing: run bash gpu/prepare.sh first, and carry gpu/carry and .whl" >&2
        exit 2
    fi
    # the carried stand-ins of the demo's packages (its MiniLM in fp16, the BBC texts), where config looks for them
    export PYTHONPATH="$PWD/gpu/carry/site${PYTHONPATH:+:$PYTHONPATH}"
    # datasets 5.2.0 wants pyarrow >= 24; where the machine's is older, the fallback wheel (4.8.5, pyarrow >= 21)
    if ! "$PYTHON" -c 'import sys, pyarrow; sys.exit(int(pyarrow.__version__.split(".")[0]) < 24)' 2>/dev/null &&
        compgen -G ".whl/fallback/*.whl" >/dev/null; then
        echo "pyarrow older than 24: using the fallback datasets (installed into /tmp/site-fallback)"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site-fallback .whl/fallback/*.whl && export PYTHONPATH="/tmp/site-fallback:$PYTHONPATH"
    fi
fi
exec "$PYTHON" gpu/check.py "$outdir" $dry
