import sys

from foldserve.cli import main

sys.exit(main())
