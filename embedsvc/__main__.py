import sys

from embedsvc.cli import main

sys.exit(main())
