import sys

from .export import _main

sys.exit(_main())
