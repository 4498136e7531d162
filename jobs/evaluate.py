"""`ray job submit --working-dir . -- python jobs/evaluate.py --run runs/<name>`"""

import sys

from leaf_ray.cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
