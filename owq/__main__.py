import sys

from owq.cli import main

sys.exit(main())
