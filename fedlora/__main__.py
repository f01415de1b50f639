"""`python -m fedlora ...` is the `fedlora` command."""

import sys

from fedlora.cli import main

sys.exit(main())
