"""`python run_scripts/telechat2_entry.py ARGS` == `telechat2 ARGS`: a script path for msrun, which launches
scripts rather than modules (msrun ... run_scripts/telechat2_entry.py train --config ...)."""
import sys

from telechat2.cli import main

if __name__ == "__main__":
    sys.exit(main())
