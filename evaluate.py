"""Run `evaluate` from a checkout: python evaluate.py CHECKPOINT... --features FEATURES.h5 -o OUT/"""

from pipeline.cli.evaluate import main

if __name__ == "__main__":
    main()
