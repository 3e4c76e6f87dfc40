"""Where certkv keeps what it makes once per machine: models and their conversions (engine.weights) and the compiled CPU
kernels (kernels.cpu). $CERTKV_HOME, by default ~/.cache/certkv; never the source tree or site-packages."""

import os
from pathlib import Path

CACHE_HOME = Path(os.environ.get("CERTKV_HOME") or Path.home() / ".cache" / "certkv")
