"""ubcompile: a torch.compile backend with unbiased, sampled vector-Jacobian products.

    model = torch.compile(model, backend=ubcompile.backend(p=0.25))
"""

from ._torch_private import check_torch_version

check_torch_version()

from . import seeding  # noqa: E402

seeding.install()  # a seed=None backend's streams restart when torch.manual_seed is called

from .backend import Backend, backend  # noqa: E402
from .config import AXES, COMPILERS, GRAD_MODES, SKETCHES, SamplingConfig  # noqa: E402
from .explain import explain  # noqa: E402
from .profile import Profile, profile  # noqa: E402
from .report import GemmEntry, Report  # noqa: E402

__version__ = "0.1.0"
__all__ = ["AXES", "Backend", "COMPILERS", "GRAD_MODES", "SKETCHES", "GemmEntry", "Profile", "Report",
           "SamplingConfig", "backend", "explain", "profile"]
