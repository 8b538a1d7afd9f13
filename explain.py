"""Run `explain` from a checkout: python explain.py IMAGES_OR_FOLDER --checkpoint HEAD -o OUT/"""

from pipeline.cli.explain import main

if __name__ == "__main__":
    main()
