"""Entry point: ``python -m factory_edge.demo`` (``./scripts/demo`` runs it)."""

import sys

from .cli import main

sys.exit(main())
