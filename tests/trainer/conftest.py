"""Keras in this test process uses JAX: it imports in ~2 s where TensorFlow takes ~10 s.

Keras picks its backend once, at first import; the variable is restored right after, so the
rest of the session (other test directories, their subprocesses) sees the environment as it
was. Tests that need TensorFlow start a subprocess with KERAS_BACKEND set explicitly.
"""
import os

_previous = os.environ.get("KERAS_BACKEND")
os.environ["KERAS_BACKEND"] = "jax"
try:
    import keras  # noqa: F401,E402 - fixes the backend of this process
finally:
    if _previous is None:
        del os.environ["KERAS_BACKEND"]
    else:
        os.environ["KERAS_BACKEND"] = _previous
