"""Profile: per-domain routing statistics of a model (the profile file, its collection and report)."""

from compressor.profiling.merge import merge_profiles
from compressor.profiling.runner import ProfileOptions, profile_model
from compressor.profiling.schema import PROFILE_FORMAT_VERSION, Profile

__all__ = ["PROFILE_FORMAT_VERSION", "Profile", "ProfileOptions", "merge_profiles", "profile_model"]
