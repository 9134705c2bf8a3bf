"""`python3 -m updater`: the berth-update command line."""

import sys

from updater.cli import main

sys.exit(main())
