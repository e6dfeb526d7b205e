import sys

from kubetune_local.main import main

sys.exit(main())
