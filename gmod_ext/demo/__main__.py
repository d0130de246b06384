"""``python -m gmod_ext.demo`` (the same as ``python -m gmod_ext demo``)."""
import sys

from .cli import main

sys.exit(main())
