#!/usr/bin/env bash
# few / few+denoiser / few+longer at 3000 segmentation steps and a 1500-step few-label DDPM, one process per seed
# (one torch thread each), from a frozen worktree of HEAD (82e7125). seg-few and seg-few-longer hold the few runs of
# runs/exp-vnc-6k at steps 3000 and 4500 (same seed, data order and constant learning rate: the same runs).
cd /tmp/snap8  # a worktree of 82e7125 with data/ and runs/ linked from the checkout
s=$1
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 /work/main/.venv/bin/python -m emserve.cli experiment data/vnc.zarr \
  --out runs/exp-vnc-3k --holdout crop2 --classes mito,pm,syn --voxel-size 50,9.2,9.2 --class-groups mito,syn \
  --patch-size 64 --ddpm-steps 1500 --seg-steps 3000 --samples 128 --despeckle 16 --few-slices 2 \
  --from-labels-steps 2000 --arms few,few+denoiser,few+longer --seeds $s
