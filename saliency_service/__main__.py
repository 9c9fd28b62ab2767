"""``python -m saliency_service …`` is the ``saliency`` command."""

import sys

from saliency_service.cli import main

sys.exit(main())
