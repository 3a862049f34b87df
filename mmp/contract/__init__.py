"""The contract a commit makes with MMP: the experiment file, train.py's argv, numbers, datasets and the image per dependency set."""
