"""What the tests and the benchmarks share to run pararl for real without a cluster or weights: the tiny
run (a tiny model, prompts, a tiny CLIP reward with its statistics) and a Ray cluster of several nodes on
one machine, each in a network namespace of its own."""
