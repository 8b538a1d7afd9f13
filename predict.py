"""Run `predict` from a checkout: python predict.py IMAGES_OR_FOLDER... --checkpoint HEAD"""

from pipeline.cli.predict import main

if __name__ == "__main__":
    main()
