"""Keras in this test process uses JAX: it imports in ~2 s where TensorFlow takes ~10 s.

The tests that must run TensorFlow start a subprocess with KERAS_BACKEND set explicitly.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
