"""``python -m fedmitr ...``: the same command line as ``fedmitr ...``.

This is what ``accelerate launch -m fedmitr run ...`` and ``torchrun -m fedmitr run ...`` start.
"""

import sys

from fedmitr.cli import main

if __name__ == "__main__":
    sys.exit(main())
