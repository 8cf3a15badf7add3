"""`python -m neuromf` (and `torchrun -m neuromf`): the same front end as the `neuromf` command."""

import sys

from neuromf.cli import main

sys.exit(main())
