import sys

from lenet_dist.cli import main

sys.exit(main())
