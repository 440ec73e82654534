#!/usr/bin/env bash
# ISBI 2012 few-label experiment, one seed per call (the README's ISBI import gives data/isbi.zarr; crop2 = the
# last 6 sections, held out). Seed 0 ran from a frozen worktree of commit 7bc9f20 (batches drawn the old way); a
# seed run now draws its batches per step (training/batches.py): same statistics, other draws.
s=$1
emserve experiment data/isbi.zarr --out runs/exp-isbi-3k --holdout crop2 --classes pm --voxel-size 50,8,8 \
  --patch-size 64 --ddpm-steps 1500 --seg-steps 3000 --samples 128 --despeckle 16 --few-slices 2 \
  --from-labels-steps 2000 --arms few,few+denoiser,few+longer --seeds $s \
  --results-from docs/experiments/isbi-few-labels-3000/report.json
