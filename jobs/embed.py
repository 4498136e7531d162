"""`ray job submit --working-dir . -- python jobs/embed.py --config configs/demo.yaml`"""

import sys

from leaf_ray.cli import main

sys.exit(main(["embed", *sys.argv[1:]]))
