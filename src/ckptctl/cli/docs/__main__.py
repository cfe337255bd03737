import sys

from ckptctl.cli.docs import main

sys.exit(main())
