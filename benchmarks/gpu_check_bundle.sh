#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs that the lent GPU machine lacks, into .whl/ (git-ignored
# through .git/info/exclude), at the versions uv.lock pins for that machine's Python (3.12, Linux
# x86_64), then the one `run` command that installs them there and runs the check.
#
#   bash benchmarks/gpu_check_bundle.sh [--no-bitsandbytes]
#
# That machine (/work/.library/device/KINDS.md) has Python 3.12, torch 2.11 + CUDA 13.0,
# transformers, timm, peft, accelerate, pyarrow, pandas, pyyaml, safetensors, tokenizers and
# huggingface-hub 1.33.0, and no network. It lacks: diffusers; pydantic with pydantic-core (compiled:
# cp312 manylinux), annotated-types and typing-inspection; typing-extensions is carried too
# (pydantic needs >= 4.16, the machine's version is not known); bitsandbytes (43 MB) for
# configs/paper.yaml's 8-bit Adam, dropped with --no-bitsandbytes or where the working tree and the
# wheels would pass the 64 MiB a call may carry (the check then measures torch AdamW and estimates
# the 8-bit optimizer's memory). huggingface-hub is not carried: the locked diffusers accepts 1.33.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

with_bnb=1
for arg in "$@"; do
    case "$arg" in
        --no-bitsandbytes) with_bnb=0 ;;
        *) echo "usage: bash benchmarks/gpu_check_bundle.sh [--no-bitsandbytes]" >&2; exit 2 ;;
    esac
done

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

PY=${PYTHON:-python3}  # any Python >= 3.11 with pip (tomllib reads the lock)
DEVICE_HF_HUB=1.33.0   # KINDS.md's pip list of nvidia-h100-x1 / nvidia-h200
wanted="diffusers pydantic pydantic-core annotated-types typing-inspection typing-extensions"
[ "$with_bnb" = 1 ] && wanted="$wanted bitsandbytes"

# name==version per wanted package: the lock's entry whose resolution markers hold on the machine
pins=$("$PY" - "$wanted" <<'EOF'
import sys, tomllib
try:
    from packaging.markers import Marker
except ImportError:
    from pip._vendor.packaging.markers import Marker

env = {"python_full_version": "3.12.3", "python_version": "3.12", "sys_platform": "linux",
       "platform_machine": "x86_64", "platform_system": "Linux", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython"}
lock = tomllib.load(open("uv.lock", "rb"))
for name in sys.argv[1].split():
    entries = [p for p in lock["package"] if p["name"] == name]
    if len(entries) > 1:
        entries = [p for p in entries if any(Marker(m).evaluate(env) for m in p.get("resolution-markers", []))]
    if len(entries) != 1:
        sys.exit(f"uv.lock: {len(entries)} entries of {name} for Python 3.12 on Linux x86_64")
    print(f"{name}=={entries[0]['version']}")
EOF
)

rm -rf .whl && mkdir .whl
platforms=""
for n in 2_28 2_27 2_24 2_17; do platforms="$platforms --platform manylinux_${n}_x86_64"; done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins

# diffusers' own huggingface-hub requirement against the machine's
"$PY" - "$DEVICE_HF_HUB" <<'EOF'
import glob, sys, zipfile
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

wheel = glob.glob(".whl/diffusers-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
for line in metadata.splitlines():
    if line.startswith("Requires-Dist: huggingface-hub") or line.startswith("Requires-Dist: huggingface_hub"):
        req = Requirement(line.split(":", 1)[1].strip())
        ok = req.specifier.contains(sys.argv[1])
        print(f"diffusers needs {req}; the machine has huggingface-hub {sys.argv[1]}: {'ok' if ok else 'CARRY IT TOO'}")
        sys.exit(0 if ok else 1)
EOF

limit=$((64 * 1024 * 1024))
tree=$(git ls-files -z -c -o --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
if [ "$with_bnb" = 1 ] && [ $((tree + wheels)) -gt "$limit" ]; then
    echo "working tree $((tree / 1024)) KiB + wheels $((wheels / 1024)) KiB pass 64 MiB: leaving bitsandbytes out" >&2
    rm -f .whl/bitsandbytes-*.whl
    wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
fi
ls -l .whl
echo "wheels: $(ls .whl | wc -l) files, $((wheels / 1024)) KiB; working tree $((tree / 1024)) KiB; together $(((tree + wheels) / 1024)) KiB of 65536"
cat <<'EOF'

run on the device (tool `run`, kind nvidia-h100-x1; carry [".whl"]; timeout_s 480):
set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --json $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log
EOF
