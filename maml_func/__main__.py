"""``python -m maml_func``: the ``maml-func`` command line (see :mod:`maml_func.cli`)."""

import sys

from maml_func.cli import main

sys.exit(main())
