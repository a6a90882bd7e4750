"""``python -m lafs <stage>``: same as the ``lafs`` console script, for when the venv's bin is not on PATH."""

from lafs.cli import main

raise SystemExit(main())
