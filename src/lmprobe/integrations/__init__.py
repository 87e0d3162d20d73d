"""Third-party internals lmprobe relies on: one module per library, each with a ``check()``
that lists what a new release moved (tests/test_integrations.py)."""
