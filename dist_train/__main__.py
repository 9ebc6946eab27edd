"""python -m dist_train -> cli.main()"""
import sys

from dist_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
