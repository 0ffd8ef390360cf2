"""Small helpers shared by the service tests (not a test module)."""

import time


def poll(predicate, timeout_s=60.0):
    """Poll ``predicate()`` until it returns a truthy value (None after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    return None
