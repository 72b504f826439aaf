import sys

from vlmrt.cli import main

sys.exit(main())
