"""`ray job submit --working-dir . -- python jobs/distill.py --config configs/demo.yaml`"""

import sys

from leaf_ray.cli import main

sys.exit(main(["distill", *sys.argv[1:]]))
