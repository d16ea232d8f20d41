"""The conformance tier: transformers' own common test suites (fetched from the installed release's sdist at test
time, see `sdist.py`) run against MM-GEM, plus the generation checks whose mixin transformers does not publish."""
