"""How good is it: scores and the numbers behind them.

  evaluate.py    `emserve evaluate`: stores and models in, JSON-ready reports out (segmentation on held-out crops,
                 realism of generated EM, class presence, label transfer)
  metrics.py     the numbers: Dice / IoU / precision / recall from voxel counts, object sizes, FD and KID on fixed
                 filter-bank features
  statistics.py  intervals: a bootstrap over seeds and held-out tiles, paired differences, verdicts in words
"""
