#!/bin/bash
# Phantom depth-context experiment (issue 23, part 3): real vs real+depth, from the frozen worktree /work/exp-tree2.
cd /work/exp-tree2
exec env PYTHONPATH=/work/exp-tree2 OMP_NUM_THREADS=${THREADS:-1} .venv/bin/python -m emserve.cli experiment data/phantom/phantom_a.zarr data/phantom/phantom_b.zarr data/phantom/phantom_c.zarr --out runs/exp-phantom-depth --holdout phantom_a/crop3,phantom_b/crop6,phantom_c/crop9 --class-groups mito_mem+mito_lum,ld_mem+ld_lum,mt_out+mt_in,mito_ribo,nucleo --patch-size 64 --seg-steps 1000 --arms real+depth --depth 3 --seeds ${SEEDS:-0,1,2}
