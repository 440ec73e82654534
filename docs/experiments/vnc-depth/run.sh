#!/bin/bash
# VNC depth-context experiment (issue 23, part 3): real vs real+depth, from the frozen worktree /work/exp-tree2.
cd /work/exp-tree2
exec env PYTHONPATH=/work/exp-tree2 OMP_NUM_THREADS=${THREADS:-1} .venv/bin/python -m emserve.cli experiment data/vnc.zarr --out runs/exp-vnc-depth --holdout crop2 --classes mito,pm,syn --voxel-size 50,9.2,9.2 --class-groups mito,syn --patch-size 64 --seg-steps 1000 --arms real+depth --depth 3 --seeds ${SEEDS:-0,1,2}
