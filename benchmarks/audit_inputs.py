"""The hardening audit moved to `tests/audit_inputs.py` (one copy, beside the tests that use it): this name still runs
it, `python -m benchmarks.audit_inputs [options]` being `python -m tests.audit_inputs [options]`."""

import sys

from tests.audit_inputs import main

if __name__ == "__main__":
    sys.exit(main())
