"""Coverage-guided fuzzing of every decoder of untrusted bytes or text (atheris + libFuzzer).

Each ``fuzz_<target>`` module is a harness: ``python -m fuzz.fuzz_<target> [libFuzzer args]``.
A harness lets through only the errors its decoder documents; any other exception, a hang or a
broken contract is a crash, and libFuzzer saves the input that caused it.
"""
