"""Runtimes: run an exported UNet as the denoise (or segment) callable that pipelines take.

Every backend is built from a model folder (a card + exported graphs) and checks each request against the card
before running it, so a mismatch is reported in words instead of as a shape error deep inside a graph.
"""
