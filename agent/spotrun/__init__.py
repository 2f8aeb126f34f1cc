"""spotrun: train on AWS spot GPUs at spot prices without losing work."""
__version__ = "0.1.0"
