"""Coverage-guided fuzzing (atheris) of each parser and layer, and the replay of what it keeps.

`make fuzz` runs every target for FUZZ_RUNS executions (tests/fuzz/run.py); `make test` replays
every corpus entry and every saved finding through the same checks without atheris
(test_replay.py). See docs/fuzzing.md.
"""
