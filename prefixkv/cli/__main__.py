"""``python -m prefixkv.cli``."""
import sys

from . import main

sys.exit(main())
