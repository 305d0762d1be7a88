import os

import pytest
from hypothesis import HealthCheck, settings

# Derandomized so CI is reproducible; raise HYPOTHESIS_PROFILE=dev for wider local searches.
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _restore_native_mode():
    """train.py run in-process sets kernels.native's mode ("auto"); restore it so later tests see the library's."""
    import kernels.native as native
    mode = native.get_mode()
    yield
    if native.get_mode() != mode:
        native.set_mode(mode)
