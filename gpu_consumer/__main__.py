"""`python -m gpu_consumer`: run the GPU worker with settings from the environment."""

import sys

from adapters.cli import main

sys.exit(main(["serve", "gpu", *sys.argv[1:]]))
