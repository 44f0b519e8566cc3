import sys

from layout_retouch.cli import main

sys.exit(main())
