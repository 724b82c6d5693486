import sys

from medcap.cli import main

sys.exit(main())
