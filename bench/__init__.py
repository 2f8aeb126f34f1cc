"""spotrun's benchmarks: `make bench` (python -m bench.run). See docs/benchmarks.md."""
