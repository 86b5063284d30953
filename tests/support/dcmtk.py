"""dcmtk's command-line tools by absolute path.

pynetdicom installs console scripts of the same names (storescu, echoscu...) into the virtual
environment, which ``make test`` puts first on PATH; the tests mean dcmtk's, from apt.
"""

from __future__ import annotations

import shutil

DCMTK_PATH = "/usr/bin:/bin:/usr/local/bin"


def dcmtk(tool: str) -> str:
    found = shutil.which(tool, path=DCMTK_PATH)
    if found is None:
        msg = f"dcmtk's {tool} is not installed (apt install dcmtk; scripts/bootstrap.sh does)"
        raise AssertionError(msg)
    return found
