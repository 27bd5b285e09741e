"""Hypothesis profiles of the property-based tests (tests/test_properties_*.py), chosen by HYPOTHESIS_PROFILE.

* ``ci`` (default): derandomized (the same examples on every run, so CI is reproducible and a red run is
  re-run identically), few examples, no deadline (the Triton interpreter and first calls are slow), no
  too_slow health check. Cost: about 2-3 min on 2 cores for all property tests together.
* ``long``: random, many examples; run it by hand after changing a kernel:
      HYPOTHESIS_PROFILE=long pytest tests/test_properties_*.py -x -q -p no:cacheprovider

Per backend the tests scale max_examples with ``examples_for``: the Triton interpreter runs ~100x slower than
the C++ kernels, so it gets a quarter of the examples (at least 2).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)  # fmt: skip
settings.register_profile("ci", max_examples=10, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=300, **_COMMON)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

# Interpreted backends (Triton under TRITON_INTERPRET=1) run this fraction of the profile's examples.
SLOW_BACKEND_FRACTION = 4


def examples_for(backend: str, weight: float = 1.0) -> int:
    """max_examples for one property on one backend: the profile's count times ``weight``, divided for slow
    (interpreted) backends."""
    n = max(1, int(settings.default.max_examples * weight))
    if backend in ("triton", "cuda-emulated"):
        n = max(2, n // SLOW_BACKEND_FRACTION)
    return n
