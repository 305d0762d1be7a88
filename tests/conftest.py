import os

from hypothesis import HealthCheck, settings

# Derandomized so CI is reproducible; raise HYPOTHESIS_PROFILE=dev for wider local searches.
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
