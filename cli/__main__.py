"""`python -m cli ...` is the `xfer` console command."""

import sys

from cli.main import main

sys.exit(main())
