"""`python -m lmalloy` (and `torchrun -m lmalloy`) == the `lmalloy` command."""

import sys

from lmalloy.cli import main

sys.exit(main())
