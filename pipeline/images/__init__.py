"""Images: file checks, then decode/resize/normalize to two views (plain, mirrored) with DALI or torchvision."""
