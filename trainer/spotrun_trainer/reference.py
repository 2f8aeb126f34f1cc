"""Alias: ``python -m spotrun_trainer.reference`` runs the reference trainer (resnet_cifar)."""
import sys

from .resnet_cifar import main

if __name__ == "__main__":
    sys.exit(main())
