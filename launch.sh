#!/usr/bin/env bash
# Train a recipe on every rank: `crlft prepare` once (it skips when the dataset is up to date), `crlft preflight`
# (a finished run stops here, in seconds; so does a resume the recipe cannot do), then DeepSpeed, then `crlft eval`
# when the recipe has held-out prompts (eval.prompts).
#
#   ./launch.sh [--debug] [--num_gpus N] [--hostfile H] [other deepspeed launcher options] RECIPE.yaml [key=value ...]
#
# Examples
#   ./launch.sh recipes/openchat_3.5.yaml                         all GPUs of this machine
#   ./launch.sh --num_gpus 4 recipes/openchat_3.5.yaml train.lr=1e-5
#   ./launch.sh --hostfile hosts.txt recipes/openchat_3.5.yaml    many nodes over ssh/pdsh, started from node 0
#   ./launch.sh --hostfile hosts.txt --no_ssh --node_rank N --master_addr ADDR --master_port PORT RECIPE.yaml
#                                           on each node N (no ssh; under SLURM, --node_rank defaults to SLURM_NODEID)
#
# Without CUDA, DeepSpeed runs on its CPU accelerator (gloo) with 2 ranks unless --num_gpus says otherwise, so the
# whole path runs on a laptop (with --hostfile, its slots size the job instead). Every option before the recipe goes
# to the `deepspeed` launcher unchanged; PYTHON picks the interpreter (default: python, else python3). The dataset
# is prepared once per job, on node 0: with --no_ssh the other nodes wait for it (CRLFT_PREPARE_WAIT_S, default
# 3600 s); data.output_dir and train.output_dir must be on a filesystem all nodes share. --debug (or CRLFT_DEBUG=1)
# shows tracebacks and DeepSpeed's own log lines, which a CPU run hides.
set -euo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "${here}/scripts/python.sh"
# The repository's crlft wins, installed or not; DeepSpeed forwards PYTHONPATH to the other nodes.
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"

# DeepSpeed launcher options that take no value (all others take one).
flag_options=" --module --no_python --no_local_rank --no_ssh --no_ssh_check --force_multi --save_pid \
--bind_cores_to_rank -q --quiet "

launcher_args=()
num_gpus=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --debug) export CRLFT_DEBUG=1; shift ;;
        --num_gpus|--num_accelerators) num_gpus="${2:?$1 needs a value}"; shift 2 ;;
        --num_gpus=*|--num_accelerators=*) num_gpus="${1#*=}"; shift ;;
        --*=*) launcher_args+=("$1"); shift ;;
        -*)
            if [[ "$flag_options" == *" $1 "* ]]; then
                launcher_args+=("$1"); shift
            else
                launcher_args+=("$1" "${2:?$1 needs a value}"); shift 2
            fi
            ;;
        *) break ;;
    esac
done
if [[ $# -lt 1 ]]; then
    usage >&2
    echo "launch.sh: missing RECIPE.yaml" >&2
    exit 2
fi
recipe="$1"
shift
overrides=("$@")
PYTHON="$(crlft_python)"

# Without ssh every node runs this script itself; which one it is decides who prepares the data and evaluates.
node_rank=0
no_ssh=""
for (( i = 0; i < ${#launcher_args[@]}; i++ )); do
    case "${launcher_args[i]}" in
        --no_ssh) no_ssh=1 ;;
        --node_rank) node_rank="${launcher_args[i + 1]:-0}"; node_rank_given=1 ;;
        --node_rank=*) node_rank="${launcher_args[i]#*=}"; node_rank_given=1 ;;
    esac
done
if [[ -n "$no_ssh" && -z "${node_rank_given:-}" && -n "${SLURM_NODEID:-}" ]]; then
    node_rank="$SLURM_NODEID"  # srun starts this script once per node
    launcher_args+=(--node_rank "$node_rank")
fi

# How many ranks the launcher will start, when this script can tell (the resume check compares it with the
# checkpoint's); empty when --include/--exclude/--num_nodes or a GPU hostfile leave it to the launcher.
world_size=""
# A free rendezvous port (a socket, no torch), and the CUDA devices: asking torch takes seconds (its import), so a
# machine without a GPU device node (NVIDIA /dev/nvidiaN, ROCm /dev/kfd, WSL /dev/dxg) is taken to have none.
port="$("$PYTHON" -c 'import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])' 2>/dev/null || echo 29500)"
cuda_devices=0
if compgen -G "/dev/nvidia[0-9]*" >/dev/null || [[ -e /dev/kfd || -e /dev/dxg ]]; then
    cuda_devices="$("$PYTHON" -c 'import torch
print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)"
fi
case " ${launcher_args[*]-} " in
    *" --include"*|*" -i "*|*" --exclude"*|*" -e "*|*" --num_nodes"*) chosen_by_launcher=yes ;;
    *) chosen_by_launcher=no ;;
esac
if [[ "$cuda_devices" -gt 0 ]]; then
    # GPUs: DeepSpeed uses all of them unless --num_gpus / --include say otherwise
    has_hostfile=no
    for arg in ${launcher_args[@]+"${launcher_args[@]}"}; do
        case "$arg" in -H|--hostfile|--hostfile=*) has_hostfile=yes ;; esac
    done
    if [[ "$chosen_by_launcher" == no && "$has_hostfile" == no ]]; then
        world_size="${num_gpus:-$cuda_devices}"
    fi
