"""Screening (the default rules) on real phantom label maps: 64x64 tiles of every z slice of every crop, in the
default pairs model's classes. If real maps fail, the rule, not the model, is what rejects."""
import sys

from emserve.card import ModelCard
from emserve.classes import PRESENT
from emserve.data.store import EMStore
from emserve.postprocess import Screening

card = ModelCard.load("models/phantom-pairs")
size = card.patch_size
for name in sys.argv[1:]:
    store = EMStore(name)
    screen, tiles = Screening(), 0
    for crop in store.crops:
        labels = store.read_crop(crop, card.classes).labels  # [K, Z, Y, X]
        for z in range(labels.shape[1]):
            for y in range(0, labels.shape[2] - size + 1, size):
                for x in range(0, labels.shape[3] - size + 1, size):
                    screen.check(labels[:, z, y:y + size, x:x + size] == PRESENT, card.classes)
                    tiles += 1
    print(name, screen.summary())
