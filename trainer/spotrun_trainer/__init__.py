"""spotrun's Keras integration: spot-safe checkpoints and exact resume."""
