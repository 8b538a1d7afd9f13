"""Run `train_head` from a checkout: python train_head.py FEATURES.h5 --backbones NAME -o OUT"""

from pipeline.cli.train_head import main

if __name__ == "__main__":
    main()
