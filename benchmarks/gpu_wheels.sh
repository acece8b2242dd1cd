#!/usr/bin/env bash
# Builds the wheel folder benchmarks/gpu_check.sh installs on a GPU machine that has no network: the packages
# crlft's GPU path needs that the H200 machine's image lacks (its image holds torch 2.11, transformers 5.17,
# accelerate, peft, pytest, numpy, pyarrow, pandas, huggingface-hub, tokenizers, sentencepiece, ...; not DeepSpeed,
# datasets, pydantic or mistral-common), for its python3 (CPython 3.12, x86-64, manylinux).
#
#   benchmarks/gpu_wheels.sh [DIR]      DIR defaults to .whl/ in the repository root (ignored by git)
#
# Then carry DIR with the call (the device tool's `carry: [".whl"]`) and run benchmarks/gpu_check.sh there.
# Each wheel is fetched with `pip download --no-deps --only-binary=:all:` for that Python and platform; DeepSpeed,
# which PyPI has as a source archive only, is built here with `pip wheel` (pure Python: DS_BUILD_OPS=0, its CUDA
# ops compile on first use, and crlft uses torch's fused AdamW, so none does). The versions are pinned to a set
# that works together with crlft (the ones its CPU test suite runs with). PYTHON (default python3) runs pip;
# PYTHON_VERSION (default 3.12) and EXTRA_WHEELS ("name==version ...", e.g. a pyarrow for an image whose pyarrow
# is older than datasets' >= 24) adjust the set. Fails if the folder would exceed MAX_MIB (default 48) of the
# 64 MiB a call may carry, the working tree included.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-$here/.whl}"
PYTHON="${PYTHON:-python3}"
python_version="${PYTHON_VERSION:-3.12}"
max_mib="${MAX_MIB:-48}"

wheels=(
    deepspeed==0.19.8            # the trainer's engine (ZeRO-2/3)
    hjson==3.1.0                 # deepspeed
    pydantic==2.13.4             # deepspeed's configuration
    pydantic-core==2.46.4
    annotated-types==0.7.0
    typing-inspection==0.4.2
    typing-extensions==4.16.0    # pydantic-core needs a recent one; the image's version is not known here
    datasets==5.2.0              # crlft prepare / load_prepared
    dill==0.4.1                  # datasets
    multiprocess==0.70.19        # datasets
    mistral-common==1.13.1       # ships Mistral-7B-v0.1's tokenizer.model: the OpenChat tokenizer offline
)
read -r -a extra <<<"${EXTRA_WHEELS:-}"
wheels+=("${extra[@]}")

platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
    manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done

rm -rf "$dir"
mkdir -p "$dir"
for spec in "${wheels[@]}"; do
    if "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
        --implementation cp "${platforms[@]}" -d "$dir" "$spec" 2>/dev/null; then
        continue
    fi
    echo "gpu_wheels.sh: no wheel of $spec for CPython $python_version x86-64 on the index; building one here"
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "$spec"
done

# Every wheel must install on the target: pure Python, or CPython $python_version on x86-64 Linux; one of each name.
tag="cp${python_version/./}"
status=0
names=()
for wheel in "$dir"/*.whl; do
    file="$(basename "$wheel")"
    names+=("$(echo "${file%%-*}" | tr '[:upper:]-' '[:lower:]_')")
    case "$file" in
        *-py3-none-any.whl | *-py2.py3-none-any.whl | *-"$tag"-"$tag"-*x86_64*.whl | *-"$tag"-abi3-*x86_64*.whl \
            | *-"${tag/cp/py}"-none-any.whl) ;;
        *) echo "gpu_wheels.sh: $file does not install on CPython $python_version x86-64" >&2; status=1 ;;
    esac
done
duplicates="$(printf '%s\n' "${names[@]}" | sort | uniq -d)"
if [[ -n "$duplicates" ]]; then
    echo "gpu_wheels.sh: more than one wheel of: $duplicates" >&2
    status=1
fi
if [[ ${#names[@]} -ne ${#wheels[@]} ]]; then
    echo "gpu_wheels.sh: ${#wheels[@]} packages asked for, ${#names[@]} wheels in $dir" >&2
    status=1
fi
bytes="$(du -cb "$dir"/*.whl | tail -1 | cut -f1)"
mib="$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')"
ls -l "$dir"
echo "gpu_wheels.sh: ${#names[@]} wheels, $mib MiB in $dir"
if (( bytes > max_mib * 1048576 )); then
    echo "gpu_wheels.sh: $mib MiB is over MAX_MIB=$max_mib (a call carries 64 MiB with the working tree)" >&2
    status=1
fi
exit "$status"
