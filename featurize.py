"""Run `featurize` from a checkout: python featurize.py [DATA_DIR] -o features.h5"""

from pipeline.cli.featurize import main

if __name__ == "__main__":
    main()
