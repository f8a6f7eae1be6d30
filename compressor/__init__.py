"""moe-compress: prune Mixture-of-Experts checkpoints to the experts they use."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moe-compress")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from compressor.errors import UserError  # noqa: E402
from compressor.modeling import register_when_transformers_loads  # noqa: E402

register_when_transformers_loads()

__all__ = ["UserError", "__version__"]
