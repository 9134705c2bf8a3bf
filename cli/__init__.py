"""`./build.py`'s command line: the one package that imports the builder, the publisher and qemu/.

    main.py      the parser and the dispatch; the only place that turns errors into exit codes
    build.py     build, list: image definitions into images
    run.py       run: boot an image under qemu/ for a person to use
    publish.py   keys, publish, pull: the TUF keys and repository (builder/publish/)
    test.py      test: ruff, mypy and the test suite

Nothing imports this package but build.py and its tests: builder/ and qemu/ stay libraries that a
front end calls, never the other way round.
"""

from __future__ import annotations

from pathlib import Path

# The checkout: images/, out/ and keys/ are found beside this package, wherever it is run from.
REPO = Path(__file__).resolve().parent.parent
