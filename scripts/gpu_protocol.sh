#!/usr/bin/env bash
# The full-protocol measurements that need a GPU, in one call on a machine without network access:
# SmolLM2-135M fp32, 128 x 2048 windows of wikitext-2/valid.txt, WikiText-2 raw test at seqlen 2048.
#   1. one-shot faithfulness table: {sparsegpt, wanda, magnitude} x {50%, 2:4, 4:8}
#   2. SDS goals: sparsegpt {2:4, 4:8, 50%} and wanda 2:4, then the SDS ablation on sparsegpt 2:4
#   3. 2:4 inference speedups (sds-bench) for SmolLM2-135M and a 7B-shaped Llama
# Inputs (from ../shared/gpu/pack.sh): MODEL_DIR holding SmolLM2-135M-Instruct.Q4_1.gguf, DATA_ROOT with
# the layout of ../shared/data. Everything lands in RESULTS (default outputs/gpu), packed into one tarball.
set -uo pipefail
model_dir=${MODEL_DIR:-/tmp/gpu}
data_root=${DATA_ROOT:-/tmp/gpu/data}
results=${RESULTS:-outputs/gpu}
sds_run() { python3 -c 'from sds_cli.cli import main; main()' "$@"; }
protocol=(model=smollm2-135m "model.path=$model_dir" calib=wikitext2-valid "data.root=$data_root" device=cuda)

mkdir -p "$results"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/gpu.txt"
sds_run -m "${protocol[@]}" pruner=sparsegpt,wanda,magnitude sparsity=0.5,2:4,4:8 redense=none \
    "hydra.sweep.dir=$results/oneshot"
sds_run -m "${protocol[@]}" pruner=sparsegpt sparsity=2:4,4:8,0.5 "hydra.sweep.dir=$results/sds_sparsegpt"
sds_run -m "${protocol[@]}" pruner=wanda sparsity=2:4 "hydra.sweep.dir=$results/sds_wanda"
sds_run -m "${protocol[@]}" pruner=sparsegpt sparsity=2:4 \
    redense=sds_dense_outputs,sds_dense_inputs,sds_no_adjust,sds_fixed_mask,sds_l1,sds_no_early_exit \
    "hydra.sweep.dir=$results/ablation"
for shape in smollm2-135m llama-2-7b; do
    python3 -c 'from sds_cli.bench import main; main()' "$shape" --out "$results/bench_$shape.json"
done
python3 -c 'from sds_cli.report import main; main()' "$results" --out "$results/report" --paper
tar czf "${OUT:-$results}/gpu_results.tar.gz" "$results"
