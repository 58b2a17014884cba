"""`python -m train <command>`: see train/cli.py."""
from train.cli import main

if __name__ == "__main__":
    main()
