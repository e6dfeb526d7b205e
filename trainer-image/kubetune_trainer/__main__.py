"""``python -m kubetune_trainer --config config.json`` (also what torchrun's ``-m`` runs)."""

import sys

from kubetune_trainer.main import main

sys.exit(main())
