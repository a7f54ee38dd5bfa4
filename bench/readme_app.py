"""The README's "Mount it in your FastAPI app" program, as the module ``bench.readme_app``.

Read from README.md at import, so the benchmark serves exactly what users copy:
``tidings run bench.readme_app:app`` (the ``tidings_run`` server of ``python -m bench``) and
``uvicorn bench.readme_app:app`` (``tidings_mounted``).
"""

from __future__ import annotations

import re

from bench import ROOT

_BLOCK = re.compile(r"<!-- readme: program mount -->\n```python\n(.*?)\n```", re.S)


def _program() -> str:
    found = _BLOCK.search((ROOT / "README.md").read_text())
    if found is None:
        raise RuntimeError("README.md has no <!-- readme: program mount --> block")
    return found.group(1)


exec(compile(_program(), str(ROOT / "README.md"), "exec"), globals())
