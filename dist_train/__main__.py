"""python -m dist_train -> cli.main()"""
from dist_train.cli import main
from dist_train.env.shutdown import exit_process

if __name__ == "__main__":
    exit_process(main())
