#!/usr/bin/env bash
# The few+augmented arm added to the committed VNC few-label experiment at the converged budget
# (docs/experiments/vnc-few-labels-3000): one process per seed, one torch thread each; `few` is taken from that
# report (--results-from), so each seed trains only the EM-from-labels DDPM and the few+augmented network.
# Seeds 0-2 ran from a frozen worktree of commit f385d53. Adding the control: `--arms few,few+augmented,few+elastic`
# with --results-from docs/experiments/vnc-augmented/report.json trains only few+elastic.
s=$1
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 emserve experiment data/vnc.zarr \
  --out runs/exp-vnc-3k-aug --holdout crop2 --classes mito,pm,syn --voxel-size 50,9.2,9.2 --class-groups mito,syn \
  --patch-size 64 --ddpm-steps 1500 --seg-steps 3000 --samples 128 --despeckle 16 --few-slices 2 \
  --from-labels-steps 2000 --arms few,few+augmented --seeds $s \
  --results-from docs/experiments/vnc-few-labels-3000/report.json
