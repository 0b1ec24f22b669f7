import sys

from compt.cli import main

sys.exit(main())