else
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
    hostfile=""
    for (( i = 0; i < ${#launcher_args[@]}; i++ )); do
        case "${launcher_args[i]}" in
            -H|--hostfile) hostfile="${launcher_args[i + 1]:-}" ;;
            --hostfile=*) hostfile="${launcher_args[i]#*=}" ;;
        esac
    done
    if [[ -n "$hostfile" && -z "$num_gpus" ]]; then
        # The hostfile sizes the job (its slots are this node's ranks); a --num_gpus here would override it.
        ranks_here="$(awk '/slots=/ { sub(/.*slots=/, ""); n = $1 + 0; if (n > max) max = n } END { print max + 0 }' \
            "$hostfile" 2>/dev/null || echo 0)"
        ranks_here=$(( ranks_here > 0 ? ranks_here : 1 ))
        if [[ "$chosen_by_launcher" == no ]]; then
            world_size="$(awk '/slots=/ { sub(/.*slots=/, ""); n += $1 } END { print n + 0 }' "$hostfile" \
                2>/dev/null || echo "")"
        fi
    else
        num_gpus="${num_gpus:-2}"
        ranks_here="$num_gpus"
        if [[ "$chosen_by_launcher" == no ]]; then world_size="$num_gpus"; fi
    fi
    # Ranks share the cores: one OpenMP pool each, not one per core each.
    cores="$(nproc 2>/dev/null || echo 2)"
    threads=$(( cores / ranks_here ))
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"
    echo "launch.sh: no CUDA; DeepSpeed CPU accelerator with ${ranks_here} ranks per node, OMP_NUM_THREADS=${OMP_NUM_THREADS}"
    # The launcher's INFO and WARNING lines on a CPU run ("Unable to find hostfile", "Setting CUDA_VISIBLE_DEVICES",
    # every command it spawns) say nothing a CPU user can act on; its errors stay. --debug or a --log_level shows them.
    case " ${launcher_args[*]-} " in
        *" --log_level"*|*" --quiet "*|*" -q "*) ;;
        *) if [[ -z "${CRLFT_DEBUG:-}" ]]; then launcher_args+=(--log_level error); fi ;;
    esac
fi
if [[ -n "$num_gpus" ]]; then
    launcher_args+=(--num_gpus "$num_gpus")
fi
# One node and no port given: take a free one instead of DeepSpeed's fixed 29500, so that two runs on one machine
# (a benchmark next to a demo, two users) do not collide at rendezvous.
case " ${launcher_args[*]-} " in
    *" --master_port"*|*" -H "*|*" --hostfile"*|*" --num_nodes"*) ;;
    *) launcher_args+=(--master_port "$port") ;;
esac

# `crlft prepare` once per job (node 0; the other nodes wait for its complete dataset), then, before any rank
# starts: a run that is already complete says so and ends here (exit 0); a resume the recipe cannot do is refused
# once, here, not by every rank after minutes of start-up.
preflight=0
if [[ "$node_rank" == "0" ]]; then
    "$PYTHON" -m crlft preflight --prepare "$recipe" ${world_size:+--num_gpus "$world_size"} \
        ${overrides[@]+"${overrides[@]}"} || preflight=$?
else
    echo "launch.sh: node ${node_rank}: waiting for node 0 to prepare the dataset"
    "$PYTHON" -m crlft preflight --wait "${CRLFT_PREPARE_WAIT_S:-3600}" "$recipe" \
        ${world_size:+--num_gpus "$world_size"} ${overrides[@]+"${overrides[@]}"} || preflight=$?
fi
case "$preflight" in
    0) ;;
    10) exit 0 ;;
    11) if [[ "$node_rank" == "0" ]]; then exec "$PYTHON" -m crlft eval "$recipe" ${overrides[@]+"${overrides[@]}"}; fi
        exit 0 ;;
    *) exit "$preflight" ;;
esac

deepspeed_bin="$(dirname "$(command -v "$PYTHON")")/deepspeed"
if [[ ! -x "$deepspeed_bin" ]]; then
    deepspeed_bin="deepspeed"
fi
"$deepspeed_bin" ${launcher_args[@]+"${launcher_args[@]}"} --module crlft.train "$recipe" \
    ${overrides[@]+"${overrides[@]}"}

# Recipes with held-out prompts (eval.prompts) end with their exact-match accuracy under each condition. (A recipe
# that cannot be read stops here with its error, never skips the evaluation silently.)
has_prompts="$("$PYTHON" -c 'import sys; from crlft.recipe import load_recipe; print("yes" if load_recipe(sys.argv[1], sys.argv[2:]).eval.prompts else "no")' \
    "$recipe" ${overrides[@]+"${overrides[@]}"})"
if [[ "$has_prompts" == "yes" && "$node_rank" == "0" ]]; then
    "$PYTHON" -m crlft eval "$recipe" ${overrides[@]+"${overrides[@]}"}
fi
